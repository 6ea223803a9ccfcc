"""TensorFlow-free SentencePiece tokenizer with the exact ids of `seqio.SentencePieceVocabulary`.

Training reads token ids produced by seqio (kard_jax/tasks); inference, the embedder and the
benchmarks run without TensorFlow, so they tokenize with this class. Both wrap the same
`spiece.model`: ids below the SentencePiece size are identical, ids above are T5's sentinels.
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
import sentencepiece as spm

from kard_jax.errors import InputError

PAD_ID, EOS_ID = 0, 1


class Tokenizer:
    """`encode`/`decode` text <-> ids; `batch_encode` pads to a fixed length with EOS appended."""

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        model = path / "spiece.model" if path.is_dir() else path
        if not model.is_file():
            raise InputError("SentencePiece model not found", path=model)
        self._sp = spm.SentencePieceProcessor(model_file=str(model))
        self.path = model
        self.base_vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def count_tokens(self, text: str) -> int:
        return len(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first EOS; padding and sentinel ids are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if PAD_ID < i < self.base_vocab_size:
                out.append(i)
        return self._sp.decode(out)

    def batch_encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """[len(texts), length] int32: ids + EOS, truncated (EOS kept last) and padded with 0."""
        batch = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: length - 1] + [EOS_ID]
            batch[row, : len(ids)] = ids
        return batch
