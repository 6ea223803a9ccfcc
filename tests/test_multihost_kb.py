"""A knowledge base embedded by two processes: under `jax.distributed` (127.0.0.1, 4 simulated
CPU devices each) every process embeds a contiguous block of the passages on its own devices
into the KB's shared temp directory, process 0 checks the shards and builds the one dense
index; the KB equals a one-process build (embeddings atol 1e-5, same index results), every
passage embedded exactly once. Also: the shard plan, and the shard check refusing gaps,
overlaps, missing and malformed shards.

This file is also the two-process worker: `python tests/test_multihost_kb.py --worker ...`.
"""
import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PASSAGES = 41  # odd: the two processes' blocks differ in size (21 + 20)
WORDS = "volcano penguin piano moon coffee desert tundra moss lava orbit tide keys birds ash".split()


def _tokenize(text):  # toy tokenizer: one id per character, 2..63, then EOS (1)
    return [2 + ord(c) % 62 for c in text] + [1]


def _config():
    from kard_jax.models import t5

    return t5.T5Config.from_preset("tiny", vocab_size=64, d_model=32, d_kv=8, d_ff=64)


def _write_inputs(d: pathlib.Path) -> None:
    """The corpus (distinct passages) and the random T5's params, shared by every process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import serialization
    from flax.linen import meta

    from kard_jax.models import t5

    rng = np.random.default_rng(0)
    rows = [{"id": f"p{i}", "title": f"T{i}", "text": " ".join(rng.choice(WORDS, 3 + i % 7))}
            for i in range(NUM_PASSAGES)]
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = jnp.ones((2, 8), jnp.int32)
    params = meta.unbox(t5.T5(_config()).init(jax.random.PRNGKey(0), tokens, tokens)["params"])
    (d / "params.msgpack").write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))


def _embedder(d: pathlib.Path, seen: list | None = None):
    from flax import serialization

    from kard_jax.knowledge import embed

    params = serialization.msgpack_restore((d / "params.msgpack").read_bytes())
    embedder = embed.T5Embedder(_config(), params, _tokenize, max_length=24, batch_size=4)
    if seen is not None:  # records the texts this process embeds
        original = embedder.embed

        def recording(texts, **kwargs):
            seen.extend(texts)
            return original(texts, **kwargs)

        embedder.embed = recording
    return embedder


def _build(d: pathlib.Path, kb_dir: pathlib.Path, embedder):
    from kard_jax.knowledge import run

    return run.build_kb(corpus_paths=[str(d / "corpus.jsonl")], kb_dir=str(kb_dir), embedder=embedder,
                        show_progress=False)


# ----------------------------------------------------------------------------------------------------------------------
def _worker(args) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id,
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    d = pathlib.Path(args.dir)
    seen = []
    embedder = _embedder(d, seen)
    assert {dev.process_index for dev in embedder.mesh.devices.flat} == {args.process_id}  # its own devices
    if args.fail_process == args.process_id:
        embedder.embed = lambda texts, **kwargs: (_ for _ in ()).throw(OSError("disk full (injected)"))
    try:
        manifest = _build(d, d / args.kb, embedder)
    except Exception as e:  # noqa: BLE001 - reported to the test
        (d / f"error_{args.process_id}.txt").write_text(f"{type(e).__name__}: {e}")
    else:
        (d / f"manifest_{args.process_id}.json").write_text(json.dumps(manifest))
    (d / f"seen_{args.process_id}.json").write_text(json.dumps(seen))
    print(f"WORKER {args.process_id} DONE", flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(d: pathlib.Path, kb: str, fail_process: int = -1, while_running=None) -> None:
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"--coordinator={coordinator}",
                               f"--process_id={pid}", f"--dir={d}", f"--kb={kb}", f"--fail_process={fail_process}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    wait_for_workers(procs, while_running)


# ----------------------------------------------------------------------------------------------------------------------
import pytest  # noqa: E402

from tests.workers import wait_for_workers  # noqa: E402


def test_shard_plan_blocks_per_process():
    from kard_jax.knowledge import embed

    assert embed.shard_plan(10, 4) == [(0, 0, 4), (0, 4, 8), (0, 8, 10)]  # one process: as always
    assert embed.shard_plan(0, 4) == [(0, 0, 0)]
    assert embed.shard_plan(41, 15, 2) == [(0, 0, 15), (0, 15, 21), (1, 21, 36), (1, 36, 41)]
    assert embed.shard_plan(2, 100, 3) == [(0, 0, 1), (1, 1, 2)]  # process 2 has nothing to embed


def test_check_shards_refuses_gaps_overlaps_missing_and_malformed(tmp_path):
    import numpy as np

    from kard_jax.knowledge import embed

    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 4), np.float32))
    good = [{"num_texts": 5, "shards": [["b.npy", 3, 5]]}, {"num_texts": 5, "shards": [["a.npy", 0, 3]]}]
    assert embed.check_shards(tmp_path, good, 5, 4, "float32", wait_seconds=0) == ["a.npy", "b.npy"]
    with pytest.raises(RuntimeError, match=r"passages 3\.\.3 are in no embeddings shard"):
        embed.check_shards(tmp_path, [{"num_texts": 6, "shards": [["a.npy", 0, 3], ["b.npy", 4, 6]]}], 6, 4,
                           "float32", wait_seconds=0)
    with pytest.raises(RuntimeError, match=r"passages 2\.\.2 are in two embeddings shards"):
        embed.check_shards(tmp_path, [{"num_texts": 5, "shards": [["a.npy", 0, 3], ["b.npy", 2, 5]]}], 5, 4,
                           "float32", wait_seconds=0)
    with pytest.raises(RuntimeError, match=r"end at passage 5, the store has 7"):
        embed.check_shards(tmp_path, [dict(good[1], num_texts=7), dict(good[0], num_texts=7)], 7, 4, "float32",
                           wait_seconds=0)
    with pytest.raises(RuntimeError, match=r"c\.npy \(passages 3\.\.4\) is missing"):
        embed.check_shards(tmp_path, [{"num_texts": 5, "shards": [["a.npy", 0, 3], ["c.npy", 3, 5]]}], 5, 4,
                           "float32", wait_seconds=0)
    with pytest.raises(RuntimeError, match=r"a\.npy holds \(3, 4\) float32, expected \(3, 4\) float16"):
        embed.check_shards(tmp_path, good, 5, 4, "float16", wait_seconds=0)
    with pytest.raises(RuntimeError, match=r"a\.npy holds \(3, 4\) float32, expected \(3, 8\) float32"):
        embed.check_shards(tmp_path, good, 5, 8, "float32", wait_seconds=0)
    with pytest.raises(RuntimeError, match=r"disagree on the number of passages: \[5, 6\]"):
        embed.check_shards(tmp_path, [good[0], dict(good[1], num_texts=6)], 5, 4, "float32", wait_seconds=0)


def test_two_processes_embed_disjoint_blocks_into_one_index(tmp_path):
    import jax
    import numpy as np

    from kard_jax.knowledge import embed, run, scann_index

    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    _write_inputs(tmp_path)
    single = {}
    # The one-process reference (8 devices) is built while the two processes run.
    _run_two_processes(tmp_path, "kb_multi",
                       while_running=lambda: single.update(_build(tmp_path, tmp_path / "kb_single",
                                                                  _embedder(tmp_path))))
    manifests = [json.loads((tmp_path / f"manifest_{pid}.json").read_text()) for pid in range(2)]
    assert manifests[0] == manifests[1]  # every process returns the KB's manifest
    assert manifests[0]["dense_index"] == single["dense_index"] == "brute_force"
    assert ({k: v for k, v in manifests[0]["passages"].items() if k != "build_seconds"}
            == {k: v for k, v in single["passages"].items() if k != "build_seconds"})

    kb = tmp_path / "kb_multi"
    store, _ = run.load_kb(kb)
    texts = [store.contents(i) for i in range(len(store))]
    assert len(texts) == NUM_PASSAGES == len(set(texts))
    # Every passage embedded exactly once, each process a contiguous block on its own devices.
    seen = [json.loads((tmp_path / f"seen_{pid}.json").read_text()) for pid in range(2)]
    assert seen[0] == texts[:21] and seen[1] == texts[21:]
    emb_manifest = json.loads((kb / "embeddings" / "manifest.json").read_text())
    assert emb_manifest["shards"] == ["embeddings-00000-of-00002.npy", "embeddings-00001-of-00002.npy"]
    assert [np.load(kb / "embeddings" / n).shape for n in emb_manifest["shards"]] == [(21, 32), (20, 32)]
    assert emb_manifest["num_vectors"] == NUM_PASSAGES
    # The same vectors as one process, and as embedding each passage afresh here.
    multi = embed.load_embeddings(kb / "embeddings")
    np.testing.assert_allclose(multi, embed.load_embeddings(tmp_path / "kb_single" / "embeddings"), atol=1e-5)
    np.testing.assert_allclose(multi, _embedder(tmp_path).embed(texts), atol=1e-5)
    # One dense index over all passages, answering as the one-process index does.
    queries = multi[::5]
    index, scores = scann_index.load_dense_index(kb / "dense_index").search(queries, 5)
    ref_index, ref_scores = scann_index.load_dense_index(tmp_path / "kb_single" / "dense_index").search(queries, 5)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert index[:, 0].tolist() == list(range(0, NUM_PASSAGES, 5))
    # Renamed once: no temp directories left beside the KB or inside it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in kb.iterdir()) == ["bm25", "dense_index", "embeddings", "manifest.json", "passages"]
    assert sorted(p.name for p in (kb / "embeddings").iterdir()) == ["embeddings-00000-of-00002.npy",
                                                                     "embeddings-00001-of-00002.npy", "manifest.json"]

    # A failure on one process fails both, and leaves the old KB in place, no temp directory.
    before = (kb / "manifest.json").read_text()
    for name in ("manifest_0.json", "manifest_1.json"):
        (tmp_path / name).unlink()
    _run_two_processes(tmp_path, "kb_multi", fail_process=1)
    errors = [(tmp_path / f"error_{pid}.txt").read_text() for pid in range(2)]
    assert errors[1] == "OSError: disk full (injected)"
    assert errors[0] == "RuntimeError: embedding passages failed on process 1: OSError: disk full (injected)"
    assert not (tmp_path / "manifest_0.json").exists() and not (tmp_path / "manifest_1.json").exists()
    assert (kb / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--dir")
    parser.add_argument("--kb")
    parser.add_argument("--fail_process", type=int, default=-1)
    _worker(parser.parse_args())
