"""Rationale filtering: hand fixture with known reasons, and the real StrategyQA/OBQA teacher outputs."""
import pytest

from kard_jax.data.example import Example
from kard_jax.data.readers import read_examples
from kard_jax.teacher.filtering import FilterConfig, filter_all, filter_rationales, rules_out
from kard_jax.teacher.importers import import_jsonl

SUN = Example(id="7-980", question="The sun is responsible for",
              options=("puppies learning new tricks", "children growing up and getting old",
                       "flowers wilting in a vase", "plants sprouting, blooming and wilting"), answer=3, dataset="obqa")

GOOD = ("The sun provides the energy plants need for photosynthesis, so it drives sprouting, blooming and "
        "eventually wilting. Puppies, children and cut flowers in a vase change for reasons that have little to "
        "do with sunlight, while a plant's whole life cycle follows the light it receives. So the answer is (D).")
GOOD_NO_LETTER = ("Plants use sunlight for photosynthesis; the sun therefore makes them sprout, bloom and finally "
                  "wilt as the seasons change over the year.")
FIXTURE = [
    GOOD,                                                                   # kept
    "   \n ",                                                               # empty
    "This question is identical to the first question and has the same answer. The sun feeds plants.",  # degenerate
    "I'm sorry, but I cannot determine which option is meant here without more context given.",  # degenerate
    "So the answer is (D).",                                                # too_short (5 words)
    "Puppies learn tricks when it is sunny outside, as they play more. So the answer is (A).",  # wrong_answer
    GOOD_NO_LETTER,                                                         # kept, unparsable
    "Sunlight matters a lot for living things on Earth. Option (D) is incorrect because wilting is caused "
    "by a lack of water.",                                                  # rules_out_gold
    "  " + GOOD.upper().replace(" ", "   ").replace(".", "!!") + "\n",     # duplicate (normalized)
    GOOD[:-1] + " here.",  # near duplicate: 1 of 47 word trigrams added, Jaccard 46/47 = 0.98
]


def test_filter_hand_fixture_counts_per_reason():
    kept, counts = filter_rationales(SUN, FIXTURE)
    assert kept == [GOOD, GOOD_NO_LETTER]
    assert counts == {"empty": 1, "degenerate": 2, "too_short": 1, "wrong_answer": 1, "rules_out_gold": 1,
                      "duplicate": 2, "kept_unparsable": 1,
                      # 6 reach the answer check; GOOD_NO_LETTER and the rules-out text state none.
                      "answer_checked": 6, "unjudged": 2}


def test_filter_flags():
    kept, counts = filter_rationales(SUN, FIXTURE, FilterConfig(keep_unparsable=False))
    # The rules-out-gold text states no answer, so "no_answer" (checked first) now claims it.
    assert kept == [GOOD] and counts["no_answer"] == 2 and counts["rules_out_gold"] == 0
    kept, counts = filter_rationales(SUN, FIXTURE, FilterConfig(near_duplicate_jaccard=None,
                                                                drop_rules_out_gold=False))
    assert len(kept) == 4 and counts["duplicate"] == 1


def test_filter_all_report():
    other = Example(id="x", question="Is it?", options=("yes", "no"), answer=0, dataset="strategyqa")
    kept, report = filter_all([SUN, other], {"7-980": FIXTURE})
    assert kept == {"7-980": [GOOD, GOOD_NO_LETTER], "x": []}
    assert (report.questions, report.rationales_in, report.kept, report.kept_unparsable) == (2, 10, 2, 1)
    assert report.questions_without_rationales == 1
    assert sum(report.dropped.values()) == 8
    assert "kept 2" in report.summary() and "duplicate=2" in report.summary()


@pytest.mark.parametrize("text,letter,expected", [
    ("Option (C) is incorrect because snow falls.", "C", True),
    ("Options (A), (C), and (D) are all unrelated and unsafe actions.", "C", True),
    ("Options A and B are wrong.", "B", True),
    ("Option (B), dirt, and option (D), rocks, are abiotic components.", "D", False),
    ("Option (A) is correct because the others are incorrect.", "A", False),
    ("Option (C) is incorrect because snow falls.", "D", False),
])
def test_rules_out(text, letter, expected):
    assert rules_out(text, letter) is expected


@pytest.mark.parametrize("ds,questions,samples", [("strategyqa", 1603, 10), ("obqa", 4957, 20)])
def test_filter_real_teacher_rationales(shared_data, ds, questions, samples):
    examples = read_examples(shared_data / ds / "train.jsonl")
    rationales, teachers = import_jsonl(shared_data / ds / "rationales.train.jsonl.gz")
    if ds == "obqa":  # a slice keeps the test fast; the full run is in the report
        examples = examples[:500]
    kept, report = filter_all(examples, rationales)
    print(f"\n{ds} ({teachers}): {report.summary()}")
    assert report.questions == len(examples)
    assert report.rationales_in == len(examples) * samples
    assert report.kept + sum(report.dropped.values()) == report.rationales_in
    # Independent check of the kept set: every kept text is a stripped input of its question and is
    # not a contradiction of the gold answer according to the parser.
    from kard_jax.data.prompts import parse_answer
    for example in examples:
        given = {r.strip() for r in rationales[example.id]}
        for text in kept[example.id]:
            assert text in given
            assert parse_answer(text, len(example.options), example.options) in (None, example.answer)
            assert not text.lower().startswith("this question is identical")
    # The release's junk exists and is caught; most rationales survive.
    assert report.dropped["wrong_answer"] > 0 and report.dropped["degenerate"] > 0
    assert 0.9 < report.kept / report.rationales_in < 1.0
    assert report.questions_without_rationales == 0
