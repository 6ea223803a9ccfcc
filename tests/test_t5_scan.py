"""T5Config.scan_layers: the scanned network computes what the per-layer one does, exports the
same Hugging Face weights, imports from the same HF directories, decodes the same tokens, trains
to the same losses under a sharded mesh, and a checkpoint of the other layout is refused by name."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file

from kard_jax import hf_io
from kard_jax.models import decoding, t5
from kard_jax.training import checkpoints, data_iterator, optimizers, partitioning, trainer
from kard_jax.training.train_state import StateInitializer

CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=3,
                  num_decoder_layers=2, dropout_rate=0.0)
SCANNED = dataclasses.replace(CFG, scan_layers=True)


def _tokens(seed, shape, pad_from=None):
    tokens = np.random.default_rng(seed).integers(2, CFG.vocab_size, shape).astype(np.int32)
    if pad_from is not None:
        tokens[0, pad_from:] = 0  # padding in one row exercises the attention mask
    return tokens


def _unscanned_params(seed=0):
    enc, dec = _tokens(1, (2, 9)), _tokens(2, (2, 6))
    return nn.meta.unbox(t5.T5(CFG).init(jax.random.PRNGKey(seed), enc, dec)["params"])


def test_scanned_params_are_stacked_on_a_layers_axis_with_logical_names():
    enc = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: t5.T5(SCANNED).init(jax.random.PRNGKey(0), enc, enc))["params"]
    specs = nn.get_partition_spec(boxed)
    assert set(boxed["encoder"]) == {"layers", "relpos_bias", "encoder_norm"}
    kernel = boxed["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert kernel.value.shape == (3, 32, 4, 8)
    assert tuple(specs["encoder"]["layers"]["attention"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(specs["decoder"]["layers"]["mlp"]["wo"]["kernel"]) == ("layers", "mlp", "embed")
    assert boxed["decoder"]["layers"]["mlp"]["wo"]["kernel"].value.shape == (2, 64, 32)
    # The layer axis is replicated by every rules table (it is a loop, not a parallel dimension).
    for rules in (partitioning.standard_logical_axis_rules(), partitioning.fsdp_logical_axis_rules(),
                  partitioning.data_parallel_logical_axis_rules()):
        assert dict(rules)["layers"] is None
    # stack_layers turns the unscanned tree into exactly this structure.
    stacked = t5.stack_layers(_unscanned_params())
    assert jax.tree.structure(stacked) == jax.tree.structure(nn.meta.unbox(boxed))
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, nn.meta.unbox(boxed))


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scanned_logits_equal_unscanned_logits(remat_policy):
    params = _unscanned_params()
    enc, dec = _tokens(3, (3, 11), pad_from=7), _tokens(4, (3, 7))
    want = t5.T5(dataclasses.replace(CFG, remat_policy=remat_policy)).apply({"params": params}, enc, dec)
    got = t5.T5(dataclasses.replace(SCANNED, remat_policy=remat_policy)).apply(
        {"params": t5.stack_layers(params)}, enc, dec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    # unstack_layers is the exact inverse.
    back = t5.unstack_layers(t5.stack_layers(params))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_scanned_gradients_equal_unscanned_gradients():
    params = _unscanned_params()
    batch = {"enc": _tokens(5, (2, 8), pad_from=5), "dec": _tokens(6, (2, 5))}

    def loss(cfg, p):
        logits = t5.T5(cfg).apply({"params": p}, batch["enc"], batch["dec"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["dec"][..., None], -1)[..., 0])

    want = t5.stack_layers(jax.grad(lambda p: loss(CFG, p))(params))
    got = jax.grad(lambda p: loss(dataclasses.replace(SCANNED, remat_policy="full"), p))(t5.stack_layers(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4), got, want)


def test_scanned_model_exports_the_same_hf_weights_and_imports_them_back(tmp_path):
    params = _unscanned_params()
    hf_io.export_hf(params, CFG, tmp_path / "flat")
    hf_io.export_hf(t5.stack_layers(params), SCANNED, tmp_path / "scanned")
    flat, scanned = load_file(tmp_path / "flat" / "model.safetensors"), load_file(tmp_path / "scanned" / "model.safetensors")
    assert sorted(flat) == sorted(scanned) and "encoder.block.2.layer.1.DenseReluDense.wo.weight" in flat
    for key in flat:
        np.testing.assert_array_equal(scanned[key], flat[key], err_msg=key)
    assert (tmp_path / "flat" / "config.json").read_text() == (tmp_path / "scanned" / "config.json").read_text()

    # Import: the same HF directory gives the scanned layout on request, equal to stacking.
    cfg, imported = hf_io.load_hf_params(tmp_path / "flat", scan_layers=True)
    assert cfg.scan_layers
    expected = t5.stack_layers(params)
    assert jax.tree.structure(imported) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), imported, expected)
    initial = hf_io.initial_params(tmp_path / "flat", SCANNED)  # the trainer's HF initial checkpoint
    assert jax.tree.structure(initial) == jax.tree.structure(expected)


def test_scanned_model_matches_transformers_through_its_export(tmp_path):
    torch = pytest.importorskip("torch")
    from tests import t5_reference

    params = t5.stack_layers(_unscanned_params(seed=5))
    model = t5_reference.to_torch_model(params, SCANNED, tmp_path)
    enc, dec = _tokens(7, (2, 10), pad_from=6), _tokens(8, (2, 6))
    want = t5_reference.torch_logits(model, enc, dec)
    got = np.asarray(t5.T5(SCANNED).apply({"params": params}, enc, dec))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    del torch


def test_scanned_greedy_and_sampled_decodes_equal_unscanned():
    params = _unscanned_params(seed=3)
    # Sharper logits than at init so the greedy path is not decided by float noise.
    params = jax.tree.map(lambda x: x * 1.5, params)
    enc = _tokens(9, (4, 10), pad_from=6)
    flat, scanned = t5.T5(CFG), t5.T5(SCANNED)
    stacked = t5.stack_layers(params)
    want = decoding.greedy_decode(flat, params, enc, max_decode_len=8)
    got = decoding.greedy_decode(scanned, stacked, enc, max_decode_len=8)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    rng = jax.random.PRNGKey(11)
    want_s, want_lp = decoding.sample_decode(flat, params, enc, rng, max_decode_len=8, num_decodes=3, top_k=10)
    got_s, got_lp = decoding.sample_decode(scanned, stacked, enc, rng, max_decode_len=8, num_decodes=3, top_k=10)
    np.testing.assert_array_equal(np.asarray(got_s), np.asarray(want_s))
    np.testing.assert_allclose(np.asarray(got_lp), np.asarray(want_lp), atol=1e-4)
    # The scanned cache holds one stacked entry per stack, not one per layer.
    cache = t5.init_cache(scanned, stacked, 2, 10, 8)
    assert cache["decoder"]["layers"]["self_attention"]["cached_key"].shape == (2, 2, 4, 8, 8)  # layers, b, heads, kv, len


def _train(model_dir, cfg, params, steps=4, mesh=partitioning.MeshConfig(data=4, model=2)):
    data = data_iterator.synthetic_copy_task(batch_size=16, vocab_size=64, max_length=6, num_examples=64,
                                             shard_index=0, num_shards=1)
    trainer.train(
        model_dir=model_dir, model=cfg, train_data=data, train_steps=steps, log_period=1, save_period=steps,
        mesh_config=mesh, optimizer=optimizers.adamw(1e-3), initial_checkpoint=lambda: params,
        async_checkpointing=False,
    )
    from kard_jax.training import metrics

    return metrics.read_scalars(model_dir / "train")["loss"][1]


def test_scanned_training_on_a_sharded_mesh_matches_unscanned(tmp_path):
    params = _unscanned_params()
    want = _train(tmp_path / "flat", CFG, params)
    got = _train(tmp_path / "scanned", dataclasses.replace(SCANNED, remat_policy="full"), t5.stack_layers(params))
    np.testing.assert_allclose(got, want, rtol=1e-5)

    # The scanned state is sharded by the same rules: the stacked kernels split over 'model'.
    mesh = partitioning.MeshConfig(data=4, model=2).make_mesh()
    init = StateInitializer(
        lambda rng: t5.T5(SCANNED).init(rng, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"],
        optimizers.adamw(1e-3).tx, mesh, partitioning.standard_logical_axis_rules())
    spec = init.shardings.params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].spec
    assert tuple(spec) == (None, None, "model")

    # Checkpoints keep the layout they were trained in: the other layout is refused with the fix named.
    with pytest.raises(checkpoints.CheckpointMismatchError, match="scan_layers=True"):
        _train(tmp_path / "scanned", CFG, params, steps=5)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="scan_layers=False"):
        checkpoints.restore_params(tmp_path / "flat", hf_io.abstract_params(SCANNED))
    restored = checkpoints.restore_params(tmp_path / "scanned", hf_io.abstract_params(SCANNED))
    assert restored["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (3, 32, 4, 8)
