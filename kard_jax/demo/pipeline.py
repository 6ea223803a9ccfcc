"""`run_demo`: the README's main job, the whole KARD pipeline on the generated world.

world -> teacher rationales imported + filtered -> knowledge base (passage store + BM25) ->
retrieval with each rationale as the query -> SentencePiece vocabulary -> seqio `kard` task ->
sharded training of a tiny T5 student -> inference with question-retrieved passages ->
predictions + accuracy -> Hugging Face export. Every stage is the library's own run-mode
function; this module only wires their outputs together, so the demo exercises what a
researcher runs on real data (see gin_configs/runs/*.gin for each stage alone).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax

from kard_jax.data import prompts
from kard_jax.data.readers import read_examples
from kard_jax.demo import world as world_lib
from kard_jax.inference import pipeline as inference
from kard_jax.models import t5
from kard_jax.models.base import EncoderDecoderModel
from kard_jax.training import optimizers, partitioning

DATASET = "demo"
TEMPLATE = "science"  # the demo's questions read like OpenBookQA's


def _stage(name: str) -> float:
    print(f"\n== kard_jax demo: {name}", flush=True)
    return time.time()


def run_demo(
    *,
    output_dir: str,
    model_config: t5.T5Config,
    world: world_lib.WorldConfig = world_lib.WorldConfig(),
    vocab_size: int = 400,
    n_passages: int = 1,
    input_length: int = 192,
    target_length: int = 64,
    batch_size: int = 16,
    train_steps: int = 400,
    optimizer: optimizers.Optimizer | None = None,
    mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
    decode: inference.DecodeConfig = inference.DecodeConfig(max_decode_len=64),
    seed: int = 0,
) -> dict:
    """Runs every stage into output_dir and returns (and writes) a summary with the test accuracy."""
    # TensorFlow/seqio enter only through kard_jax.tasks, imported here so that `--dry_run` stays light.
    from kard_jax import hf_io
    from kard_jax.knowledge import run as knowledge
    from kard_jax.tasks import batch_iterator, feature_converters, registry, vocab
    from kard_jax.teacher import run as teacher
    from kard_jax.tokenizer import Tokenizer
    from kard_jax.training import trainer

    out = pathlib.Path(output_dir)
    timings: dict[str, float] = {}

    t = _stage("generate the miniature world")
    world_dir = world_lib.write_world(out / "world", world)
    timings["world"] = time.time() - t

    t = _stage("import and filter teacher rationales")
    report = teacher.import_rationales(
        examples_path=str(world_dir / "train.jsonl"), rationales_path=str(world_dir / "rationales.train.jsonl"),
        out_dir=str(out / "rationales"), dataset=DATASET,
    )
    timings["rationales"] = time.time() - t

    t = _stage("build the knowledge base (passage store + BM25)")
    knowledge.build_kb(corpus_paths=[str(world_dir / "kb.jsonl")], kb_dir=str(out / "kb"))
    timings["kb"] = time.time() - t

    t = _stage("retrieve passages with each rationale as the query")
    knowledge.retrieve(
        examples_path=str(world_dir / "train.jsonl"), kb_dir=str(out / "kb"), output_dir=str(out / "retrieval"),
        rationales_path=str(out / "rationales"), dataset=DATASET,
    )
    timings["retrieve"] = time.time() - t

    t = _stage("train a SentencePiece vocabulary")
    vocab_dir = vocab.train_sentencepiece(
        output_dir=str(out / "vocab"), corpus_paths=[str(world_dir / "kb.jsonl")],
        dataset_paths=[str(world_dir / "train.jsonl"), str(world_dir / "rationales.train.jsonl")],
        vocab_size=vocab_size, hard_vocab_limit=False, seed=seed,
    )
    timings["vocab"] = time.time() - t
    spm_vocab = vocab.load_vocabulary(vocab_dir)
    if spm_vocab.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"vocabulary has {spm_vocab.vocab_size} ids (with T5's 100 sentinels) but the model's "
            f"vocab_size is {model_config.vocab_size}; lower vocab_size or raise t5.preset_config.vocab_size"
        )

    t = _stage("register seqio tasks and train the student")
    registry.register_kard_tasks(
        DATASET, train_path=str(world_dir / "train.jsonl"), vocab_path=str(vocab_dir),
        rationales_path=str(out / "rationales"), retrieval_cache_dir=str(out / "retrieval"),
        kb_dir=str(out / "kb"), n_passages=n_passages, input_length=input_length,
        target_length=target_length, prompt_template=TEMPLATE,
    )
    train_data = batch_iterator.SeqioBatchIterator(
        task=registry.task_name(DATASET, "kard"), split="train",
        task_feature_lengths={"inputs": input_length, "targets": target_length},
        feature_converter=feature_converters.student_feature_converter(), batch_size=batch_size, seed=seed,
    )
    model = EncoderDecoderModel(t5.T5(model_config))
    state = trainer.train(
        model_dir=str(out / "student"), model=model, train_data=train_data, train_steps=train_steps,
        optimizer=optimizer or optimizers.adamw(learning_rate=1e-3), mesh_config=mesh_config,
        save_period=train_steps, log_period=max(1, train_steps // 20), seed=seed,
    )
    timings["train"] = time.time() - t

    t = _stage("inference on the test split: question -> BM25 passages -> student -> answer")
    test = read_examples(world_dir / "test.jsonl", format="kard", dataset=DATASET)
    params = jax.device_get(state.params)
    predictions = inference.predict(
        test, model=t5.T5(model_config), params=params, tokenizer=Tokenizer(vocab_dir),
        passages_for=inference.bm25_question_passages(out / "kb", n_passages), input_length=input_length,
        decode=decode, batch_size=batch_size, template=prompts.template_for(TEMPLATE),
    )
    metrics = inference.score(predictions)
    # Knowledge use, apart from answering: does the generated rationale name the gold option
    # (a fact only the retrieved passage holds)? Chance is about 1 in 4.
    metrics["rationale_names_gold_option"] = sum(
        e.answer_text in p.texts[0] for e, p in zip(test, predictions)
    ) / len(test)
    inference.write_predictions(out / "predictions", predictions, metrics)
    timings["inference"] = time.time() - t

    t = _stage("export the student for transformers")
    hf_io.export_hf(params, model_config, out / "hf_student", spiece_model=vocab_dir / "spiece.model", overwrite=True)
    timings["export"] = time.time() - t

    summary = {
        "test_accuracy": metrics["accuracy"],
        "chance_accuracy": 0.25,
        "rationale_names_gold_option": metrics["rationale_names_gold_option"],
        "num_test": metrics["num_examples"],
        "unparsed": metrics["num_unparsed"],
        "rationales_kept": getattr(report, "kept", None),
        "train_steps": train_steps,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "hf_export": str(out / "hf_student"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nkard_jax demo done after {train_steps} steps: test accuracy {summary['test_accuracy']:.3f} "
          f"(chance 0.25); the student's rationale names the gold option for "
          f"{summary['rationale_names_gold_option']:.0%} of test questions; outputs in {out}")
    return summary
