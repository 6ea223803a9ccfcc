"""LoRA: only the adapters change during training; merged weights score like base + adapters
computed in the forward pass (an independent implementation via flax method interception); the
merged BERT encoder exports to a directory transformers loads; adapters save and load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import meta

from kard_jax import hf_bert_io
from kard_jax.models import bert, lora, reranker, t5
from kard_jax.training import data_iterator, optimizers, partitioning, trainer

BERT_CFG = bert.preset_config("tiny", vocab_size=64)
SHAPES = {"query_tokens": (1, 6), "candidate_tokens": (1, 4, 7)}


def _batch(seed=0, b=8, n=4, lq=6, lc=7):
    rng = np.random.default_rng(seed)
    q = np.zeros((b, lq), np.int32)
    c = np.zeros((b, n, lc), np.int32)
    for i in range(b):
        k = int(rng.integers(2, lq + 1))
        q[i, :k] = rng.integers(2, 64, k)
        for j in range(n):
            m = int(rng.integers(1, lc + 1))
            c[i, j, :m] = rng.integers(2, 64, m)
    labels = rng.normal(size=(b, n)).astype(np.float32) * 3
    return {"query_tokens": q, "candidate_tokens": c, "labels": labels, "candidate_mask": np.ones((b, n), np.int32)}


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _trained(tmp_path, model, config, params, steps=4):
    rows = [{k: v[i] for k, v in _batch(seed=1).items()} for i in range(8)]
    state = trainer.train(
        model_dir=tmp_path, model=model, train_data=data_iterator.InMemoryBatchIterator(rows, batch_size=8, seed=0),
        train_steps=steps, save_period=steps, log_period=1, mesh_config=partitioning.MeshConfig(data=8, model=1),
        optimizer=lora.lora_optimizer(optimizers.adamw(1e-2, weight_decay=0.1), config),
        initial_checkpoint=lambda: params, async_checkpointing=False)
    return jax.device_get(state.params)


@pytest.mark.parametrize("trainable", [(), ("projection",)], ids=["adapters_only", "adapters+projection"])
def test_only_adapters_change_during_training(tmp_path, trainable):
    config = lora.LoraConfig(rank=4, alpha=8.0, target_modules=("query", "value"), trainable_modules=trainable)
    model = lora.LoraModel(reranker.RerankerModel(BERT_CFG, proj_dim=16), config)
    params = meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"])
    # Adapters sit on every layer's query and value projections, rank 4, B = 0 at the start.
    adapters = _flat(params["lora"])
    assert sorted(adapters) == sorted(f"encoder/layers_{i}/attention/{m}/{ab}" for i in range(2)
                                      for m in ("query", "value") for ab in ("lora_a", "lora_b"))
    assert adapters["encoder/layers_0/attention/query/lora_a"].shape == (32, 4)
    assert adapters["encoder/layers_0/attention/query/lora_b"].shape == (4, 4, 8)
    assert all(not v.any() for k, v in adapters.items() if k.endswith("lora_b"))

    after = _trained(tmp_path, model, config, params)
    before, now = _flat(params), _flat(after)
    changed = {k for k in before if not np.array_equal(before[k], now[k])}
    lora_keys = {k for k in before if k.startswith("lora/")}
    projection = {k for k in before if k.startswith("base/projection/")}
    assert lora_keys <= changed  # every adapter (A too, once B is non-zero) was trained ...
    # ... and nothing else (weight decay 0.1 would have moved any other matrix it reached).
    assert changed == lora_keys | (projection if trainable else set())
    assert len(before) - len(changed) > 20


def _unmerged_scores(model, params, batch):
    """base + adapters in the forward pass: every target Dense returns x W + b + s (x A) B."""
    config, adapters = model.config, params["lora"]

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or mod.name not in config.target_modules or not isinstance(mod, bert.Dense):
            return out
        node = adapters
        for name in mod.scope.path:  # module names below the reranker
            node = node[name]
        x = args[0]
        n = mod.contract_dims
        xa = jnp.tensordot(x, node["lora_a"], axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        return out + config.scaling * jnp.tensordot(xa, node["lora_b"], axes=1)

    with nn.intercept_methods(interceptor):
        return np.asarray(model.model.module.apply({"params": params["base"]}, jnp.asarray(batch["query_tokens"]),
                                                   jnp.asarray(batch["candidate_tokens"])))


@pytest.mark.parametrize("head", ["late_interaction", "dual_encoder"])
def test_merged_model_scores_like_base_plus_adapters(tmp_path, head):
    config = lora.LoraConfig(rank=3, alpha=6.0, target_modules=("query", "value", "out"))
    model = lora.LoraModel(reranker.RerankerModel(BERT_CFG, proj_dim=16, head=head), config)
    params = meta.unbox(model.get_initial_variables(jax.random.PRNGKey(1), SHAPES)["params"])
    rng = np.random.default_rng(0)  # non-zero B, as after training
    params["lora"] = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32), params["lora"])
    batch = _batch(seed=2, b=2)
    merged = lora.merge_params(params, config)
    got = np.asarray(reranker.score_candidates(model.model, merged, batch["query_tokens"], batch["candidate_tokens"]))
    want = _unmerged_scores(model, params, batch)
    base_only = np.asarray(reranker.score_candidates(model.model, params["base"], batch["query_tokens"],
                                                     batch["candidate_tokens"]))
    assert np.abs(want - base_only).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # score_candidates merges a LoraModel's params itself; predict_batch too.
    np.testing.assert_allclose(np.asarray(reranker.score_candidates(model, params, batch["query_tokens"],
                                                                    batch["candidate_tokens"])), got, atol=1e-6)
    # The attention output kernel [heads, kv, embed] got adapters over its two input dims.
    assert params["lora"]["encoder"]["layers_0"]["attention"]["out"]["lora_a"].shape == (4, 8, 3)

    # Merged weights export to a transformers BertModel with the merged encoder's outputs.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = hf_bert_io.export_hf(merged["encoder"], BERT_CFG, tmp_path / "merged")
    ids = batch["candidate_tokens"][0]
    with torch.no_grad():
        ref = transformers.BertModel.from_pretrained(str(out)).eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != 0)).last_hidden_state
    mine = np.asarray(bert.BertEncoder(BERT_CFG).apply({"params": merged["encoder"]}, jnp.asarray(ids)))
    np.testing.assert_allclose(mine[ids != 0], ref.numpy()[ids != 0], atol=1e-4)


def test_t5_backbone_adapters_and_save_load(tmp_path):
    cfg = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                      num_decoder_layers=2)
    config = lora.LoraConfig(rank=2, target_modules=("query", "value", "wo"), trainable_modules=("projection",))
    model = lora.LoraModel(reranker.RerankerModel(cfg, proj_dim=8), config)
    params = meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"])
    a = params["lora"]["encoder"]["layers_1"]["mlp"]["wo"]
    assert a["lora_a"].shape == (64, 2) and a["lora_b"].shape == (2, 32)
    params["lora"] = jax.tree.map(lambda x: x + 0.5, params["lora"])
    saved = lora.adapter_params(params, config)
    assert set(saved) == {k for k in _flat(params) if k.startswith("lora/") or k.startswith("base/projection/")}
    lora.save_adapters(params, config, tmp_path / "adapters")
    fresh = meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)["params"])
    loaded = _flat(lora.load_adapters(fresh, tmp_path / "adapters"))
    for k, v in _flat(params).items():
        np.testing.assert_array_equal(loaded[k], v)
    with pytest.raises(ValueError, match="match no kernel"):
        lora.LoraModel(reranker.RerankerModel(cfg), lora.LoraConfig(target_modules=("nope",))).get_initial_variables(
            jax.random.PRNGKey(0), SHAPES)
