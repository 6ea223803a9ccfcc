"""transformers/PyTorch T5 as an independent numerical reference for kard_jax's T5 (tests only).

Reusable by other tests (e.g. greedy-decoding parity): `to_torch_model` turns our params into a
`T5ForConditionalGeneration` through the real export path; `random_hf_model` builds a
transformers T5 with every weight randomized (seeded), untied when the config says so.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
import transformers

from kard_jax import hf_io
from kard_jax.models import t5


def to_torch_model(params: Any, cfg: t5.T5Config, tmp_dir: str | os.PathLike) -> transformers.T5ForConditionalGeneration:
    """Export `params` with `hf_io.export_hf` into `tmp_dir/hf` and load it in transformers (eval mode, fp32)."""
    out = hf_io.export_hf(params, cfg, pathlib.Path(tmp_dir) / "hf", overwrite=True)
    model = transformers.T5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    return model.eval()


def hf_config(cfg: t5.T5Config) -> transformers.T5Config:
    """The transformers config for `cfg` (through `hf_io.config_to_hf`, dropout off)."""
    fields = hf_io.config_to_hf(cfg)
    fields["dropout_rate"] = 0.0
    return transformers.T5Config(**fields)


def random_hf_model(cfg: t5.T5Config, seed: int) -> transformers.T5ForConditionalGeneration:
    """A transformers T5 for `cfg` with all weights drawn from a seeded normal: norms 1 + 0.2 N,
    embeddings and relative biases N(0, 1), linear layers N(0, 1/fan_in). Untied lm_head for
    untied configs (transformers 5 ties it at construction)."""
    model = transformers.T5ForConditionalGeneration(hf_config(cfg))
    if not cfg.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are listed once
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name == "shared.weight" or "relative_attention_bias" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)
    return model.eval()


def torch_logits(model: transformers.T5ForConditionalGeneration, encoder_tokens: np.ndarray,
                 decoder_tokens: np.ndarray) -> np.ndarray:
    """Logits [b, t, vocab] with the encoder padding mask (pad id 0) passed as attention_mask."""
    ids = torch.tensor(np.asarray(encoder_tokens), dtype=torch.long)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=(ids != 0).long(),
            decoder_input_ids=torch.tensor(np.asarray(decoder_tokens), dtype=torch.long),
        )
    return out.logits.numpy()
