"""The same training run on different meshes / microbatch counts gives the same numbers (fp32)."""
import jax
import numpy as np
import pytest

from kard_jax.models import t5
from kard_jax.models.base import EncoderDecoderModel
from kard_jax.training import data_iterator, optimizers, partitioning
from kard_jax.training.trainer import Trainer

CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2)
STEPS = 5
BATCH = 16


def _batches(n=STEPS):
    it = data_iterator.synthetic_copy_task(batch_size=BATCH, vocab_size=64, max_length=10, num_examples=128,
                                           shard_index=0, num_shards=1)
    return [next(it) for _ in range(n)]


def _run(mesh_shape, rules, batches, microbatches=1, devices=None):
    mesh = partitioning.MeshConfig(data=mesh_shape[0], model=mesh_shape[1]).make_mesh(devices)
    trainer = Trainer(EncoderDecoderModel(t5.T5(CFG)), optimizers.adamw(3e-3, weight_decay=0.01),
                      mesh=mesh, logical_axis_rules=rules, microbatches=microbatches, seed=0)
    state = trainer.init_state({k: v.shape for k, v in batches[0].items()})
    losses = []
    for b in batches:
        state, m = trainer.train_step(state, trainer.global_batch(b))
        losses.append(float(m["loss"]))
    return np.array(losses), jax.device_get(state.params), trainer


@pytest.fixture(scope="module")
def reference():
    batches = _batches()
    losses, params, _ = _run((1, 1), partitioning.standard_logical_axis_rules(), batches, devices=jax.devices()[:1])
    return batches, losses, params


@pytest.mark.parametrize(
    "mesh_shape, rules",
    [
        ((8, 1), partitioning.standard_logical_axis_rules()),
        ((4, 2), partitioning.standard_logical_axis_rules()),
        ((2, 4), partitioning.standard_logical_axis_rules()),
        ((4, 2), partitioning.fsdp_logical_axis_rules()),
    ],
    ids=["8x1", "4x2", "2x4", "fsdp4x2"],
)
def test_loss_trajectory_and_params_match_single_device(reference, mesh_shape, rules):
    batches, ref_losses, ref_params = reference
    losses, params, trainer = _run(mesh_shape, rules, batches)
    assert ref_losses[-1] < ref_losses[0]  # it is actually training
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_params_close(params, ref_params)
    assert trainer.compile_seconds is not None and trainer.compile_seconds > 0


def _assert_params_close(params, ref_params):
    # Adam's early updates are ~lr * g / |g|: where a gradient entry is ~0, float reduction-order
    # noise (1e-9) can move that entry by a few 1e-6 (lr = 3e-3), hence atol 1e-5 on params.
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_params)[0]
    for (path, ref), got in zip(flat_ref, jax.tree.leaves(params)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=partitioning.path_str(path))


def test_microbatches_give_the_full_batch_update(reference):
    """4 microbatches on a 4x2 mesh reproduce the single-device full-batch run."""
    batches, ref_losses, ref_params = reference
    losses, params, _ = _run((4, 2), partitioning.standard_logical_axis_rules(), batches, microbatches=4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_params_close(params, ref_params)
    # The microbatches really hold different token counts, so a plain mean of their means would differ.
    b = batches[0]
    counts = b["decoder_loss_weights"].reshape(BATCH // 4, 4, -1).swapaxes(0, 1).sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1
