"""Teacher output store, importers, the import run mode and teacher.gin."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from kard_jax.errors import InputError
from kard_jax.teacher import importers, run, store

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_write_read_roundtrip_and_atomic_replace(tmp_path):
    out = tmp_path / "teacher"
    store.write_rationales(out, {"q1": ["a", "b"], "q2": []}, {"teacher": "t", "counts": {"extra": 1}})
    assert store.read_rationales(out) == {"q1": ["a", "b"], "q2": []}
    assert store.read_rationales(out / "rationales.jsonl") == {"q1": ["a", "b"], "q2": []}
    manifest = store.read_manifest(out)
    assert manifest["counts"] == {"extra": 1, "questions": 2, "rationales": 2}
    assert manifest["teacher"] == "t" and "created" in manifest
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    # Replacing works; a failing write leaves the previous output intact and no temp dirs behind.
    store.write_rationales(out, {"q3": ["c"]}, {})
    assert store.read_rationales(out) == {"q3": ["c"]}
    with pytest.raises(TypeError):
        store.write_rationales(out, {"q4": [object()]}, {})
    assert store.read_rationales(out) == {"q3": ["c"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


def test_read_rationales_bad_input(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "rationales": ["x"]}\n{"id": "b", "rationales": "x"}\n')
    with pytest.raises(InputError, match=r"r\.jsonl, line 2, field 'rationales'"):
        store.read_rationales(path)
    path.write_text('{"id": "a", "rationales": []}\n{"id": "a", "rationales": []}\n')
    with pytest.raises(InputError, match=r"line 2, field 'id'.*duplicate"):
        store.read_rationales(path)


def test_import_chat_completion_dir(tmp_path):
    folder = tmp_path / "completions"
    folder.mkdir()
    for qid, texts in {"train-00000": ["r1", "r2"], "train-00001": ["r3"]}.items():
        body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-3.5-turbo-0301",
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        (folder / f"{qid}.json").write_text(json.dumps(body))
    (folder / "notes.txt").write_text("ignored")
    records, models = importers.import_rationales_from(folder)
    assert records == {"train-00000": ["r1", "r2"], "train-00001": ["r3"]}
    assert models == ["gpt-3.5-turbo-0301"]
    (folder / "bad.json").write_text('{"choices": [{"message": {}}]}')
    with pytest.raises(InputError, match=r"bad\.json, field 'choices\[0\]\.message\.content'"):
        importers.import_chat_completion_dir(folder)


def test_import_real_strategyqa_file(shared_data):
    records, teachers = importers.import_rationales_from(shared_data / "strategyqa" / "rationales.train.jsonl.gz")
    assert len(records) == 1603 and teachers == ["gpt-3.5-turbo-0301"]
    assert all(len(v) == 10 for v in records.values())


def _examples_file(tmp_path):
    path = tmp_path / "strategyqa" / "train.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"id": f"q{i}", "sent1": f"Question {i}?", "sent2": "", "ending0": "yes", "ending1": "no",
             "ending2": "", "ending3": "", "label": i % 2} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_import_run_mode_checks_coverage(tmp_path):
    examples = _examples_file(tmp_path)
    rat = tmp_path / "r.jsonl"
    good = "Step one, step two and step three all point the same way. So the answer is"
    rat.write_text(json.dumps({"id": "q0", "rationales": [good + " (A).", good + " (B)."]}) + "\n"
                   + json.dumps({"id": "q1", "rationales": [good + " (B)."]}) + "\n")
    with pytest.raises(InputError, match="no rationales for 1 examples"):
        run.import_rationales(examples_path=str(examples), rationales_path=str(rat), out_dir=str(tmp_path / "o"))
    report = run.import_rationales(examples_path=str(examples), rationales_path=str(rat), out_dir=str(tmp_path / "o"),
                                   allow_missing=True)
    assert store.read_rationales(tmp_path / "o") == {"q0": [good + " (A)."], "q1": [good + " (B)."], "q2": []}
    assert report.dropped["wrong_answer"] == 1
    assert store.read_manifest(tmp_path / "o")["counts"]["missing_questions"] == 1
    rat.write_text(json.dumps({"id": "zz", "rationales": []}) + "\n")
    with pytest.raises(InputError, match="not in"):
        run.import_rationales(examples_path=str(examples), rationales_path=str(rat), out_dir=str(tmp_path / "o"),
                              allow_missing=True)


def _main(*args):
    return subprocess.run([sys.executable, "-m", "kard_jax.main", "--gin_file=gin_configs/runs/teacher.gin", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_teacher_gin_dry_runs_both_modes(tmp_path):
    base = ["--gin.EXAMPLES='x.jsonl'", f"--gin.OUT_DIR='{tmp_path}/o'", "--dry_run"]
    done = _main(*base, "--gin.RATIONALES='r.jsonl'")
    assert done.returncode == 0, done.stderr
    assert "dry run OK" in done.stdout and "import_rationales" in done.stdout
    done = _main(*base, "--gin.JOB=@kard_jax.teacher.run.generate_rationales", "--gin.TEACHER_MODEL='gpt-x'")
    assert done.returncode == 0, done.stderr
    assert "JOB = @run.generate_rationales" in done.stdout
    done = _main("--gin.EXAMPLES='x.jsonl'", "--dry_run")
    assert "OUT_DIR" in done.stdout + done.stderr and "dry run OK" not in done.stdout


def test_teacher_gin_real_import_strategyqa(shared_data, tmp_path):
    out = tmp_path / "teacher"
    done = _main(f"--gin.EXAMPLES='{shared_data}/strategyqa/train.jsonl'",
                 f"--gin.RATIONALES='{shared_data}/strategyqa/rationales.train.jsonl.gz'", f"--gin.OUT_DIR='{out}'")
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    records = store.read_rationales(out)
    manifest = store.read_manifest(out)
    assert len(records) == 1603 and manifest["counts"]["questions"] == 1603
    assert manifest["counts"]["rationales"] == sum(map(len, records.values())) == manifest["counts"]["kept"]
    assert manifest["teacher"] == ["gpt-3.5-turbo-0301"]
    assert "kept" in done.stdout and str(out) in done.stdout
