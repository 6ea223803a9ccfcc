"""train(): it learns, writes TensorBoard events that read back, evaluates; data iterator contract."""
import json

import numpy as np
import pytest

from kard_jax.errors import InputError
from kard_jax.models import t5
from kard_jax.training import data_iterator, metrics, optimizers, partitioning, trainer

CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2)


def test_train_learns_copy_task_and_logs_readable_metrics(tmp_path):
    data = data_iterator.synthetic_copy_task(batch_size=32, vocab_size=64, max_length=8, num_examples=512,
                                             shard_index=0, num_shards=1)
    eval_data = data_iterator.synthetic_copy_task(batch_size=32, vocab_size=64, max_length=8, num_examples=64,
                                                  seed=7, shuffle=False, num_epochs=1, shard_index=0, num_shards=1)
    state = trainer.train(
        model_dir=tmp_path, model=CFG, train_data=data, eval_data=eval_data, train_steps=60, eval_period=30,
        log_period=10, save_period=60, mesh_config=partitioning.MeshConfig(data=4, model=2),
        optimizer=optimizers.adamw(optimizers.make_schedule("linear_warmup", learning_rate=5e-3, warmup_steps=5)),
    )
    assert int(state.step) == 60
    train_scalars = metrics.read_scalars(tmp_path / "train")
    steps, loss = train_scalars["loss"]
    assert list(steps) == list(range(1, 61))
    assert loss[-5:].mean() < 0.8 * loss[:5].mean()  # it learns
    lr_steps, lr = train_scalars["learning_rate"]
    np.testing.assert_allclose(lr[:6], [0.0, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3], rtol=1e-5, atol=1e-9)
    for tag in ("grad_norm", "tokens_per_second", "step_seconds", "accuracy", "compile_seconds"):
        assert tag in train_scalars and np.all(np.isfinite(train_scalars[tag][1])), tag
    eval_steps, eval_loss = metrics.read_scalars(tmp_path / "eval")["loss"]
    assert list(eval_steps) == [30, 60] and eval_loss[1] < eval_loss[0]
    assert (tmp_path / "config.gin").exists()
    meta = json.loads((tmp_path / "checkpoints" / "60" / "metadata" / "metadata").read_text())
    assert meta["mesh_shape"] == {"data": 4, "model": 2} and meta["versions"]["jax"]


def test_read_scalars_keeps_last_value_of_repeated_steps(tmp_path):
    w = metrics.MetricsWriter(tmp_path)
    w.write_scalars(1, {"loss": 3.0})
    w.write_scalars(2, {"loss": 2.0})
    w.close()
    w = metrics.MetricsWriter(tmp_path)  # a resumed run repeats step 2
    w.write_scalars(2, {"loss": 1.5})
    w.write_scalars(3, {"loss": 1.0})
    w.close()
    steps, values = metrics.read_scalars(tmp_path)["loss"]
    assert list(steps) == [1, 2, 3] and list(values) == [3.0, 1.5, 1.0]


def test_in_memory_iterator_is_deterministic_resumable_and_shardable():
    examples = [{"x": np.array([i, i]), "y": np.array(i)} for i in range(10)]
    a = data_iterator.InMemoryBatchIterator(examples, batch_size=4, seed=3)
    assert isinstance(a, data_iterator.BatchIterator)
    first = [next(a)["y"].tolist() for _ in range(5)]  # 2 batches per epoch (the tail of 2 is dropped)
    state = a.get_state()
    json.dumps(state)
    rest = [next(a)["y"].tolist() for _ in range(3)]
    epoch0 = sorted(first[0] + first[1])
    assert len(set(epoch0)) == 8 and first[0] != sorted(first[0]) or first[1] != sorted(first[1])
    assert first[:2] != first[2:4]  # epochs are reshuffled
    b = data_iterator.InMemoryBatchIterator(examples, batch_size=4, seed=3)
    assert [next(b)["y"].tolist() for _ in range(5)] == first
    c = data_iterator.InMemoryBatchIterator(examples, batch_size=4, seed=3)
    c.set_state(state)
    assert [next(c)["y"].tolist() for _ in range(3)] == rest
    # Two shards (hosts) together yield exactly the global batch.
    s0 = data_iterator.InMemoryBatchIterator(examples, batch_size=4, seed=3, shard_index=0, num_shards=2)
    s1 = data_iterator.InMemoryBatchIterator(examples, batch_size=4, seed=3, shard_index=1, num_shards=2)
    assert next(s0)["y"].tolist() + next(s1)["y"].tolist() == first[0]
    one_pass = data_iterator.InMemoryBatchIterator(examples, batch_size=4, shuffle=False, num_epochs=1)
    assert [b["y"].tolist() for b in one_pass] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(InputError, match="different source"):
        c.set_state({**state, "seed": 4})
    with pytest.raises(InputError, match=r"line 3, field 'x'"):
        data_iterator.InMemoryBatchIterator(examples[:2] + [{"x": np.zeros(3), "y": np.array(0)}], batch_size=1)


def test_synthetic_copy_task_features():
    ex = data_iterator.synthetic_seq2seq_examples(task="reverse", num_examples=3, min_length=2, max_length=5, seed=1)
    for e in ex:
        n = int(e["decoder_loss_weights"].sum()) - 1
        tokens = e["encoder_input_tokens"][:n]
        assert e["encoder_input_tokens"][n] == 1 and np.all(tokens >= 2)
        np.testing.assert_array_equal(e["decoder_target_tokens"][:n], tokens[::-1])
        assert e["decoder_target_tokens"][n] == 1 and not e["decoder_target_tokens"][n + 1:].any()
        np.testing.assert_array_equal(e["decoder_input_tokens"], np.concatenate([[0], e["decoder_target_tokens"][:-1]]))
