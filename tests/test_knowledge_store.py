"""Corpus ingestion, chunking, de-duplication and the memory-mapped PassageStore."""

import numpy as np
import pytest

from kard_jax.errors import InputError
from kard_jax.knowledge import corpus
from kard_jax.knowledge.corpus import Passage
from kard_jax.knowledge.passage_store import PassageStore, build_passage_store
from tests.jsonl_files import write_jsonl


def test_chunking_with_stride_hand_fixture():
    doc = Passage("d", "T", " ".join(f"w{i}" for i in range(10)))  # w0 .. w9
    chunks = corpus.chunk_document(doc, chunk_words=4, stride=3)
    assert [c.id for c in chunks] == ["d#0", "d#1", "d#2"]
    assert [c.text for c in chunks] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert all(c.title == "T" for c in chunks)
    non_overlap = corpus.chunk_document(doc, chunk_words=4)
    assert [c.text for c in non_overlap] == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert corpus.chunk_document(doc, chunk_words=10) == [doc]  # fits: id unchanged


def test_store_round_trip_lookup_dedup_and_tsv(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl.gz", [
        {"id": "p1", "title": "Café", "text": "Résumé of  the first passage."},
        {"id": 2, "text": "second passage, no title"},
        {"id": "p3", "title": "Dup", "text": "  résumé OF the first passage. "},  # same normalized text as p1
        "",
        {"id": "long", "title": "L", "text": "one two three four five six seven"},
    ], gz=True)
    tsv = tmp_path / "b.tsv"
    tsv.write_text('id\ttext\ttitle\nt1\t"quoted ""text"" here"\tTSV title\n', encoding="utf-8")
    store = build_passage_store([jsonl, tsv], tmp_path / "store", chunk_words=5, chunk_stride=3, show_progress=False)
    expected = [
        Passage("p1", "Café", "Résumé of  the first passage."),  # kept: first occurrence of its text
        Passage("2", "", "second passage, no title"),
        Passage("long#0", "L", "one two three four five"),  # 7 words, windows of 5 every 3
        Passage("long#1", "L", "four five six seven"),
        Passage("t1", "TSV title", 'quoted "text" here'),
    ]
    reopened = PassageStore(tmp_path / "store")
    for s in (store, reopened):
        assert len(s) == len(expected)
        assert [s[i] for i in range(len(s))] == expected
        assert s.get_many([4, 0]) == [expected[4], expected[0]]
        for i, p in enumerate(expected):
            assert s.index_of(p.id) == i
        assert "p3" not in s and "long" not in s
        with pytest.raises(KeyError):
            s.index_of("missing")
    m = reopened.manifest
    assert (m["num_passages"], m["num_passages_read"], m["num_duplicates_dropped"], m["num_documents"]) == (5, 6, 1, 5)
    assert expected[0].contents == "Café . Résumé of  the first passage." and expected[1].contents == expected[1].text


def test_store_without_dedup_keeps_duplicates(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "x y"}, {"id": "b", "text": "X  y"}])
    store = build_passage_store([src], tmp_path / "s", dedup=False, show_progress=False)
    assert [p.id for p in store.get_many(range(len(store)))] == ["a", "b"]


def test_id_lookup_many_rows(tmp_path):
    rows = [{"id": f"doc{i}", "text": f"text number {i}"} for i in range(3000)]
    store = build_passage_store([write_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "s", show_progress=False)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 3000, size=200)
    np.testing.assert_array_equal(store.indices_of([f"doc{i}" for i in picks]), picks)
    assert store[2999].text == "text number 2999"


@pytest.mark.parametrize("rows, line, field, message", [
    ([{"id": "a", "text": "ok"}, '{"id": "b", "text": '], 2, None, "malformed JSON"),
    ([{"id": "a", "text": "ok"}, {"id": "b", "title": "t"}], 2, "text", "missing required field"),
    ([{"id": "a", "text": "ok"}, "", {"id": "b", "text": "   "}], 3, "text", "empty value"),
    ([{"text": "no id"}], 1, "id", "missing required field"),
    ([{"id": "a", "text": ["not", "a", "string"]}], 1, "text", "expected a string"),
    ([{"id": "a", "text": "one"}, {"id": "a", "text": "two"}], 2, "id", "duplicate passage id 'a'"),
])
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, rows, line, field, message):
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "store"
    with pytest.raises(InputError) as err:
        build_passage_store([src], out, show_progress=False)
    text = str(err.value)
    assert str(src) in text and f"line {line}" in text and message in text
    if field:
        assert f"field {field!r}" in text
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no temp dir left behind


def test_empty_knowledge_base_and_skip_empty(tmp_path):
    src = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(InputError, match="knowledge base is empty"):
        build_passage_store([src], tmp_path / "s", show_progress=False)
    assert not (tmp_path / "s").exists()
    src2 = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "text": ""}, {"id": "b", "text": "kept"}])
    store = build_passage_store([src2], tmp_path / "s2", skip_empty_text=True, show_progress=False)
    assert [p.id for p in store.get_many(range(len(store)))] == ["b"]
    assert store.manifest["num_empty_skipped"] == 1


def test_failed_rebuild_keeps_previous_store(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "text": "alpha"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    build_passage_store([good], tmp_path / "s", show_progress=False)
    with pytest.raises(InputError):
        build_passage_store([bad], tmp_path / "s", show_progress=False)
    assert PassageStore(tmp_path / "s")[0] == Passage("a", "", "alpha")
