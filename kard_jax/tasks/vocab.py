"""The student's SentencePiece vocabulary: load a T5 one, or train one offline (T5 conventions).

`load_vocabulary` accepts a Hugging Face T5 directory (its `spiece.model`), a directory written by
`train_sentencepiece`, or a `.model` file, and returns `seqio.SentencePieceVocabulary` with the 100
sentinel ids T5 appends (`<extra_id_0>` .. `<extra_id_99>`).

`train_sentencepiece` is a run mode (gin_configs/runs/build_vocab.gin) for machines without a
pretrained vocabulary: a unigram model with T5's special ids (pad=0, eos=1, unk=2, no bos) trained
on a knowledge corpus plus benchmark / rationale files. The output directory (`spiece.model`,
`spiece.vocab`, `manifest.json`) is written atomically.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import pathlib
import random
import time
from typing import Iterator, Sequence

import seqio
import sentencepiece as spm
from tqdm.auto import tqdm

from kard_jax.data import prompts
from kard_jax.data.readers import iter_json_records, open_text
from kard_jax.errors import InputError
from kard_jax.knowledge import atomic

SPIECE_FILENAME = "spiece.model"
T5_EXTRA_IDS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# JSON keys that hold identifiers or labels, not text to learn pieces from.
_NON_TEXT_KEYS = frozenset({"id", "ids", "question_id", "passage_id", "teacher", "label", "answer_idx", "topic"})


def spiece_path(path: str | os.PathLike) -> pathlib.Path:
    """The `.model` file behind `path` (a file, or a directory holding `spiece.model`)."""
    path = pathlib.Path(path)
    model = path / SPIECE_FILENAME if path.is_dir() else path
    if not model.is_file():
        hint = f" (a directory must contain {SPIECE_FILENAME})" if path.is_dir() else ""
        raise InputError(
            f"SentencePiece vocabulary not found{hint}; train one with gin_configs/runs/build_vocab.gin",
            path=model,
        )
    return model


class HFTokenizerVocabulary(seqio.Vocabulary):
    """A Hugging Face WordPiece tokenizer directory (BERT, MiniLM, LinkBERT: vocab.txt /
    tokenizer.json) as a seqio vocabulary, for the reranker task of a BERT-family backbone.

    `encode` gives [CLS] + word pieces with exactly the ids of the directory's own (fast)
    tokenizer; seqio's EOS is [SEP], so a feature with add_eos reads [CLS] .. [SEP] as BERT
    expects. Padding is id 0, which must be the tokenizer's [PAD] (BERT vocabularies; RoBERTa's
    pad id 1 is refused). The TensorFlow side runs the same tokenizer through `tf.py_function`.
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = pathlib.Path(path)
        self._tok = AutoTokenizer.from_pretrained(str(self.path))
        # Inputs are cut to the model's lengths by the caller; whole texts are tokenized on purpose (to
        # count or trim), which transformers would warn about once per long passage.
        self._tok.model_max_length = 1 << 30
        if self._tok.pad_token_id != PAD_ID or self._tok.cls_token_id is None or self._tok.sep_token_id is None:
            raise InputError(f"a reranker vocabulary needs [PAD]=0, [CLS] and [SEP] (got pad id "
                             f"{self._tok.pad_token_id}); RoBERTa-style tokenizers are not supported here",
                             path=self.path)
        super().__init__(extra_ids=0)

    @property
    def _base_vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return int(self._tok.sep_token_id)

    @property
    def unk_id(self) -> int:
        return int(self._tok.unk_token_id)

    def _encode(self, s: str) -> list[int]:
        return [int(self._tok.cls_token_id)] + list(self._tok(s, add_special_tokens=False)["input_ids"])

    def _decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s):
        import numpy as np
        import tensorflow as tf

        def py_encode(strings):
            rows = [self._encode(x.decode("utf-8")) for x in strings.numpy().reshape(-1)]
            return (np.array([i for r in rows for i in r], np.int32), np.array([len(r) for r in rows], np.int64))

        s = tf.convert_to_tensor(s)
        flat, lengths = tf.py_function(py_encode, [tf.reshape(s, [-1])], [tf.int32, tf.int64])
        flat.set_shape([None])
        lengths.set_shape([None])
        ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)
        return ragged[0] if s.shape.rank == 0 else ragged

    def _decode_tf(self, ids):
        import tensorflow as tf

        return tf.py_function(lambda x: self._decode(x.numpy().tolist()), [ids], tf.string)

    def __eq__(self, other):
        return isinstance(other, HFTokenizerVocabulary) and other.path == self.path

    def __hash__(self):
        return hash(("HFTokenizerVocabulary", str(self.path)))


def is_hf_tokenizer_dir(path: str | os.PathLike) -> bool:
    """A directory holding a Hugging Face WordPiece tokenizer and no SentencePiece model."""
    path = pathlib.Path(path)
    return (path.is_dir() and not (path / SPIECE_FILENAME).is_file()
            and any((path / n).is_file() for n in ("vocab.txt", "tokenizer.json")))


def load_vocabulary(path: str | os.PathLike, *, extra_ids: int = T5_EXTRA_IDS) -> seqio.Vocabulary:
    """`seqio.SentencePieceVocabulary` from a T5 directory / trained directory / `.model` file, or
    `HFTokenizerVocabulary` from a BERT-family Hugging Face directory (vocab.txt / tokenizer.json)."""
    if is_hf_tokenizer_dir(path):
        return HFTokenizerVocabulary(path)
    model = spiece_path(path)
    vocab = seqio.SentencePieceVocabulary(str(model), extra_ids=extra_ids)
    try:
        vocab.tokenizer  # load now so a corrupt file fails here, not inside tf.data
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
        raise InputError(f"not a SentencePiece model ({e})", path=model) from None
    if vocab.eos_id != EOS_ID or vocab.pad_id != PAD_ID:
        raise InputError(
            f"vocabulary must use T5 ids pad={PAD_ID}, eos={EOS_ID}; got pad={vocab.pad_id}, eos={vocab.eos_id}",
            path=model,
        )
    return vocab


def token_counter(vocab: seqio.Vocabulary):
    """`count_tokens(text)` for prompt truncation: the number of ids `vocab` encodes `text` to."""
    return lambda text: len(vocab.encode(text))


def iter_texts(path: str | os.PathLike) -> Iterator[str]:
    """Text of a training file: every string in each JSON line (except ids/labels), or plain lines.

    Handles the knowledge-base format (`title`, `text`), the KARD benchmark format (`sent1`,
    `ending0..3`) and rationale files (`rationales: [...]`); `.gz` is decompressed. Files whose
    name does not end in .jsonl/.json(.gz) are read as one sentence per line.
    """
    path = pathlib.Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if not path.is_file():
        raise InputError("vocabulary training file not found", path=path)
    if name.endswith((".jsonl", ".json")):
        for _, obj in iter_json_records(path):
            yield from _strings(obj)
    else:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def _strings(value, key: str | None = None) -> Iterator[str]:
    if key in _NON_TEXT_KEYS:
        return
    if isinstance(value, str):
        if value.strip():
            yield value.strip()
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)


def _prompt_sentences() -> list[str]:
    """The fixed wording of every student prompt, so it gets compact pieces."""
    out = []
    for template in prompts.TEMPLATES.values():
        out += [template.instruction, template.knowledge_prefix.strip(), template.cue]
    out += [prompts.ANSWER_PREFIX + letter for letter in "ABCDE"]
    out += ["Question: " + " ".join(f"{letter}. option" for letter in "ABCDE")]
    return out


def train_sentencepiece(
    *,
    output_dir: str,
    corpus_paths: Sequence[str],
    dataset_paths: Sequence[str] = (),
    vocab_size: int = 32000,
    max_sentences: int = 2_000_000,
    max_sentence_chars: int = 4192,
    character_coverage: float = 0.9999,
    hard_vocab_limit: bool = True,
    seed: int = 0,
    num_threads: int = 2,
    show_progress: bool = True,
) -> pathlib.Path:
    """Train a T5-style SentencePiece unigram model and write `output_dir/spiece.model` atomically.

    Sentences come from `corpus_paths` (knowledge bases) and `dataset_paths` (benchmark and
    rationale files), plus the prompt templates; when there are more than `max_sentences`, a
    seeded reservoir sample is used. Ids: pad=0, eos=1, unk=2, no bos (seqio adds the 100
    `<extra_id_*>` sentinels on load). Returns the output directory.
    """
    if not corpus_paths and not dataset_paths:
        raise InputError("train_sentencepiece needs at least one corpus or dataset file", field="corpus_paths")
    start = time.time()
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    files = [*corpus_paths, *dataset_paths]
    for path in files:
        for text in tqdm(iter_texts(path), desc=f"vocab text {pathlib.Path(path).name}", disable=not show_progress,
                         unit=" texts"):
            text = " ".join(text.split())[:max_sentence_chars]
            seen += 1
            if len(sample) < max_sentences:
                sample.append(text)
            else:  # reservoir sampling keeps a uniform sample of everything seen
                j = rng.randrange(seen)
                if j < max_sentences:
                    sample[j] = text
    # Every student input and target carries this wording, so weight it as the inputs do
    # (once per ~50 sentences) instead of once: it then gets whole-word pieces, never <unk>.
    sample += _prompt_sentences() * max(1, len(sample) // 50)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit,
        input_sentence_size=0,  # already sampled above
        max_sentence_length=max_sentence_chars * 4,
        num_threads=num_threads,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with atomic.atomic_directory(output_dir) as tmp:
        (tmp / SPIECE_FILENAME).write_bytes(model.getvalue())
        with open(tmp / "spiece.vocab", "w", encoding="utf-8") as f:
            for i in range(processor.get_piece_size()):
                f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n")
        manifest = {
            "format": "kard_jax.sentencepiece/1",
            "model_type": "unigram",
            "vocab_size": processor.get_piece_size(),
            "extra_ids_on_load": T5_EXTRA_IDS,
            "special_ids": {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": None},
            "inputs": [str(p) for p in files],
            "sentences_seen": seen,
            "sentences_used": len(sample),
            "seed": seed,
            "sentencepiece_version": spm.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(
        f"kard_jax: vocabulary {output_dir}/{SPIECE_FILENAME}: {processor.get_piece_size()} pieces "
        f"(+{T5_EXTRA_IDS} extra ids) from {len(sample)} sentences in {time.time() - start:.1f}s"
    )
    return pathlib.Path(output_dir)

