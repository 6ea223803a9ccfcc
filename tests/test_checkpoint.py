"""Checkpoints: restore on other mesh shapes, corrupt-latest fallback, initial checkpoints."""
import pathlib

import jax
import numpy as np
import pytest

from kard_jax.models import t5
from kard_jax.models.base import EncoderDecoderModel
from kard_jax.training import checkpoints, data_iterator, optimizers, partitioning, trainer
from kard_jax.training.trainer import Trainer

CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2)
SHAPES = {"encoder_input_tokens": (8, 11), "decoder_input_tokens": (8, 11)}


def _data(**kw):
    return data_iterator.synthetic_copy_task(batch_size=8, vocab_size=64, max_length=10, num_examples=64,
                                             shard_index=0, num_shards=1, **kw)


def _trainer(mesh_shape, devices=None):
    mesh = partitioning.MeshConfig(data=mesh_shape[0], model=mesh_shape[1]).make_mesh(devices)
    return Trainer(EncoderDecoderModel(t5.T5(CFG)), optimizers.adamw(1e-3), mesh=mesh,
                   logical_axis_rules=partitioning.standard_logical_axis_rules())


def _numpy(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_checkpoint_from_4x2_restores_on_2x4_and_1x1(tmp_path):
    src = _trainer((4, 2))
    state = src.init_state(SHAPES)
    it = _data()
    for _ in range(2):
        state, _ = src.train_step(state, src.global_batch(next(it)))
    expected = _numpy(state)
    ckpt = checkpoints.Checkpointer(tmp_path, keep=2)
    ckpt.save(2, state, it.get_state(), {"note": "4x2"})
    ckpt.close()

    for shape, devices in (((2, 4), None), ((1, 1), jax.devices()[:1])):
        dst = _trainer(shape, devices)
        init = dst.initializer(SHAPES)
        restored = checkpoints.Checkpointer(tmp_path, keep=2).restore_latest(init.sharded_abstract_state)
        assert restored.step == 2 and restored.metadata == {"note": "4x2"}
        assert restored.data_iterator == it.get_state()
        for got, want in zip(_numpy(restored.state), expected):
            np.testing.assert_array_equal(got, want)
        wi = restored.state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
        assert wi.sharding.mesh.shape == dst.mesh.shape
        assert wi.sharding == init.shardings.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]


def _truncate_tree(directory: pathlib.Path) -> int:
    n = 0
    for f in directory.rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            n += 1
    return n


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, capfd):
    kw = dict(model_dir=tmp_path, model=CFG, mesh_config=partitioning.MeshConfig(data=4, model=2), save_period=2,
              log_period=2, optimizer=optimizers.adamw(1e-3), async_checkpointing=False)
    trainer.train(train_data=_data(), train_steps=4, **kw)
    assert checkpoints.Checkpointer(tmp_path).all_steps() == [2, 4]
    assert _truncate_tree(tmp_path / "checkpoints" / "4" / "state") > 0
    capfd.readouterr()

    state = trainer.train(train_data=_data(), train_steps=6, **kw)
    err = capfd.readouterr().err
    assert "checkpoint at step 4" in err and "unreadable" in err and "resuming from step 2 instead" in err
    assert "resumed from checkpoint step 2" in err
    assert int(state.step) == 6
    assert checkpoints.Checkpointer(tmp_path).all_steps() == [2, 4, 6]  # step 4 rewritten, not clobbered
    assert any((tmp_path / "corrupt_checkpoints").iterdir())


def test_mismatched_model_is_an_error_not_a_corruption(tmp_path):
    src = _trainer((8, 1))
    state = src.init_state(SHAPES)
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(1, state, None, {})
    ckpt.close()
    other = Trainer(EncoderDecoderModel(t5.T5(t5.T5Config(**{**CFG.__dict__, "d_ff": 128}))), optimizers.adamw(1e-3),
                    mesh=src.mesh, logical_axis_rules=partitioning.standard_logical_axis_rules())
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"mlp/wi_0/kernel: checkpoint \(32, 64\) vs model \(32, 128\)"):
        checkpoints.Checkpointer(tmp_path).restore_latest(other.initializer(SHAPES).sharded_abstract_state)
    assert checkpoints.Checkpointer(tmp_path).all_steps() == [1]  # not set aside


def test_initial_checkpoint_from_run_dir_or_callable(tmp_path):
    mesh_config = partitioning.MeshConfig(data=8, model=1)
    first = trainer.train(model_dir=tmp_path / "a", model=CFG, train_data=_data(), train_steps=2, save_period=2,
                          mesh_config=mesh_config, async_checkpointing=False)
    trained = jax.device_get(first.params)

    # An earlier run's MODEL_DIR: params restored, a fresh optimizer and step 0, on another mesh.
    state = trainer.train(model_dir=tmp_path / "b", model=CFG, train_data=_data(), train_steps=0,
                          mesh_config=partitioning.MeshConfig(data=2, model=4), initial_checkpoint=tmp_path / "a")
    assert int(state.step) == 0
    for got, want in zip(_numpy(state.params), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)
    mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) == 2]
    assert mu and all(not np.any(np.asarray(x)) for x in mu)

    # A callable returning params (e.g. an HF import).
    state = trainer.train(model_dir=tmp_path / "c", model=CFG, train_data=_data(), train_steps=0,
                          mesh_config=mesh_config, initial_checkpoint=lambda: trained)
    for got, want in zip(_numpy(state.params), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)

    bad = jax.tree.map(lambda x: x, trained)
    bad["decoder"]["logits_dense"]["kernel"] = np.zeros((32, 65), np.float32)
    with pytest.raises(ValueError, match=r"decoder/logits_dense/kernel.*\(32, 65\).*\(32, 64\)"):
        trainer.train(model_dir=tmp_path / "d", model=CFG, train_data=_data(), train_steps=0,
                      mesh_config=mesh_config, initial_checkpoint=lambda: bad)
