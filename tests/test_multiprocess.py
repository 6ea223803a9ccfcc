"""Two processes under `jax.distributed` (127.0.0.1, 4 simulated CPU devices each, gloo CPU
collectives) train exactly what one process with 8 devices trains: equal losses, each process
reading a disjoint half of every global batch, one TensorBoard writer and config.gin (process 0),
a checkpoint that restores and resumes in a single process, and a SIGTERM to one process stopping
both at the same step with a checkpoint.

This file is also the worker: `python tests/test_multiprocess.py --worker ...`.
"""
import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS = 6
BATCH = 16
MODEL = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2)


def _data(delay_s: float = 0.0, record: pathlib.Path | None = None, **shard):
    """The synthetic copy task, host-sharded by default (jax.process_index / process_count)."""
    from kard_jax.training import data_iterator

    inner = data_iterator.synthetic_copy_task(batch_size=BATCH, vocab_size=64, max_length=6, num_examples=128,
                                              seed=1, **shard)

    class Recording:
        """Writes every batch's encoder tokens (one JSON line per batch) before handing it on."""

        def __iter__(self):
            return self

        def __next__(self):
            if delay_s:
                time.sleep(delay_s)
            batch = next(inner)
            if record is not None:
                with open(record, "a") as f:
                    f.write(json.dumps(batch["encoder_input_tokens"].tolist()) + "\n")
            return batch

        def get_state(self):
            return inner.get_state()

        def set_state(self, state):
            inner.set_state(state)

        vocab_size = inner.vocab_size

    return Recording()


def _train(model_dir, steps=TRAIN_STEPS, save_period=3, data=None):
    from kard_jax.models import t5
    from kard_jax.training import optimizers, partitioning, trainer

    return trainer.train(
        model_dir=model_dir, model=t5.T5Config(**MODEL), train_data=data if data is not None else _data(),
        train_steps=steps, save_period=save_period, log_period=1, mesh_config=partitioning.MeshConfig(data=4, model=2),
        optimizer=optimizers.adamw(3e-3), async_checkpointing=True,
    )


def _worker(args) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in jax 0.10; explicit here
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id,
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    record = pathlib.Path(args.record) if args.record else None
    print(f"WORKER {args.process_id} READY", flush=True)
    state = _train(args.model_dir, steps=args.steps, save_period=args.save_period,
                   data=_data(delay_s=args.delay_s, record=record))
    print(f"WORKER {args.process_id} FINAL_STEP {int(jax.device_get(state.step))}", flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, model_dir, *, steps=TRAIN_STEPS, save_period=3, delay_s=0.0, record=True):
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    procs = []
    for pid in range(2):
        cmd = [sys.executable, __file__, "--worker", f"--coordinator={coordinator}", f"--process_id={pid}",
               f"--model_dir={model_dir}", f"--steps={steps}", f"--save_period={save_period}", f"--delay_s={delay_s}"]
        if record:
            cmd.append(f"--record={tmp_path / f'batches_{pid}.jsonl'}")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


from tests.workers import communicate_all  # noqa: E402


def _final_step(out: str) -> int:
    return int(next(line for line in out.splitlines() if "FINAL_STEP" in line).split()[-1])


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    import jax
    import numpy as np
    import pytest

    from kard_jax.training import checkpoints, metrics

    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    procs = _launch(tmp_path, multi_dir)
    # The single-process reference runs meanwhile (same global batches, same mesh shape).
    single_state = _train(single_dir, data=_data(record=tmp_path / "batches_single.jsonl", shard_index=0, num_shards=1))
    results = communicate_all(procs)
    for pid, (code, out, err) in enumerate(results):
        assert code == 0, f"process {pid} exited {code}:\n{err[-4000:]}"
        assert _final_step(out) == TRAIN_STEPS

    # Equal losses, step by step.
    single = metrics.read_scalars(single_dir / "train")["loss"]
    multi = metrics.read_scalars(multi_dir / "train")["loss"]
    assert list(multi[0]) == list(single[0]) == list(range(1, TRAIN_STEPS + 1))
    np.testing.assert_allclose(multi[1], single[1], rtol=1e-5)

    # Each process read its own half of every global batch; together exactly the single run's batches.
    def batches(name):
        return [np.asarray(json.loads(line)) for line in (tmp_path / name).read_text().splitlines()]

    halves = [batches(f"batches_{pid}.jsonl") for pid in range(2)]
    whole = batches("batches_single.jsonl")
    assert len(halves[0]) == len(halves[1]) == len(whole) == TRAIN_STEPS
    for step, (a, b, full) in enumerate(zip(*halves, whole)):
        assert a.shape == b.shape == (BATCH // 2, full.shape[1])
        np.testing.assert_array_equal(np.concatenate([a, b]), full, err_msg=f"batch {step + 1}")
        assert not {tuple(r) for r in a} & {tuple(r) for r in b}

    # Process 0 alone wrote the TensorBoard events and config.gin.
    assert len(list((multi_dir / "train").glob("events.*"))) == 1
    assert (multi_dir / "config.gin").is_file()

    # The two-process checkpoint restores in this single process and equals the single run's state.
    ckpt = checkpoints.Checkpointer(multi_dir, async_save=False)
    assert ckpt.all_steps() == [3, 6]
    ckpt.close()
    restored = checkpoints.restore_params(multi_dir, jax.eval_shape(lambda: single_state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4),
                 restored, single_state.params)
    # ... and training resumes from it here (one process, 8 devices) to the single run's losses.
    _train(multi_dir, steps=TRAIN_STEPS + 2, data=_data(shard_index=0, num_shards=1))
    _train(single_dir, steps=TRAIN_STEPS + 2, data=_data(shard_index=0, num_shards=1))
    resumed = metrics.read_scalars(multi_dir / "train")["loss"]
    reference = metrics.read_scalars(single_dir / "train")["loss"]
    assert list(resumed[0]) == list(range(1, TRAIN_STEPS + 3))
    np.testing.assert_allclose(resumed[1], reference[1], rtol=1e-4)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    model_dir = tmp_path / "run"
    steps = 40
    procs = _launch(tmp_path, model_dir, steps=steps, save_period=1000, delay_s=0.4, record=True)
    record = tmp_path / "batches_1.jsonl"
    try:
        deadline = time.time() + 400
        # Wait until process 1 is training (it has read a few batches), then preempt it alone.
        while time.time() < deadline and (not record.exists() or len(record.read_text().splitlines()) < 4):
            assert all(p.poll() is None for p in procs), "a worker exited early"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    results = communicate_all(procs)
    for pid, (code, out, err) in enumerate(results):
        assert code == 0, f"process {pid} exited {code}:\n{err[-4000:]}"
    final = [_final_step(out) for _, out, _ in results]
    assert final[0] == final[1] < steps, final
    from kard_jax.training import checkpoints

    ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
    assert ckpt.latest_step() == final[0]
    ckpt.close()
    assert "preempted: saved a checkpoint at step" in results[0][2]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--model_dir")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--save_period", type=int, default=3)
    parser.add_argument("--delay_s", type=float, default=0.0)
    parser.add_argument("--record")
    _worker(parser.parse_args())
