"""Benchmark readers: every format on hand-written fixtures, the real files, and bad input."""
import json

import pytest

from kard_jax.data.example import Example
from kard_jax.data.readers import FieldMapping, infer_dataset, read_examples
from kard_jax.errors import InputError
from tests.jsonl_files import write_jsonl


def test_kard_format_plain_and_gz_drops_empty_endings(tmp_path):
    rows = [
        {"id": "q1", "sent1": "Is water wet?", "sent2": "", "ending0": "yes", "ending1": "no",
         "ending2": "", "ending3": "", "label": 0},
        {"id": "q2", "sent1": "Stars are", "sent2": "", "ending0": "lights", "ending1": "gas balls",
         "ending2": "holes", "ending3": "fish", "label": 1},
    ]
    expected = [
        Example(id="q1", question="Is water wet?", options=("yes", "no"), answer=0, dataset="strategyqa"),
        Example(id="q2", question="Stars are", options=("lights", "gas balls", "holes", "fish"), answer=1,
                dataset="strategyqa"),
    ]
    (tmp_path / "strategyqa").mkdir()
    plain = write_jsonl(tmp_path / "strategyqa" / "train.jsonl", rows)
    packed = write_jsonl(tmp_path / "strategyqa" / "train.jsonl.gz", rows, gz=True)
    assert read_examples(plain) == expected
    assert read_examples(packed) == expected
    assert read_examples(plain, dataset="other")[0].dataset == "other"
    assert expected[0].answer_letter() == "A" and expected[1].answer_letter() == "B"


def test_kard_format_joins_sent2_and_numbers_missing_ids(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [
        "",
        {"sent1": "The sun", "sent2": "is responsible for", "ending0": "a", "ending1": "b", "label": "1"},
    ])
    # Generated ids number records (1-based), not lines: the blank first line does not count.
    assert read_examples(path) == [
        Example(id="dev-000001", question="The sun is responsible for", options=("a", "b"), answer=1, dataset="")
    ]


def test_native_medqa(tmp_path):
    path = write_jsonl(tmp_path / "medqa.jsonl", [
        {"question": "Which drug blocks cell wall synthesis?", "answer": "Ceftriaxone",
         "options": {"B": "Ciprofloxacin", "A": "Gentamicin", "C": "Ceftriaxone", "D": "Trimethoprim"},
         "meta_info": "step1", "answer_idx": "C"},
    ])
    assert read_examples(path, format="medqa") == [
        Example(id="medqa-000001", question="Which drug blocks cell wall synthesis?",
                options=("Gentamicin", "Ciprofloxacin", "Ceftriaxone", "Trimethoprim"), answer=2, dataset="medqa")
    ]


def test_native_strategyqa_lines_and_json_array(tmp_path):
    rows = [
        {"qid": "abc1", "term": "Llama", "question": "Could a llama give birth twice in 6 months?",
         "answer": False, "facts": ["Gestation is 11 months."]},
        {"qid": "abc2", "question": "Do hamsters provide food for animals?", "answer": True, "facts": []},
    ]
    expected = [
        Example(id="abc1", question="Could a llama give birth twice in 6 months?", options=("yes", "no"),
                answer=1, dataset="strategyqa"),
        Example(id="abc2", question="Do hamsters provide food for animals?", options=("yes", "no"), answer=0,
                dataset="strategyqa"),
    ]
    lines = write_jsonl(tmp_path / "s.jsonl", rows)
    array = tmp_path / "strategyqa_train.json"
    array.write_text(json.dumps(rows, indent=2))
    assert read_examples(lines, format="strategyqa") == expected
    assert read_examples(array, format="strategyqa") == expected


def test_json_array_errors_report_the_line(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[\n {"qid": "a", "question": "Q?", "answer": true},\n {"qid": "b", "question": "",'
                    ' "answer": true}\n]\n')
    with pytest.raises(InputError, match=r"s\.json, line 3, field 'question'"):
        read_examples(path, format="strategyqa")


def test_native_obqa(tmp_path):
    path = write_jsonl(tmp_path / "obqa.jsonl", [
        {"id": "7-980", "question": {"stem": "The sun is responsible for", "choices": [
            {"text": "puppies learning new tricks", "label": "A"},
            {"text": "children growing up and getting old", "label": "B"},
            {"text": "flowers wilting in a vase", "label": "C"},
            {"text": "plants sprouting, blooming and wilting", "label": "D"}]},
         "answerKey": "D"},
    ])
    assert read_examples(path, format="obqa") == [
        Example(id="7-980", question="The sun is responsible for",
                options=("puppies learning new tricks", "children growing up and getting old",
                         "flowers wilting in a vase", "plants sprouting, blooming and wilting"),
                answer=3, dataset="obqa")
    ]


@pytest.mark.parametrize("mapping,row,expected_options,expected_answer", [
    (FieldMapping(id="uid", question="q", options=("opa", "opb", "opc"), answer="cop", answer_format="index"),
     {"uid": 7, "q": "Pick b", "opa": "a", "opb": "b", "opc": "c", "cop": 1}, ("a", "b", "c"), 1),
    (FieldMapping(question="item.q", options_field="item.opts", answer="gold", answer_format="letter"),
     {"id": "x", "item": {"q": "Pick c", "opts": {"A": "a", "B": "b", "C": "c"}}, "gold": "c"}, ("a", "b", "c"), 2),
    (FieldMapping(options_field="choices", answer="answer", answer_format="text", id=None),
     {"question": "Pick b", "choices": ["a", "b"], "answer": "B"}, ("a", "b"), 1),
    (FieldMapping(options_field="choices", answer="key", answer_format="letter"),
     {"id": "x", "question": "Pick 2", "choices": [{"label": "1", "text": "one"}, {"label": "2", "text": "two"}],
      "key": "2"}, ("one", "two"), 1),
    (FieldMapping(answer="label", answer_format="bool"),
     {"id": "x", "question": "Yes?", "label": True}, ("yes", "no"), 0),
])
def test_mapped_format(tmp_path, mapping, row, expected_options, expected_answer):
    path = write_jsonl(tmp_path / "any.jsonl", [row])
    (example,) = read_examples(path, format="mapped", dataset="mine", mapping=mapping)
    assert example.options == expected_options
    assert example.answer == expected_answer
    assert example.dataset == "mine"
    assert example.id == ("any-000001" if mapping.id is None else str(row.get(mapping.id)))


@pytest.mark.parametrize("content,fmt,line,field", [
    ('{"id": "a", "sent1": "Q", "ending0": "x", "ending1": "y", "label": 0}\n{"id": "b", "sent1": ', "kard", 2, None),
    ('{"id": "a", "ending0": "x", "ending1": "y", "label": 0}\n', "kard", 1, "sent1"),
    ('{"id": "a", "sent1": "Q", "ending0": "x", "ending1": "y"}\n', "kard", 1, "label"),
    ('\n{"id": "a", "sent1": "Q", "ending0": "x", "ending1": "y", "label": 4}\n', "kard", 2, "label"),
    ('{"id": "a", "sent1": "  ", "ending0": "x", "ending1": "y", "label": 0}\n', "kard", 1, "sent1"),
    ('{"id": "a", "sent1": "Q", "ending0": "x", "ending1": "", "label": 1}\n', "kard", 1, "label"),
    ('{"id": "a", "sent1": "Q", "ending0": "x", "ending1": "y", "label": 0}\n'
     '{"id": "a", "sent1": "Q2", "ending0": "x", "ending1": "y", "label": 0}\n', "kard", 2, "id"),
    ('{"question": "Q", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}\n', "medqa", 1, "answer_idx"),
    ('{"qid": "a", "question": "Q", "answer": "yes"}\n', "strategyqa", 1, "answer"),
    ('{"id": "a", "question": {"stem": "Q"}, "answerKey": "A"}\n', "obqa", 1, "question.choices"),
    ('[1, 2]\n', "kard", None, None),
])
def test_bad_input_names_file_line_and_field(tmp_path, content, fmt, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_examples(path, format=fmt)
    message = str(err.value)
    assert str(path) in message
    if line is not None:
        assert f"line {line}" in message and err.value.line == line
    if field is not None:
        assert f"field '{field}'" in message and err.value.field == field


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_examples(tmp_path / "nope.jsonl")


def test_infer_dataset():
    assert infer_dataset("/x/medqa_usmle/dev.jsonl") == "medqa"
    assert infer_dataset("/x/obqa/train.jsonl") == "obqa"
    assert infer_dataset("/x/other/train.jsonl") == ""


@pytest.mark.parametrize("rel,rows,num_options,dataset", [
    ("obqa/train.jsonl", 4957, 4, "obqa"), ("obqa/dev.jsonl", 500, 4, "obqa"), ("obqa/test.jsonl", 500, 4, "obqa"),
    ("strategyqa/train.jsonl", 1603, 2, "strategyqa"), ("strategyqa/test.jsonl", 687, 2, "strategyqa"),
    ("medqa_usmle/dev.jsonl", 1272, 4, "medqa"), ("medqa_usmle/test.jsonl", 1273, 4, "medqa"),
])
def test_real_files(shared_data, rel, rows, num_options, dataset):
    path = shared_data / rel
    examples = read_examples(path)
    assert len(examples) == rows
    assert all(len(e.options) == num_options and e.dataset == dataset for e in examples)
    # Independent check of the first and last row against the raw JSON.
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for example, row in ((examples[0], raw[0]), (examples[-1], raw[-1])):
        assert example.id == row["id"] and example.question == row["sent1"].strip()
        assert example.answer_text == row[f"ending{row['label']}"].strip()
    if dataset == "strategyqa":
        assert {e.options for e in examples} == {("yes", "no")}
