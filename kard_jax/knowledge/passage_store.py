"""A memory-mapped passage store: 20M passages served by index or id without Python objects.

Layout of a store directory (written atomically):
  manifest.json
  {ids,titles,texts}.bin            UTF-8 bytes of every passage, concatenated
  {ids,titles,texts}_offsets.npy    int64 [n + 1]; row i is bin[offsets[i]:offsets[i + 1]]
  id_hash_sorted.npy, id_hash_order.npy   uint64/int64 [n]: blake2b-64 of each id, sorted, and
                                    the row of each sorted hash (id lookup = searchsorted)
"""
from __future__ import annotations

import array
import os
import pathlib
import time
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from kard_jax.errors import InputError
from kard_jax.knowledge import atomic, corpus
from kard_jax.knowledge.corpus import Passage

FORMAT = "kard_jax.passage_store/1"
_FIELDS = ("ids", "titles", "texts")


class PassageStore:
    """Read-only view of a store directory; rows are decoded on access."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise InputError("not a passage store (no manifest.json)", path=self.directory)
        self.manifest = atomic.read_json(manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"unsupported format {self.manifest.get('format')!r}", path=manifest_path, field="format")
        self._bins, self._offsets = {}, {}
        for field in _FIELDS:
            # np.asarray: plain ndarray views of the memmaps (no per-slice memmap overhead).
            self._offsets[field] = np.asarray(np.load(self.directory / f"{field}_offsets.npy", mmap_mode="r"))
            size = int(self._offsets[field][-1])
            self._bins[field] = np.asarray(
                np.memmap(self.directory / f"{field}.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
            )
        self._id_hash_sorted = np.asarray(np.load(self.directory / "id_hash_sorted.npy", mmap_mode="r"))
        self._id_hash_order = np.asarray(np.load(self.directory / "id_hash_order.npy", mmap_mode="r"))

    def __len__(self) -> int:
        return len(self._offsets["ids"]) - 1

    def _get(self, field: str, i: int) -> str:
        offsets = self._offsets[field]
        return bytes(self._bins[field][offsets[i]:offsets[i + 1]]).decode("utf-8")

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"passage index {i} out of range 0..{len(self) - 1}")
        return i

    def __getitem__(self, i: int) -> Passage:
        i = self._check(i)
        return Passage(id=self._get("ids", i), title=self._get("titles", i), text=self._get("texts", i))

    def get_many(self, indices: Iterable[int]) -> list[Passage]:
        return [self[i] for i in indices]

    def id_of(self, i: int) -> str:
        return self._get("ids", self._check(i))

    def ids_of(self, indices: Iterable[int]) -> list[str]:
        return [self.id_of(i) for i in indices]

    def contents(self, i: int) -> str:
        """`Title . text` of row i (what BM25 indexes)."""
        return self[i].contents

    def index_of(self, passage_id: str) -> int:
        """Row of `passage_id`; KeyError if absent."""
        h = np.uint64(corpus.id_hash(passage_id))
        lo = int(np.searchsorted(self._id_hash_sorted, h, side="left"))
        hi = int(np.searchsorted(self._id_hash_sorted, h, side="right"))
        for j in range(lo, hi):  # almost always one candidate; >1 only on a 64-bit collision
            row = int(self._id_hash_order[j])
            if self._get("ids", row) == passage_id:
                return row
        raise KeyError(passage_id)

    def indices_of(self, passage_ids: Sequence[str]) -> np.ndarray:
        return np.array([self.index_of(p) for p in passage_ids], dtype=np.int64)

    def __contains__(self, passage_id: str) -> bool:
        try:
            self.index_of(passage_id)
        except KeyError:
            return False
        return True


class _FieldWriter:
    """Appends UTF-8 strings to `<field>.bin` and records their offsets."""

    def __init__(self, directory: pathlib.Path, field: str):
        self.directory, self.field = directory, field
        self.file = open(directory / f"{field}.bin", "wb")
        self.offsets = array.array("q", [0])

    def append(self, value: str) -> None:
        data = value.encode("utf-8")
        self.file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def close(self, keep: np.ndarray | None) -> None:
        """Writes the offsets; with `keep` (sorted row indices) rewrites the bin to those rows."""
        self.file.close()
        offsets = np.frombuffer(self.offsets, dtype=np.int64)
        if keep is not None:
            offsets = self._compact(offsets, keep)
        np.save(self.directory / f"{self.field}_offsets.npy", offsets)

    def _compact(self, offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
        src_path = self.directory / f"{self.field}.bin"
        dst_path = self.directory / f"{self.field}.bin.compact"
        lengths = np.diff(offsets)[keep]
        # Copy runs of consecutive kept rows as single byte ranges.
        breaks = np.flatnonzero(np.diff(keep) != 1) + 1
        src = np.memmap(src_path, dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)
        with open(dst_path, "wb") as dst:
            for run in np.split(keep, breaks):
                dst.write(src[offsets[run[0]]:offsets[run[-1] + 1]].tobytes())
        del src
        os.replace(dst_path, src_path)
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def build_passage_store(
    sources: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    chunk_words: int | None = None,
    chunk_stride: int | None = None,
    dedup: bool = True,
    skip_empty_text: bool = False,
    show_progress: bool = True,
) -> PassageStore:
    """Ingests `sources` (JSONL/TSV) into a store at `output_dir` (atomic; replaces it).

    De-duplication keeps the first passage of each normalized text. Duplicate passage ids,
    malformed lines and an empty result raise InputError naming the file (and line). Documents
    with an empty text raise too, unless `skip_empty_text` (then they are counted and dropped).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    start = time.time()
    with atomic.atomic_directory(output_dir) as tmp:
        writers = {field: _FieldWriter(tmp, field) for field in _FIELDS}
        text_hashes, id_hashes = array.array("Q"), array.array("Q")
        source_index, source_line = array.array("i"), array.array("q")
        num_documents, num_empty, last = 0, 0, None
        items = corpus.iter_passages(sources, chunk_words=chunk_words, chunk_stride=chunk_stride,
                                     skip_empty_text=skip_empty_text)
        for item in tqdm(items, desc="passages", unit=" psg", disable=not show_progress, mininterval=2.0):
            if item is None:
                num_empty += 1
                continue
            p = item.passage
            writers["ids"].append(p.id)
            writers["titles"].append(p.title)
            writers["texts"].append(p.text)
            text_hashes.append(corpus.normalized_text_hash(p.text) if dedup else 0)
            id_hashes.append(corpus.id_hash(p.id))
            source_index.append(sources.index(item.path))
            source_line.append(item.line)
            if (item.path, item.line) != last:
                num_documents, last = num_documents + 1, (item.path, item.line)
        n_read = len(id_hashes)
        if n_read == 0:
            for w in writers.values():
                w.file.close()
            raise InputError("the knowledge base is empty: no passages in " + ", ".join(sources))
        keep = None
        if dedup:
            _, first = np.unique(np.frombuffer(text_hashes, dtype=np.uint64), return_index=True)
            if len(first) < n_read:
                keep = np.sort(first)
        for w in writers.values():
            w.close(keep)
        rows = np.arange(n_read) if keep is None else keep
        hashes = np.frombuffer(id_hashes, dtype=np.uint64)[rows]
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        np.save(tmp / "id_hash_sorted.npy", sorted_hashes)
        np.save(tmp / "id_hash_order.npy", order.astype(np.int64))
        _check_unique_ids(tmp, sorted_hashes, order, rows, sources, source_index, source_line)
        manifest = {
            "format": FORMAT,
            "sources": [os.path.abspath(s) for s in sources],
            "num_documents": num_documents,
            "num_passages_read": n_read,
            "num_passages": int(len(rows)),
            "num_duplicates_dropped": int(n_read - len(rows)),
            "num_empty_skipped": num_empty,
            "chunk_words": chunk_words,
            "chunk_stride": chunk_stride if chunk_stride is not None else chunk_words,
            "dedup": dedup,
            "build_seconds": round(time.time() - start, 3),
        }
        atomic.write_json(tmp / "manifest.json", manifest)
    return PassageStore(output_dir)


def _check_unique_ids(tmp, sorted_hashes, order, rows, sources, source_index, source_line) -> None:
    """Raises InputError at the second occurrence of any passage id."""
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if not len(same):
        return
    offsets = np.load(tmp / "ids_offsets.npy")
    data = np.memmap(tmp / "ids.bin", dtype=np.uint8, mode="r")

    def id_at(r):
        return bytes(data[offsets[r]:offsets[r + 1]]).decode("utf-8")

    for j in same:
        a, b = sorted((int(order[j]), int(order[j + 1])))
        if id_at(a) == id_at(b):
            first, second = rows[a], rows[b]
            raise InputError(
                f"duplicate passage id {id_at(b)!r} (first at {sources[source_index[first]]} line "
                f"{source_line[first]})",
                path=sources[source_index[second]], line=int(source_line[second]), field="id",
            )
