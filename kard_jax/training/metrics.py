"""TensorBoard scalars: written with tensorboardX (no TensorFlow), read back into numpy arrays."""
from __future__ import annotations

import os
import pathlib
import struct
import uuid
from typing import Mapping

import numpy as np


class MetricsWriter:
    """Scalar summaries under `logdir` (process 0 only; a no-op elsewhere)."""

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            # A unique suffix: a run restarted within the same second must not overwrite the old file.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._writer = SummaryWriter(logdir=str(logdir), flush_secs=10, filename_suffix=suffix)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _read_records(path: pathlib.Path):
    """TFRecord framing: u64 length, u32 crc, payload, u32 crc. A truncated tail is ignored."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            if len(payload) < length or len(f.read(4)) < 4:
                return
            yield payload


def read_scalars(logdir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) from every event file under `logdir`, sorted by step.

    A step logged twice (a resumed run repeating steps after its last checkpoint) keeps the
    value written last.
    """
    from tensorboardX.proto import event_pb2

    points: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
        for record in _read_records(path):
            event = event_pb2.Event.FromString(record)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    previous = points.setdefault(value.tag, {}).get(event.step)
                    if previous is None or event.wall_time >= previous[0]:
                        points[value.tag][event.step] = (event.wall_time, value.simple_value)
    out = {}
    for tag, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s][1] for s in steps], dtype=np.float64))
    return out
