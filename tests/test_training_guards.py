"""Trainer guards: a non-finite loss stops training with the step named (and a non-zero exit through
main), and data whose vocabulary does not fit the model's `vocab_size` is refused before step 1."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kard_jax.errors import InputError
from kard_jax.models import t5
from kard_jax.training import checkpoints, data_iterator, metrics, optimizers, partitioning, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=1,
                  num_decoder_layers=1)


class _PoisonedIterator:
    """Synthetic copy batches; batch number `poison_at` (1-based) carries NaN loss weights (the
    model then reports loss 0 but NaN gradients) or one infinite weight (loss NaN)."""

    def __init__(self, poison_at: int, poison: str):
        self.inner = data_iterator.synthetic_copy_task(batch_size=8, vocab_size=64, max_length=6, num_examples=64,
                                                       shard_index=0, num_shards=1)
        self.poison_at, self.poison, self.count = poison_at, poison, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.count += 1
        if self.count == self.poison_at:
            weights = batch["decoder_loss_weights"].copy()
            if self.poison == "nan_weights":
                weights[:] = np.nan
            else:
                weights[0, 0] = np.inf
            batch["decoder_loss_weights"] = weights
        return batch


def _main(args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("poison, message", [("inf_weight", r"training loss is nan \(gradient norm nan\) at step 3\b"),
                                             ("nan_weights", r"training loss is 0.0 \(gradient norm nan\) at step 3\b")])
def test_nan_loss_stops_at_that_step_without_saving_it(tmp_path, poison, message):
    with pytest.raises(trainer.NonFiniteLossError, match=message):
        trainer.train(model_dir=tmp_path, model=CFG, train_data=_PoisonedIterator(3, poison), train_steps=6,
                      save_period=1, log_period=10, mesh_config=partitioning.MeshConfig(data=8),
                      async_checkpointing=False)
    # Steps 1 and 2 were saved; the NaN step and anything after it were not.
    ckpt = checkpoints.Checkpointer(tmp_path, async_save=False)
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()
    assert issubclass(trainer.NonFiniteLossError, InputError)  # main: one line, exit 2


def test_diverging_run_exits_nonzero_through_main_naming_the_step(tmp_path):
    model_dir = tmp_path / "run"
    r = _main(["--gin_file=runs/train_student.gin", "--gin_file=models/t5_1_1_tiny.gin",
               "--gin_file=runs/synthetic_copy_data.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=20",
               "--gin.BATCH_SIZE=8", "--gin.LEARNING_RATE=1e30", "--gin.SAVE_PERIOD=100"])
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("kard_jax: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "training loss is" in errors[0] and "at step" in errors[0]
    step = int(errors[0].split("at step ")[1].split()[0])
    assert 1 <= step < 20
    assert not (model_dir / "checkpoints" / "20").exists()
    # TensorBoard got nothing claiming the run finished.
    losses = metrics.read_scalars(model_dir / "train").get("loss", ([], []))[1] if (model_dir / "train").exists() else []
    assert len(losses) < 20


def test_oversize_vocabulary_is_refused_before_the_first_step(tmp_path):
    data = data_iterator.synthetic_copy_task(batch_size=8, vocab_size=64, num_examples=32, shard_index=0, num_shards=1)
    data.vocab_size = 32128  # e.g. the T5 SentencePiece vocabulary the data was tokenized with
    with pytest.raises(InputError, match="vocabulary has 32128 ids but the model's vocab_size is 64"):
        trainer.train(model_dir=tmp_path, model=CFG, train_data=data, train_steps=2,
                      mesh_config=partitioning.MeshConfig(data=8))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "train").exists()


def test_token_ids_beyond_the_model_vocab_are_refused_without_vocab_info(tmp_path):
    data = data_iterator.synthetic_copy_task(batch_size=8, vocab_size=200, num_examples=32, shard_index=0, num_shards=1)
    data.vocab_size = None  # an iterator that does not know its vocabulary
    with pytest.raises(InputError, match=r"token id \d+, outside the model's vocab_size 64"):
        trainer.train(model_dir=tmp_path, model=CFG, train_data=data, train_steps=2,
                      mesh_config=partitioning.MeshConfig(data=8))


def test_oversize_vocabulary_through_main_is_one_line_exit_2(tmp_path):
    """The issue's case: a vocab-512 model gin with a larger data vocabulary (here synthetic ids)."""
    model_dir = tmp_path / "run"
    r = _main(["--gin_file=runs/train_student.gin", "--gin_file=models/t5_1_1_tiny.gin",
               "--gin_file=runs/synthetic_copy_data.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=5",
               "--gin.SYNTHETIC_VOCAB=1000"], timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("kard_jax: error:")]
    assert len(errors) == 1 and "1000" in errors[0] and "512" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (model_dir / "checkpoints" / "5").exists()


def test_seqio_iterator_reports_its_vocabulary_and_the_trainer_refuses_a_smaller_model(tmp_path):
    seqio = pytest.importorskip("seqio")
    tf = pytest.importorskip("tensorflow")
    from kard_jax.tasks import vocab as vocab_lib
    from kard_jax.tasks.batch_iterator import SeqioBatchIterator

    corpus = tmp_path / "kb.jsonl"
    words = "water plant sun light heat energy rock soil cloud rain river animal food grow magnet iron".split()
    rng = np.random.default_rng(0)
    corpus.write_text("".join(
        '{"id": "d%d", "title": "T", "text": "%s."}\n' % (i, " ".join(rng.choice(words, 12))) for i in range(200)))
    out = vocab_lib.train_sentencepiece(output_dir=str(tmp_path / "v"), corpus_paths=[str(corpus)], vocab_size=120,
                                        hard_vocab_limit=False, show_progress=False)
    vocab = vocab_lib.load_vocabulary(out, extra_ids=100)
    name = "kard_test_guard_vocab"
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    texts = [" ".join(rng.choice(words, 5)) for _ in range(16)]
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                {"inputs": texts, "targets": texts}), splits=["train"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)},
    )
    try:
        it = SeqioBatchIterator(task=name, split="train", task_feature_lengths={"inputs": 16, "targets": 16},
                                feature_converter=seqio.EncDecFeatureConverter(pack=False), batch_size=8,
                                shuffle=False, shard_index=0, num_shards=1)
        import sentencepiece as spm

        sp_pieces = spm.SentencePieceProcessor(model_file=str(vocab_lib.spiece_path(out))).get_piece_size()
        assert it.vocab_size == sp_pieces + 100 == vocab.vocab_size
        small = t5.T5Config(**{**CFG.__dict__, "vocab_size": 128})
        with pytest.raises(InputError, match=f"vocabulary has {it.vocab_size} ids but the model's vocab_size is 128"):
            trainer.train(model_dir=tmp_path / "run", model=small, train_data=it, train_steps=1,
                          mesh_config=partitioning.MeshConfig(data=8))
    finally:
        seqio.TaskRegistry.remove(name)
