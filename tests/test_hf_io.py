"""hf_io: config mapping, export -> transformers reload (model + tokenizer), bitwise round trips,
sharded / bfloat16 / torch .bin checkpoints, and clear errors with nothing written on bad input."""
import dataclasses
import io
import json
import random

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from flax.core import meta
from safetensors.numpy import load_file, save_file

from kard_jax import hf_io
from kard_jax.errors import InputError
from kard_jax.models import t5
from tests import t5_reference

UNTIED = t5.T5Config(
    vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)
TIED = t5.T5Config(
    vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
    feed_forward_proj="relu", tie_word_embeddings=True,
)
WORDS = (
    "the a cat dog bird fish horse river mountain forest stone house garden window door table chair "
    "red green blue yellow quiet loud fast slow small large old young walks runs sings sleeps eats "
    "reads writes sees hears near under over behind morning evening night winter summer"
).split()


def _init_params(cfg: t5.T5Config, seed: int = 0):
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = t5.T5(cfg).init(jax.random.PRNGKey(seed), tokens, tokens)
    return jax.tree.map(np.asarray, meta.unbox(variables["params"]))


@pytest.fixture(scope="module")
def untied_params():
    return _init_params(UNTIED)


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory) -> str:
    """A tiny SentencePiece unigram model with T5's special ids (pad 0, eos 1, unk 2)."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pi", "ne", "zu", "har"]
    words = WORDS + [a + b for a in syllables for b in syllables]
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(400)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, vocab_size=100, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(proto.getvalue())
    return str(path)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert x.shape == y.shape and x.tobytes() == y.tobytes()


def _listing(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("cfg", [UNTIED, TIED], ids=["untied", "tied"])
def test_config_round_trip_and_transformers_reading(cfg):
    hf = hf_io.config_to_hf(cfg)
    assert hf_io.config_from_hf(hf) == cfg
    assert hf["tie_word_embeddings"] is cfg.tie_word_embeddings
    reference = transformers.T5Config(**hf)  # what transformers makes of the exported config
    assert reference.scale_decoder_outputs is cfg.tie_word_embeddings
    assert reference.is_gated_act is cfg.is_gated
    assert reference.dense_act_fn == ("gelu_new" if cfg.is_gated else "relu")
    # transformers 5 writes tie_word_embeddings=true plus scale_decoder_outputs; that must win.
    assert hf_io.config_from_hf(reference.to_dict()) == cfg


def test_config_from_hub_style_files():
    base = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8, model_type="t5")
    flan = hf_io.config_from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
    assert flan.is_gated and not flan.tie_word_embeddings and flan.num_decoder_layers == 8
    original = hf_io.config_from_hf({**base, "d_ff": 2048, "num_decoder_layers": 6})  # t5-small: no tie field
    assert original.feed_forward_proj == "relu" and original.tie_word_embeddings and original.num_decoder_layers == 6
    assert hf_io.config_from_hf(base, dtype="bfloat16", dropout_rate=0.0).dtype == "bfloat16"
    with pytest.raises(InputError, match="feed_forward_proj"):
        hf_io.config_from_hf({**base, "feed_forward_proj": "gated-silu"})
    with pytest.raises(InputError, match="'d_kv'"):
        hf_io.config_from_hf({k: v for k, v in base.items() if k != "d_kv"})


# ----------------------------------------------------------------------------------- export/reload


def test_export_reloads_in_transformers_and_round_trips(untied_params, spiece_model, tmp_path):
    out = hf_io.export_hf(untied_params, UNTIED, tmp_path / "export", spiece_model=spiece_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left behind
    assert {"config.json", "generation_config.json", "model.safetensors", "spiece.model"} <= set(_listing(out))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(tokenizer).__name__ == "T5Tokenizer"
    sp = spm.SentencePieceProcessor(model_file=spiece_model)
    text = "the old horse sleeps near the river"
    ids = tokenizer(text).input_ids
    assert ids == sp.encode(text) + [1] and 2 not in ids  # real pieces, not <unk>, then </s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == sp.get_piece_size() + 100 <= UNTIED.vocab_size
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1

    model, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.scale_decoder_outputs is False
    assert model.generation_config.decoder_start_token_id == 0 and model.generation_config.eos_token_id == 1
    lm_head = model.lm_head.weight.detach().numpy()
    assert lm_head.tobytes() == untied_params["decoder"]["logits_dense"]["kernel"].T.copy().tobytes()
    assert not np.array_equal(lm_head, model.shared.weight.detach().numpy())

    cfg, params = hf_io.load_hf_params(out)
    assert cfg == UNTIED
    _assert_bitwise_equal(params, untied_params)

    # The tokenizer of an export can be carried over to the next one.
    again = hf_io.export_hf(params, cfg, tmp_path / "again", tokenizer_dir=out)
    assert transformers.AutoTokenizer.from_pretrained(again)(text).input_ids == ids


def test_sharded_bfloat16_and_torch_bin_checkpoints(tmp_path):
    hf_model = t5_reference.random_hf_model(TIED, seed=7)
    hf_model.save_pretrained(tmp_path / "single")
    _, reference = hf_io.load_hf_params(tmp_path / "single")

    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_bitwise_equal(hf_io.load_hf_params(tmp_path / "sharded")[1], reference)

    # Legacy .bin: every tied name (encoder/decoder embed_tokens, lm_head) is stored.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    state = hf_model.state_dict()
    assert {"encoder.embed_tokens.weight", "lm_head.weight"} <= set(state)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    _assert_bitwise_equal(hf_io.load_hf_params(tmp_path / "bin")[1], reference)

    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, bf16 = hf_io.load_hf_params(tmp_path / "bf16")
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), reference)
    _assert_bitwise_equal(bf16, rounded)


# --------------------------------------------------------------------------------------- bad input


def _drop_key(d, key):
    weights = load_file(d / "model.safetensors")
    del weights[key]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


def _add_key(d, key):
    weights = load_file(d / "model.safetensors")
    weights[key] = np.zeros((32, 32), np.float32)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


def _edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


BAD_INPUTS = {
    "missing_dir": (lambda d: d.rename(d.with_name("gone")), ["export", "does not exist"]),
    "missing_config": (lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    "malformed_config": (lambda d: (d / "config.json").write_text('{"d_model": 32,\n  oops}'),
                         ["config.json", "line 2", "malformed JSON"]),
    "config_missing_field": (
        lambda d: (d / "config.json").write_text(json.dumps(
            {k: v for k, v in hf_io.config_to_hf(UNTIED).items() if k != "num_heads"})),
        ["config.json", "'num_heads'"]),
    "missing_weights": (lambda d: (d / "model.safetensors").unlink(), ["export", "no weights found"]),
    "corrupt_weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{no"),
                        ["model.safetensors", "not a readable safetensors"]),
    "missing_key": (lambda d: _drop_key(d, "decoder.block.1.layer.2.DenseReluDense.wo.weight"),
                    ["model.safetensors", "'decoder.block.1.layer.2.DenseReluDense.wo.weight'", "missing"]),
    "extra_key": (lambda d: _add_key(d, "encoder.block.2.layer.0.SelfAttention.q.weight"),
                  ["model.safetensors", "'encoder.block.2.layer.0.SelfAttention.q.weight'", "unexpected"]),
    "shape_mismatch": (lambda d: _edit_config(d, d_ff=80),
                       ["model.safetensors", "'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'",
                        "(80, 32)", "(64, 32)"]),
    "tied_config_untied_weights": (lambda d: _edit_config(d, tie_word_embeddings=True),
                                   ["model.safetensors", "'lm_head.weight'", "tied"]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_one_clear_error(name, untied_params, tmp_path):
    d = hf_io.export_hf(untied_params, UNTIED, tmp_path / "export")
    corrupt, expected = BAD_INPUTS[name]
    corrupt(d)
    with pytest.raises(InputError) as error:
        hf_io.load_hf_params(d)
    for fragment in expected:
        assert fragment in str(error.value)


def _wrong_shape(params):
    bad = jax.tree.map(lambda x: x, params)
    bad["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] = np.zeros((63, 32), np.float32)
    return bad


def _missing_param(params):
    bad = jax.tree.map(lambda x: x, params)
    del bad["decoder"]["logits_dense"]
    return bad


def _fail_while_writing(monkeypatch):
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", broken_save_file)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_shape", ["params", "'encoder/layers_1/mlp/wo/kernel'", "(64, 32)", "(63, 32)"]),
        ("missing_param", ["params", "'decoder/logits_dense/kernel'", "missing"]),
        ("bad_spiece", ["bad.model", "not a SentencePiece model"]),
        ("write_fails", ["disk full"]),
        ("no_overwrite", ["export", "exists"]),
    ],
)
def test_failed_export_leaves_target_untouched(case, expected, untied_params, tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("previous export")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    before = _listing(tmp_path)
    params, kwargs = untied_params, {"overwrite": case != "no_overwrite"}
    if case == "wrong_shape":
        params = _wrong_shape(untied_params)
    elif case == "missing_param":
        params = _missing_param(untied_params)
    elif case == "bad_spiece":
        kwargs["spiece_model"] = tmp_path / "bad.model"
    elif case == "write_fails":
        _fail_while_writing(monkeypatch)
    with pytest.raises((InputError, OSError)) as error:
        hf_io.export_hf(params, UNTIED, target, **kwargs)
    for fragment in expected:
        assert fragment in str(error.value)
    assert _listing(tmp_path) == before
    assert (target / "keep.txt").read_text() == "previous export"


def test_overwrite_replaces_previous_export(untied_params, tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("previous export")
    hf_io.export_hf(untied_params, UNTIED, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert not (target / "keep.txt").exists()
    _assert_bitwise_equal(hf_io.load_hf_params(target)[1], untied_params)


def test_export_hf_gin_exports_a_training_checkpoint(tmp_path):
    """gin_configs/runs/export_hf.gin: checkpoint params -> HF directory, bitwise."""
    import gin
    import optax

    from kard_jax import gin_utils, main
    from kard_jax.training import checkpoints, train_state

    cfg = t5.preset_config("tiny")  # what models/t5_1_1_tiny.gin sets
    params = jax.tree.map(jnp.asarray, _init_params(cfg, seed=3))
    checkpointer = checkpoints.Checkpointer(tmp_path / "run", async_save=False)
    checkpointer.save(7, train_state.TrainState.create(params, optax.adamw(1e-4)), None, {"note": "test"})
    checkpointer.close()

    gin.clear_config()
    try:
        gin_utils.parse(
            ["runs/export_hf.gin", "models/t5_1_1_tiny.gin"],
            [f"MODEL_DIR = '{tmp_path / 'run'}'", f"EXPORT_DIR = '{tmp_path / 'hf'}'"],
        )
        gin.get_configurable(main.execute)()
    finally:
        gin.clear_config()
    loaded_cfg, loaded = hf_io.load_hf_params(tmp_path / "hf")
    assert loaded_cfg == cfg
    _assert_bitwise_equal(loaded, jax.tree.map(np.asarray, params))


def test_initial_params_checks_the_architecture_and_starts_training(tmp_path):
    """An HF directory initialises a training run; a config mismatch names the field first."""
    from kard_jax.models.base import EncoderDecoderModel
    from kard_jax.training import data_iterator, trainer

    cfg = t5.preset_config("tiny", vocab_size=64, d_model=32, d_kv=8, d_ff=64)
    variables = t5.T5(cfg).init(jax.random.PRNGKey(7), np.ones((1, 4), np.int32), np.ones((1, 3), np.int32))
    params = meta.unbox(variables)["params"]
    hf_io.export_hf(params, cfg, tmp_path / "hf")
    with pytest.raises(InputError, match="field 'd_ff': the checkpoint has d_ff=64 but the run's model config has 128"):
        hf_io.initial_params(tmp_path / "hf", dataclasses.replace(cfg, d_ff=128))
    data = data_iterator.synthetic_copy_task(batch_size=8, vocab_size=64, max_length=6, seed=0)
    state = trainer.train(
        model_dir=tmp_path / "run", model=EncoderDecoderModel(t5.T5(cfg)), train_data=data, train_steps=0,
        initial_checkpoint=lambda: hf_io.initial_params(tmp_path / "hf", cfg), async_checkpointing=False,
    )
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
