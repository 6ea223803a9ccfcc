"""Examples files in layouts seen in the wild (tests/fixtures/layouts/), read through the public
reader and through every stage that takes an examples format, with only a `FieldMapping` setting.

Each fixture holds the same three questions (or yes/no versions of them), written by hand; the
expected Examples below are spelled out independently of the reader.
"""
from __future__ import annotations

import gzip
import json
import pathlib

import pytest

from kard_jax.data import prompts
from kard_jax.data.example import Example
from kard_jax.data.readers import FieldMapping, read_examples, split_inline_options
from kard_jax.errors import InputError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "layouts"
QUESTIONS = (
    ("Which gas do plants take in from the air?", ("oxygen", "carbon dioxide", "nitrogen", "helium"), 1),
    ("What force pulls objects toward the Earth?", ("magnetism", "friction", "gravity", "buoyancy"), 2),
    ("Which organ pumps blood through the body?", ("lungs", "heart", "liver", "kidney"), 1),
)
YES_NO = (
    ("Do plants take in carbon dioxide from the air?", 0),
    ("Does friction pull objects toward the Earth?", 1),
    ("Does the heart pump blood through the body?", 0),
)
# The knowledge passage each question should retrieve first (tests/fixtures/layouts/kb.jsonl).
BEST_PASSAGE = ("k1", "k2", "k3")

# name -> (fixture, mapping, expected ids)
LAYOUTS = {
    # JSON lines (with a blank line), options as separate fields, answer as a 0-based index.
    "lines_fields": ("lines_fields.jsonl",
                     FieldMapping(id="uid", question="stem", options=("opa", "opb", "opc", "opd"), answer="cop"),
                     ["s1", "s2", "s3"]),
    # A pretty-printed JSON array, nested question, options as a list, answers "(b)" / "C" / "b.", integer ids.
    "array_list": ("array_list.json",
                   FieldMapping(id="qid", question="meta.question", options_field="choices", answer="gold"),
                   ["101", "102", "103"]),
    # One pretty-printed object keyed by row index, options as {letter: text}, answer as the option's text
    # (any case), no id field: the row keys are the ids.
    "keyed_dict": ("keyed_dict.json", FieldMapping(options_field="options"), ["0", "1", "2"]),
    # One object on one line keyed by row name; options inline "(a) ... (b) ..."; answers "B" / "c" / "(B)".
    "keyed_inline_paren": ("keyed_oneline.json", FieldMapping(question="q", inline_options=True, answer="label"),
                           ["row-a", "row-b", "row-c"]),
    # JSON lines, options inline "A. ..." / "A)" (one on separate lines), 1-based index answers, no ids.
    "inline_dot": ("inline_dot.jsonl",
                   FieldMapping(question="text", inline_options=True, answer="key", answer_format="index",
                                index_base=1, id=None),
                   ["inline_dot-000001", "inline_dot-000002", "inline_dot-000003"]),
}
YES_NO_MAPPING = FieldMapping(answer_format="bool")
UNLABELED_MAPPING = FieldMapping(options_field="choices", answer=None)


def expected_examples(ids, dataset=""):
    return [Example(id=i, question=q, options=o, answer=a, dataset=dataset) for i, (q, o, a) in zip(ids, QUESTIONS)]


def gzip_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.write_bytes(gzip.compress(src.read_bytes(), mtime=0))
    return dst


# ---------------------------------------------------------------------------------------------
# The public reader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_through_read_examples_plain_and_gzip(name, tmp_path):
    fixture, mapping, ids = LAYOUTS[name]
    expected = expected_examples(ids, dataset="science")
    assert read_examples(FIXTURES / fixture, format=mapping, dataset="science") == expected
    # The old spelling (format="mapped", mapping=...) still works.
    assert read_examples(FIXTURES / fixture, format="mapped", mapping=mapping, dataset="science") == expected
    # gzip is recognised by its magic bytes: with the .gz suffix and without it.
    stem = fixture.split(".")[0]
    for target in (tmp_path / (fixture + ".gz"), tmp_path / "sub" / fixture):
        target.parent.mkdir(exist_ok=True)
        gzip_copy(FIXTURES / fixture, target)
        got = read_examples(target, format=mapping, dataset="science")
        if mapping.id is None:  # generated ids come from the file stem
            assert [e.id for e in got] == [f"{stem}-{i:06d}" for i in (1, 2, 3)]
        assert got == expected


def test_yes_no_layout():
    expected = [Example(id=f"yn{i + 1}", question=q, options=("yes", "no"), answer=a)
                for i, (q, a) in enumerate(YES_NO)]
    assert read_examples(FIXTURES / "yes_no.jsonl", format=YES_NO_MAPPING) == expected


def test_unlabeled_layout():
    got = read_examples(FIXTURES / "unlabeled.jsonl", format=UNLABELED_MAPPING)
    assert [(e.id, e.question, e.options, e.answer) for e in got] == [
        (f"t{i + 1}", q, o, None) for i, (q, o, _) in enumerate(QUESTIONS)]
    assert not got[0].labeled
    with pytest.raises(InputError, match="'t1' has no gold answer"):
        got[0].answer_letter()
    with pytest.raises(InputError, match="no gold answer"):
        prompts.build_student_target("x", got[0])


def test_answer_forms_in_auto_mode(tmp_path):
    options = ["red", "green", "blue"]
    rows = [("B", 1), ("(c)", 2), ("a", 0), ("b.", 1), ("[A]", 0), ("Green", 1), ("  blue ", 2), (0, 0), ("2", 2),
            ("(B) green", 1), ("option c", 2), ("Answer: A", 0)]
    path = tmp_path / "forms.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "question": "Colour?", "options": options, "answer": value}) + "\n"
                            for i, (value, _) in enumerate(rows)))
    got = read_examples(path, format=FieldMapping(options_field="options"))
    assert [e.answer for e in got] == [index for _, index in rows]
    # yes/no answers under "auto" when the options are yes/no
    path.write_text("".join(json.dumps({"id": str(i), "question": "Q?", "options": ["Yes", "No"], "answer": v}) + "\n"
                            for i, v in enumerate([True, False, "no", "YES", "true"])))
    assert [e.answer for e in read_examples(path, format=FieldMapping(options_field="options"))] == [0, 1, 1, 0, 0]


@pytest.mark.parametrize("text,expected", [
    ("Pick one (a) x (b) y", ("Pick one", ["A", "B"], ["x", "y"])),
    ("Vitamin A. deficiency causes? A. night blindness B. scurvy C. rickets",
     ("Vitamin A. deficiency causes?", ["A", "B", "C"], ["night blindness", "scurvy", "rickets"])),
    ("Which (b) is odd? (A) one (B) two", ("Which (b) is odd?", ["A", "B"], ["one", "two"])),
    ("Q? A. Vitamin A. B. Vitamin C.", ("Q?", ["A", "B"], ["Vitamin A.", "Vitamin C."])),
    ("No options here.", None),
    ("Only (a) one", None),
])
def test_split_inline_options(text, expected):
    assert split_inline_options(text) == expected


@pytest.mark.parametrize("content,message", [
    ("id,question\n1,what?\n", "not a recognised layout: expected JSON lines"),
    ('"just a string"\n', "not a recognised layout"),
    ("[1, 2]\n", "JSON array layout: expected an object per element, got int"),
    ('{"question": "Q", "options": ["a", "b"], "answer": 0}\n[2]\n',
     "line 2: JSON lines layout: expected an object on every line, got list"),
    ('{"0": {"question": "Q"},\n "1": {"question": "R"}\n', "line 3: malformed JSON object (expected ',' or '}')"),
    ('{"id": "a", "question": "Q\n', "line 1: malformed JSON (Unterminated string starting at column 25)"),
])
def test_unrecognised_layouts_name_the_layouts(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        read_examples(path, format=FieldMapping(options_field="options"))
    assert str(path) in str(err.value)
    assert "at at" not in str(err.value)


def test_empty_file_and_corrupt_gzip_name_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match=r"empty\.jsonl: no examples: the file holds no records"):
        read_examples(empty)
    assert read_examples(empty, allow_empty=True) == []
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress((FIXTURES / "lines_fields.jsonl").read_bytes())[:60])
    with pytest.raises(InputError, match=r"broken\.jsonl\.gz: corrupt gzip data"):
        read_examples(broken, format=LAYOUTS["lines_fields"][1])


def test_mapping_errors_name_the_setting():
    with pytest.raises(InputError, match="say where the options are"):
        FieldMapping()
    with pytest.raises(InputError, match="not options and options_field"):
        FieldMapping(options=("a", "b"), options_field="c")
    with pytest.raises(InputError, match="field 'FieldMapping.answer_format'"):
        FieldMapping(options_field="c", answer_format="letters")
    with pytest.raises(InputError, match="unknown examples format 'kardd'"):
        read_examples(FIXTURES / "yes_no.jsonl", format="kardd")


@pytest.mark.parametrize("row,field,message", [
    ({"id": "x", "question": "Q", "options": ["a", "b"], "answer": "C"}, "answer", "neither an option label"),
    ({"id": "x", "question": "Q", "options": ["a", "b"]}, "answer", "missing field"),
    ({"id": "x", "question": "Q (a) one", "answer": "A"}, "question", "no inline options found"),
])
def test_bad_rows_name_line_and_field(tmp_path, row, field, message):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n")
    mapping = (FieldMapping(question="question", inline_options=True) if "options" not in row
               else FieldMapping(options_field="options"))
    with pytest.raises(InputError, match=message) as err:
        read_examples(path, format=mapping)
    assert err.value.line == 2 and err.value.field == field


# ---------------------------------------------------------------------------------------------
# The stages, with only the mapping as a setting
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    from kard_jax.knowledge.run import build_kb

    kb_dir = tmp_path_factory.mktemp("layouts") / "kb"
    build_kb(corpus_paths=[str(FIXTURES / "kb.jsonl")], kb_dir=str(kb_dir), show_progress=False)
    return kb_dir


def _retrieve(examples_path, mapping, kb, out):
    from kard_jax.knowledge import retrieval_cache
    from kard_jax.knowledge.run import retrieve

    manifest = retrieve(examples_path=str(examples_path), kb_dir=str(kb), output_dir=str(out),
                        examples_format=mapping, config=retrieval_cache.RetrievalConfig(question_top_k=2),
                        show_progress=False)
    rows = retrieval_cache.read_question_candidates(out)
    return manifest, {row["question_id"]: row["candidate_ids"] for row in rows}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_through_retrieve(name, kb, tmp_path):
    fixture, mapping, ids = LAYOUTS[name]
    manifest, candidates = _retrieve(FIXTURES / fixture, mapping, kb, tmp_path / "retrieval")
    assert manifest["counts"]["questions"] == 3
    assert {qid: c[0] for qid, c in candidates.items()} == dict(zip(ids, BEST_PASSAGE))


def test_unlabeled_and_yes_no_through_retrieve(kb, tmp_path):
    _, candidates = _retrieve(FIXTURES / "unlabeled.jsonl", UNLABELED_MAPPING, kb, tmp_path / "a")
    assert {qid: c[0] for qid, c in candidates.items()} == dict(zip(["t1", "t2", "t3"], BEST_PASSAGE))
    _, candidates = _retrieve(FIXTURES / "yes_no.jsonl", YES_NO_MAPPING, kb, tmp_path / "b")
    assert {qid: c[0] for qid, c in candidates.items()} == dict(zip(["yn1", "yn2", "yn3"], BEST_PASSAGE))


def test_retrieve_on_an_empty_examples_file_names_it(kb, tmp_path):
    from kard_jax.knowledge.run import retrieve

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty\.jsonl: no examples"):
        retrieve(examples_path=str(empty), kb_dir=str(kb), output_dir=str(tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out").exists()


ROW_RATIONALES = FIXTURES / "rationales_per_row.jsonl"


def _row_mapping():
    """One row per rationale, joined by the question's text, with a predicted-answer field."""
    from kard_jax.teacher.importers import RationaleMapping

    return RationaleMapping(id=None, question="question", rationales=None, rationale="text", answer="pred")


# Texts in rationales_per_row.jsonl: per question, the one with the right predicted answer is kept,
# the wrong ones are dropped; the one without a predicted answer (question 3) is kept unjudged.
RIGHT = [
    "During photosynthesis a leaf absorbs carbon dioxide and gives off oxygen to the air.",
    "An apple falls from a tree because the Earth attracts every mass near it.",
    "The heart is a muscle whose beats push blood through the arteries and veins.",
]
UNJUDGED_Q3 = "Breathing moves air in and out, and that motion carries blood around the body."


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_through_teacher_import(name, tmp_path):
    from kard_jax.teacher import run, store

    fixture, mapping, ids = LAYOUTS[name]
    out = tmp_path / "teacher"
    report = run.import_rationales(examples_path=str(FIXTURES / fixture), format=mapping, out_dir=str(out),
                                   rationales_path=str(ROW_RATIONALES), rationale_mapping=_row_mapping())
    assert store.read_rationales(out) == {ids[0]: [RIGHT[0]], ids[1]: [RIGHT[1]], ids[2]: [RIGHT[2], UNJUDGED_Q3]}
    assert report.dropped["wrong_answer"] == 2 and report.answers_from_field == 5 and report.unjudged == 1


def test_yes_no_and_unlabeled_through_teacher_import(tmp_path):
    from kard_jax.teacher import run, store

    rationales = tmp_path / "r.jsonl"
    texts = ["Leaves take in carbon dioxide for photosynthesis, so the answer is (A).",
             "Friction only slows things that slide; gravity pulls them down, so the answer is (B).",
             "The heart beats to push blood through every vessel of the body. So the answer is (A)."]
    rationales.write_text("".join(json.dumps({"id": f"yn{i + 1}", "rationales": [t]}) + "\n"
                                  for i, t in enumerate(texts)))
    run.import_rationales(examples_path=str(FIXTURES / "yes_no.jsonl"), format=YES_NO_MAPPING,
                          rationales_path=str(rationales), out_dir=str(tmp_path / "yn"))
    assert store.read_rationales(tmp_path / "yn") == {f"yn{i + 1}": [t] for i, t in enumerate(texts)}
    with pytest.raises(InputError, match="3 examples have no gold answer"):
        run.import_rationales(examples_path=str(FIXTURES / "unlabeled.jsonl"), format=UNLABELED_MAPPING,
                              rationales_path=str(rationales), out_dir=str(tmp_path / "u"))
    assert not (tmp_path / "u").exists()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    pytest.importorskip("seqio")
    from kard_jax.tasks import vocab as vocab_lib

    root = tmp_path_factory.mktemp("layout_vocab")
    words = " ".join([json.dumps(QUESTIONS), prompts.template_for("obqa").instruction, "Question Answer Explanation"])
    words = words.replace('"', " ").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    vocab_lib.train_sentencepiece(output_dir=str(root / "vocab"), corpus_paths=[str(root / "corpus.jsonl")],
                                  vocab_size=120, hard_vocab_limit=False, show_progress=False)
    return root / "vocab"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_through_seqio_task(name, vocab_dir):
    import seqio

    from kard_jax.tasks import registry

    fixture, mapping, ids = LAYOUTS[name]
    dataset = f"layout_{name}"
    names = registry.register_kard_tasks(dataset, train_path=str(FIXTURES / fixture), vocab_path=str(vocab_dir),
                                         example_format=mapping, prompt_template="obqa",
                                         eval_paths={"validation": str(FIXTURES / fixture)})
    assert names == [f"kard_{dataset}_ft"]
    instruction = prompts.template_for("obqa").instruction
    expected = [
        (f"{instruction}\nQuestion: {q} " + " ".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(opts))
         + "\nExplanation:", f"Answer: {'ABCD'[a]}")
        for q, opts, a in QUESTIONS
    ]
    for split in ("train", "validation"):
        ds = seqio.get_mixture_or_task(names[0]).get_dataset(sequence_length=None, split=split, shuffle=False)
        got = [(e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode()) for e in ds.as_numpy_iterator()]
        assert got == expected
