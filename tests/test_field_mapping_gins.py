"""A file in another layout goes through the stages' run gins with gin settings only:
retrieve.gin (keyed JSON object, options as a letter dict, answers as option text) and
infer.gin on an unlabeled file (predictions written, no accuracy, and it says so)."""
import json
import subprocess
import sys

import jax

from kard_jax import hf_io
from kard_jax.models import t5
from kard_jax.tasks import vocab
from tests.test_gin_configs import ROOT

LAYOUTS = ROOT / "tests" / "fixtures" / "layouts"


def _main(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "kard_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_retrieve_and_infer_gins_take_a_field_mapping(tmp_path):
    _main("--gin_file=gin_configs/runs/build_kb.gin", f"--gin.CORPUS_PATHS=['{LAYOUTS / 'kb.jsonl'}']",
          f"--gin.KB_PATH='{tmp_path / 'kb'}'", cwd=ROOT)
    _main("--gin_file=gin_configs/runs/retrieve.gin", f"--gin.EXAMPLES_PATH='{LAYOUTS / 'keyed_dict.json'}'",
          f"--gin.KB_PATH='{tmp_path / 'kb'}'", f"--gin.OUTPUT_DIR='{tmp_path / 'retrieval'}'",
          "--gin.DATASET='obqa'", "--gin.QUESTION_TOP_K=2", "--gin.EXAMPLES_FORMAT=%FIELD_MAPPING",
          "--gin.readers.FieldMapping.options_field='options'", cwd=ROOT)
    rows = [json.loads(line) for line in
            (tmp_path / "retrieval" / "question_candidates-00000-of-00001.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["0", "1", "2"]  # the keyed object's row keys
    assert [r["candidate_ids"][0] for r in rows] == ["k1", "k2", "k3"]

    cfg = t5.preset_config("tiny", vocab_size=512, d_model=32, d_kv=8, d_ff=64)
    vocab_dir = vocab.train_sentencepiece(output_dir=str(tmp_path / "vocab"), corpus_paths=[str(LAYOUTS / "kb.jsonl")],
                                          dataset_paths=[str(LAYOUTS / "unlabeled.jsonl")], vocab_size=120,
                                          hard_vocab_limit=False, show_progress=False)
    params = t5.T5(cfg).init(jax.random.PRNGKey(0), jax.numpy.ones((1, 4), jax.numpy.int32),
                             jax.numpy.ones((1, 4), jax.numpy.int32))["params"]
    hf_io.export_hf(jax.device_get(params), cfg, tmp_path / "student", spiece_model=vocab_dir / "spiece.model")
    proc = _main("--gin_file=gin_configs/runs/infer.gin", "--gin_file=gin_configs/models/t5_1_1_tiny.gin",
                 "--gin.t5.preset_config.d_model=32", "--gin.t5.preset_config.d_kv=8", "--gin.t5.preset_config.d_ff=64",
                 f"--gin.EXAMPLES_PATH='{LAYOUTS / 'unlabeled.jsonl'}'", f"--gin.CHECKPOINT='{tmp_path / 'student'}'",
                 f"--gin.VOCAB_PATH='{vocab_dir}'", f"--gin.KB_DIR='{tmp_path / 'kb'}'",
                 f"--gin.OUT_DIR='{tmp_path / 'eval'}'", "--gin.DATASET='obqa'", "--gin.INPUT_LENGTH=256",
                 "--gin.MAX_DECODE_LEN=4", "--gin.EXAMPLES_FORMAT=%FIELD_MAPPING",
                 "--gin.readers.FieldMapping.options_field='choices'", "--gin.readers.FieldMapping.answer=None",
                 cwd=ROOT)
    assert "n/a (unlabeled examples)" in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] is None and metrics["num_examples"] == 3
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t1", "t2", "t3"] and all(r["gold"] is None for r in rows)
    assert all(r["correct"] is None and len(r["passages"]) == 1 for r in rows)
