"""Sharded evaluation: a student restored into a 2x4 mesh's shardings (data=2, model=4) decodes
under the mesh to exactly the single-device predictions (greedy, and sampled with a vote), from
a training checkpoint and from a Hugging Face directory; two processes under `jax.distributed`
(127.0.0.1, 4 simulated CPU devices each) evaluate disjoint blocks of the examples and process 0
writes every prediction once, in input order, equal to one process's.

This file is also the two-process worker: `python tests/test_sharded_eval.py --worker ...`.
"""
import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 13  # not a multiple of any batch: the last batches are padded
WORDS = "the creature lives in desert tundra eats moss answer explanation question knowledge".split()


def _vocab(d: pathlib.Path) -> pathlib.Path:
    import numpy as np
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=32, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return d / "spiece.model"


def _model_config(vocab_path):
    from kard_jax.models import t5
    from kard_jax.tokenizer import Tokenizer

    size = Tokenizer(vocab_path).base_vocab_size + 100
    return t5.preset_config("tiny", vocab_size=-(-size // 8) * 8, d_model=32, d_kv=8, d_ff=64)


def _examples(path: pathlib.Path) -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    rows = [{"id": f"q{i}", "sent1": " ".join(rng.choice(WORDS, 4)) + "?",
             **{f"ending{j}": " ".join(rng.choice(WORDS, 2)) for j in range(4)}, "label": int(i % 4)}
            for i in range(NUM_EXAMPLES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _student(cfg, model_dir: pathlib.Path):
    """A random student saved as a training checkpoint; its weights scaled up so that greedy and
    sampled outputs differ between examples (a random init at T5's scale decodes one token)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.core import meta

    from kard_jax.models import t5
    from kard_jax.training import checkpoints
    from kard_jax.training.train_state import TrainState

    tokens = jnp.ones((1, 4), jnp.int32)
    params = meta.unbox(t5.T5(cfg).init(jax.random.PRNGKey(3), tokens, tokens)["params"])
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(2)
    params = jax.tree.unflatten(treedef, [np.asarray(x) * (1.0 if x.ndim == 1 else 3.0)
                                          + (0.0 if x.ndim == 1 else 0.02 * rng.standard_normal(x.shape))
                                          for x in leaves])
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
    ckpt.save(1, TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state={}), None, {})
    ckpt.close()
    return params


def _infer(out_dir, setup, decode, mesh_config, checkpoint=None):
    from kard_jax.inference import run

    return run.infer(
        examples_path=str(setup["examples"]), out_dir=str(out_dir), model_config=setup["cfg"],
        checkpoint=str(checkpoint or setup["student"]), vocab_path=str(setup["vocab"]), passage_source="none",
        input_length=256, decode=decode, batch_size=5, dataset="obqa", mesh_config=mesh_config,
    )


def _rows(out_dir):
    return [json.loads(line) for line in (pathlib.Path(out_dir) / "predictions.jsonl").read_text().splitlines()]


def _setup(d: pathlib.Path) -> dict:
    vocab = _vocab(d)
    cfg = _model_config(vocab)
    _examples(d / "test.jsonl")
    params = _student(cfg, d / "student")
    return {"vocab": vocab, "cfg": cfg, "examples": d / "test.jsonl", "student": d / "student", "params": params}


# ----------------------------------------------------------------------------------------------------------------------
import pytest  # noqa: E402

from tests.workers import wait_for_workers  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("sharded_eval"))


GREEDY = dict(max_decode_len=12)
SAMPLED = dict(max_decode_len=12, num_samples=3, temperature=1.0, top_k=20, top_p=0.95, seed=4)


def test_params_restore_into_the_mesh_shardings(setup):
    import jax
    import numpy as np

    from kard_jax.inference import run
    from kard_jax.training import partitioning

    mesh = partitioning.MeshConfig(data=2, model=4).make_mesh()
    params = run.load_student_params(setup["student"], setup["cfg"], mesh=mesh)
    wi = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert tuple(wi.sharding.spec) == (None, "model")  # ('embed', 'mlp'): mlp over model, as in training
    assert {s.data.shape for s in wi.addressable_shards} == {(wi.shape[0], wi.shape[1] // 4)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, setup["params"])
    # A mesh that cannot shard a dimension is refused, naming the parameter and axis.
    bad = partitioning.MeshConfig(data=1, model=8).make_mesh()
    with pytest.raises(Exception, match=r"not divisible by logical axis 'heads' -> mesh axis 'model'"):
        run.load_student_params(setup["student"], setup["cfg"], mesh=bad)


@pytest.mark.parametrize("decode", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_2x4_mesh_predictions_equal_single_device(setup, tmp_path, decode):
    from kard_jax.inference import pipeline
    from kard_jax.training import partitioning

    config = pipeline.DecodeConfig(**decode)
    single = _infer(tmp_path / "single", setup, config, None)
    sharded = _infer(tmp_path / "sharded", setup, config, partitioning.MeshConfig(data=2, model=4))
    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "sharded")
    assert [r["id"] for r in b] == [f"q{i}" for i in range(NUM_EXAMPLES)]
    assert a == b
    assert len({r["texts"][0] for r in a}) > 3  # outputs differ between examples (ordering matters)
    if decode is SAMPLED:
        assert all(len(r["texts"]) == 3 for r in a) and any(len(set(r["texts"])) > 1 for r in a)
    for m in (single, sharded):
        m.pop("seconds")
    assert single == sharded


def test_hf_directory_is_placed_into_the_mesh(setup, tmp_path):
    import jax
    import numpy as np

    from kard_jax import hf_io
    from kard_jax.inference import pipeline, run
    from kard_jax.training import partitioning

    hf_dir = tmp_path / "hf"
    hf_io.export_hf(setup["params"], setup["cfg"], hf_dir)
    mesh = partitioning.MeshConfig(data=2, model=4).make_mesh()
    params = run.load_student_params(hf_dir, setup["cfg"], mesh=mesh)
    assert tuple(params["decoder"]["logits_dense"]["kernel"].sharding.spec) == (None, "model")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), params, setup["params"])
    _infer(tmp_path / "ckpt", setup, pipeline.DecodeConfig(**GREEDY), partitioning.MeshConfig(data=2, model=4))
    _infer(tmp_path / "hf_eval", setup, pipeline.DecodeConfig(**GREEDY), partitioning.MeshConfig(data=2, model=4),
           checkpoint=hf_dir)
    assert _rows(tmp_path / "ckpt") == _rows(tmp_path / "hf_eval")


def test_reranker_restores_into_the_mesh_and_scores_like_the_host(setup, tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.core import meta

    from kard_jax.inference import run
    from kard_jax.models import reranker
    from kard_jax.training import checkpoints, partitioning
    from kard_jax.training.train_state import TrainState

    model = reranker.RerankerModel(setup["cfg"], proj_dim=16)
    shapes = {"query_tokens": (1, 8), "candidate_tokens": (1, 1, 12)}
    params = meta.unbox(model.get_initial_variables(jax.random.PRNGKey(5), shapes)["params"])
    ckpt = checkpoints.Checkpointer(tmp_path / "reranker", async_save=False)
    ckpt.save(1, TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state={}), None, {})
    ckpt.close()
    mesh = partitioning.MeshConfig(data=2, model=4).make_mesh()
    host = run.load_reranker_params(tmp_path / "reranker", model, 8, 12)
    sharded = run.load_reranker_params(tmp_path / "reranker", model, 8, 12, mesh=mesh)
    sharded_leaves = jax.tree.leaves(sharded)
    assert any("model" in tuple(x.sharding.spec) for x in sharded_leaves)
    assert all(len(x.sharding.device_set) == 8 for x in sharded_leaves)
    rng = np.random.default_rng(0)
    query = rng.integers(2, 30, (4, 8)).astype(np.int32)
    cands = rng.integers(2, 30, (4, 3, 12)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(reranker.score_candidates(model, sharded, query, cands)),
                               np.asarray(reranker.score_candidates(model, host, query, cands)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
def _worker(args) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id,
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    from kard_jax.inference import passages, pipeline
    from kard_jax.training import partitioning

    seen = []
    original = passages.no_passages

    def recording(examples):  # the examples this process retrieves for (and so evaluates)
        seen.extend(e.id for e in examples)
        return original(examples)

    passages.no_passages = recording
    d = pathlib.Path(args.dir)
    setup = {"vocab": d / "spiece.model", "examples": d / "test.jsonl", "student": d / "student"}
    setup["cfg"] = _model_config(setup["vocab"])
    decode = pipeline.DecodeConfig(**json.loads(args.decode))
    _infer(d / "multi", setup, decode, partitioning.MeshConfig(data=2, model=4))
    (d / f"seen_{args.process_id}.json").write_text(json.dumps(seen))
    print(f"WORKER {args.process_id} DONE", flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_evaluate_disjoint_shares_like_one_process(tmp_path):
    import jax

    from kard_jax.inference import pipeline
    from kard_jax.training import partitioning

    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    setup = _setup(tmp_path)
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"--coordinator={coordinator}",
                               f"--process_id={pid}", f"--dir={tmp_path}", f"--decode={json.dumps(SAMPLED)}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    # The one-process reference meanwhile (8 devices, the same mesh shape).
    wait_for_workers(procs, lambda: _infer(tmp_path / "single", setup, pipeline.DecodeConfig(**SAMPLED),
                                           partitioning.MeshConfig(data=2, model=4)))

    ids = [f"q{i}" for i in range(NUM_EXAMPLES)]
    seen = [json.loads((tmp_path / f"seen_{pid}.json").read_text()) for pid in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # each process its own block
    assert sorted(seen[0] + seen[1], key=ids.index) == ids
    multi = _rows(tmp_path / "multi")
    assert [r["id"] for r in multi] == ids  # every example once, in input order
    assert multi == _rows(tmp_path / "single")
    assert (tmp_path / "multi" / "metrics.json").is_file()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--dir")
    parser.add_argument("--decode")
    _worker(parser.parse_args())
