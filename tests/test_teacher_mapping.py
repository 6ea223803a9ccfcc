"""Rationale import with a mapping: rows per rationale or per question, joined by id or question
text, predicted answers in a separate field (wrong ones dropped), refusal when the wrong-answer
filter cannot work, and one-line errors from `python -m kard_jax.main` with nothing written."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from kard_jax.data.readers import FieldMapping
from kard_jax.errors import InputError
from kard_jax.teacher import run, store
from kard_jax.teacher.importers import RationaleMapping

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "layouts"
ARRAY = FIXTURES / "array_list.json"  # ids "101".."103"
ARRAY_MAPPING = FieldMapping(id="qid", question="meta.question", options_field="choices", answer="gold")
PER_ROW = FIXTURES / "rationales_per_row.jsonl"
PER_ROW_MAPPING = RationaleMapping(id=None, question="question", rationales=None, rationale="text", answer="pred")
RIGHT = [
    "During photosynthesis a leaf absorbs carbon dioxide and gives off oxygen to the air.",
    "An apple falls from a tree because the Earth attracts every mass near it.",
    "The heart is a muscle whose beats push blood through the arteries and veins.",
]
WRONG = [
    "Leaves release oxygen all day, which is the gas plants use to make their food.",
    "Rubbing surfaces hold things back, and this pulling down makes everything fall.",
]
UNJUDGED = "Breathing moves air in and out, and that motion carries blood around the body."


def _import(tmp_path, **kwargs):
    args = dict(examples_path=str(ARRAY), format=ARRAY_MAPPING, out_dir=str(tmp_path / "out"))
    return run.import_rationales(**(args | kwargs))


def test_per_question_rows_with_answer_objects_joined_by_id(tmp_path):
    mapping = RationaleMapping(id="qid", rationales="samples", rationale="text", answer="answer", teacher="model")
    report = _import(tmp_path, rationales_path=str(FIXTURES / "rationales_per_question.jsonl"),
                     rationale_mapping=mapping)
    # 101: (B) kept, (A) dropped; 102: (C) kept; 103: (B) kept, (A) -- the unjudged text, here judged wrong.
    assert store.read_rationales(tmp_path / "out") == {"101": [RIGHT[0]], "102": [RIGHT[1]], "103": [RIGHT[2]]}
    assert report.dropped["wrong_answer"] == 2 and report.answers_from_field == 5 and report.unjudged == 0
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest["teacher"] == ["fixture-teacher"] and manifest["counts"]["answers_from_field"] == 5


def test_per_rationale_rows_joined_by_question_text(tmp_path):
    report = _import(tmp_path, rationales_path=str(PER_ROW), rationale_mapping=PER_ROW_MAPPING)
    assert store.read_rationales(tmp_path / "out") == {"101": [RIGHT[0]], "102": [RIGHT[1]],
                                                       "103": [RIGHT[2], UNJUDGED]}
    assert (report.rationales_in, report.kept, report.dropped["wrong_answer"]) == (6, 4, 2)
    assert (report.answer_checked, report.unjudged) == (6, 1)


def test_parallel_answer_list_and_text_answers(tmp_path):
    rows = [{"id": 101, "rationales": [RIGHT[0], WRONG[0]], "preds": ["The answer is (B).", "oxygen"]},
            {"id": 102, "rationales": [RIGHT[1], WRONG[1]], "preds": [2, "friction"]},
            {"id": 103, "rationales": [RIGHT[2]], "preds": ["heart"]}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = _import(tmp_path, rationales_path=str(path), rationale_mapping=RationaleMapping(answer="preds"))
    assert store.read_rationales(tmp_path / "out") == {"101": [RIGHT[0]], "102": [RIGHT[1]], "103": [RIGHT[2]]}
    assert report.dropped["wrong_answer"] == 2
    rows[1]["preds"] = [2]  # not parallel
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"r\.jsonl, line 2, field 'preds': expected a list of 2 answers"):
        _import(tmp_path, rationales_path=str(path), rationale_mapping=RationaleMapping(answer="preds"))


def test_no_findable_answer_refuses_unless_allowed(tmp_path, capsys):
    no_answer_field = RationaleMapping(id=None, question="question", rationales=None, rationale="text")
    with pytest.raises(InputError, match="no answer field is mapped.*wrong-answer filter cannot work") as err:
        _import(tmp_path, rationales_path=str(PER_ROW), rationale_mapping=no_answer_field)
    assert "6 of 6 rationales" in str(err.value) and "allow_unjudged=True" in str(err.value)
    assert not (tmp_path / "out").exists()
    report = _import(tmp_path, rationales_path=str(PER_ROW), rationale_mapping=no_answer_field, allow_unjudged=True)
    assert report.kept == 6 and report.unjudged == 6 and report.dropped["wrong_answer"] == 0
    warning = capsys.readouterr().err
    assert "warning" in warning and "judged only 0 of them" in warning
    assert store.read_manifest(tmp_path / "out")["config"]["allow_unjudged"] is True


def test_answer_field_mostly_empty_also_refuses(tmp_path):
    rows = [{"question": q, "text": t, "pred": None} for q, t in (
        ("Which gas do plants take in from the air?", RIGHT[0]),
        ("What force pulls objects toward the Earth?", RIGHT[1]),
        ("Which organ pumps blood through the body?", RIGHT[2]))]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="field 'pred': 3 of 3 rationales have no answer: the answer field 'pred'"):
        _import(tmp_path, rationales_path=str(path), rationale_mapping=PER_ROW_MAPPING)


def test_join_and_value_errors_name_line_and_field(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"question": "Which gas do plants take in from the air?", "text": RIGHT[0],
                                "pred": "B"}) + "\n"
                    + json.dumps({"question": "Is this in the file?", "text": RIGHT[1], "pred": "C"}) + "\n")
    with pytest.raises(InputError, match=r"line 2, field 'question': 1 question texts are not in .*wrong split"):
        _import(tmp_path, rationales_path=str(path), rationale_mapping=PER_ROW_MAPPING)
    path.write_text(json.dumps({"question": "Which gas do plants take in from the air?", "text": RIGHT[0],
                                "pred": "E"}) + "\n")
    with pytest.raises(InputError, match=r"line 1, field 'pred': predicted answer: answer 'E' is neither"):
        _import(tmp_path, rationales_path=str(path), rationale_mapping=PER_ROW_MAPPING, allow_missing=True)
    assert not (tmp_path / "out").exists()


def test_chat_completion_directory_as_today(tmp_path):
    folder = tmp_path / "completions"
    folder.mkdir()
    for qid, text in zip(("101", "102", "103"), RIGHT):
        body = {"model": "gpt-x", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                       "content": text + " So the answer is (B)."}}]}
        (folder / f"{qid}.json").write_text(json.dumps(body))
    report = _import(tmp_path, rationales_path=str(folder))
    # 102's gold is C: its "(B)" rationale is dropped as wrong.
    assert report.dropped["wrong_answer"] == 1 and report.kept == 2
    assert store.read_manifest(tmp_path / "out")["teacher"] == ["gpt-x"]


def test_empty_examples_file_is_named_not_an_id_mismatch(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match=r"train\.jsonl: no examples: the file holds no records"):
        run.import_rationales(examples_path=str(empty), rationales_path=str(PER_ROW), out_dir=str(tmp_path / "o"))


# ---------------------------------------------------------------------------------------------
# Through `python -m kard_jax.main` with only gin settings
# ---------------------------------------------------------------------------------------------

def _main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kard_jax.main", "--gin_file=gin_configs/runs/teacher.gin", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


GIN_MAPPINGS = [
    "--gin.EXAMPLES_FORMAT=%FIELD_MAPPING",
    "--gin.kard_jax.data.readers.FieldMapping.id='qid'",
    "--gin.kard_jax.data.readers.FieldMapping.question='meta.question'",
    "--gin.kard_jax.data.readers.FieldMapping.options_field='choices'",
    "--gin.kard_jax.data.readers.FieldMapping.answer='gold'",
    "--gin.RATIONALE_MAPPING=%RATIONALE_FIELDS",
    "--gin.kard_jax.teacher.importers.RationaleMapping.id=None",
    "--gin.kard_jax.teacher.importers.RationaleMapping.question='question'",
    "--gin.kard_jax.teacher.importers.RationaleMapping.rationales=None",
    "--gin.kard_jax.teacher.importers.RationaleMapping.rationale='text'",
]


def test_teacher_gin_with_mappings_only(tmp_path):
    out = tmp_path / "teacher"
    base = [f"--gin.EXAMPLES='{ARRAY}'", f"--gin.RATIONALES='{PER_ROW}'", f"--gin.OUT_DIR='{out}'", *GIN_MAPPINGS]
    done = _main(*base, "--gin.kard_jax.teacher.importers.RationaleMapping.answer='pred'")
    assert done.returncode == 0, done.stderr
    assert store.read_rationales(out) == {"101": [RIGHT[0]], "102": [RIGHT[1]], "103": [RIGHT[2], UNJUDGED]}
    # Without the answer field the filter cannot work: refused, unless ALLOW_UNJUDGED.
    out.rename(tmp_path / "first")
    done = _main(*base)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().count("\n") == 0 and "wrong-answer filter cannot work" in done.stderr
    done = _main(*base, "--gin.ALLOW_UNJUDGED=True")
    assert done.returncode == 0, done.stderr
    assert sum(map(len, store.read_rationales(out).values())) == 6 and "warning" in done.stderr


def _error_cases(tmp_path):
    examples = tmp_path / "strategyqa" / "train.jsonl"
    examples.parent.mkdir()
    examples.write_text(json.dumps({"id": "q0", "sent1": "Is it?", "ending0": "yes", "ending1": "no",
                                    "label": 0}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "q0", "rationales": ["It is, as everyone can see very well here."]}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "q0", "rationales": []}) + '\n{"id": "q1", "rationales": ["unterminated\n')
    unjudged = tmp_path / "unjudged.jsonl"
    unjudged.write_text(json.dumps({"id": "q0", "rationales": ["It is, as everyone can see very well here."] * 1})
                        + "\n")
    return {
        "empty examples": ([f"--gin.EXAMPLES='{empty}'", f"--gin.RATIONALES='{good}'"], r"empty\.jsonl: no examples"),
        "no RATIONALES": ([f"--gin.EXAMPLES='{examples}'"], r"field 'RATIONALES'.*--gin\.RATIONALES="),
        "malformed JSON": ([f"--gin.EXAMPLES='{examples}'", f"--gin.RATIONALES='{broken}'"],
                           r"broken\.jsonl, line 2: malformed JSON \(Unterminated string starting at column 29\)"),
        "unjudged": ([f"--gin.EXAMPLES='{examples}'", f"--gin.RATIONALES='{unjudged}'"],
                     r"unjudged\.jsonl, field 'answer': 1 of 1 rationales state no answer"),
        "bad mapping": ([f"--gin.EXAMPLES='{examples}'", f"--gin.RATIONALES='{good}'",
                         "--gin.EXAMPLES_FORMAT=%FIELD_MAPPING"],
                        r"field 'FieldMapping': say where the options are"),
    }


@pytest.mark.parametrize("case", ["empty examples", "no RATIONALES", "malformed JSON", "unjudged", "bad mapping"])
def test_error_cases_exit_2_with_one_line_and_write_nothing(tmp_path, case):
    args, pattern = _error_cases(tmp_path)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    done = _main(*args, f"--gin.OUT_DIR='{out}'")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "at at" not in lines[0] and "Traceback" not in done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_real_obqa_release_needs_allow_unjudged(shared_data, tmp_path):
    """76% of the OBQA release's rationales state no answer: the filter could not judge them."""
    args = dict(examples_path=str(shared_data / "obqa" / "train.jsonl"),
                rationales_path=str(shared_data / "obqa" / "rationales.train.jsonl.gz"), out_dir=str(tmp_path / "o"),
                limit=100)
    with pytest.raises(InputError, match="no answer field is mapped.*cannot work"):
        run.import_rationales(**args)
    assert not (tmp_path / "o").exists()
    report = run.import_rationales(**args, allow_unjudged=True)
    assert report.questions == 100 and report.unjudged > 0.5 * report.answer_checked
