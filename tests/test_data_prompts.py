"""Student prompt formatting, truncation and answer parsing."""
import gzip
import json

import pytest

from kard_jax.data import prompts
from kard_jax.data.example import Example
from kard_jax.data.readers import read_examples
from kard_jax.errors import InputError

MED = Example(id="m1", question="Which drug\nblocks cell wall synthesis?",
              options=("Gentamicin", "Ciprofloxacin", "Ceftriaxone", "Trimethoprim"), answer=2, dataset="medqa")
YN = Example(id="s1", question="Is the cuisine of Hawaii suitable for a vegan?", options=("yes", "no"), answer=1,
             dataset="strategyqa")
MED_INSTRUCTION = ("The following are multiple-choice questions about medical knowledge. Generate a step-by-step "
                   "explanations for each question with given medical knowledge.")


def words(text: str) -> int:
    return len(text.split())


def test_template_for():
    assert prompts.template_for("medqa") is prompts.TEMPLATES["medical"]
    assert prompts.template_for("MedQA_USMLE") is prompts.TEMPLATES["medical"]
    assert prompts.template_for("strategyqa") is prompts.TEMPLATES["commonsense"]
    assert prompts.template_for("obqa") is prompts.TEMPLATES["science"]
    assert prompts.template_for("science") is prompts.TEMPLATES["science"]
    assert prompts.TEMPLATES["medical"].instruction == MED_INSTRUCTION
    with pytest.raises(ValueError, match="stratgyqa"):
        prompts.template_for("stratgyqa")


def test_format_question_and_passage():
    assert prompts.format_question(MED) == (
        "Question: Which drug blocks cell wall synthesis? A. Gentamicin B. Ciprofloxacin C. Ceftriaxone "
        "D. Trimethoprim")
    assert prompts.format_question(YN) == "Question: Is the cuisine of Hawaii suitable for a vegan? A. yes B. no"
    assert prompts.format_passage("Cephalosporin", "Ceftriaxone is a\tthird-generation\ncephalosporin.") == (
        "Cephalosporin. Ceftriaxone is a third-generation cephalosporin.")
    assert prompts.format_passage("Is it wet?", "Yes.") == "Is it wet? Yes."
    assert prompts.format_passage("", "Only text.") == "Only text."


def test_build_student_input_kard_and_rd():
    t = prompts.template_for("medqa")
    passages = ["Ceftriaxone. A cephalosporin that\tinhibits cell wall synthesis.", "  ",
                "Gentamicin. An aminoglycoside."]
    question = ("Question: Which drug blocks cell wall synthesis? A. Gentamicin B. Ciprofloxacin C. Ceftriaxone "
                "D. Trimethoprim")
    assert prompts.build_student_input(MED, passages, t) == (
        f"{MED_INSTRUCTION}\n{question}\n"
        "Knowledge: Ceftriaxone. A cephalosporin that inhibits cell wall synthesis. Gentamicin. An aminoglycoside.\n"
        "Explanation:")
    assert prompts.build_student_input(MED, [], t) == f"{MED_INSTRUCTION}\n{question}\nExplanation:"


def test_build_student_target():
    assert prompts.build_student_target("  Vegans eat no animal products.\n\nSo no. ", YN) == (
        "Vegans eat no animal products.\n\nSo no.\nAnswer: B")
    assert prompts.build_student_target("", MED) == "Answer: C"
    assert prompts.build_student_target(None, MED) == "Answer: C"


def _base_words(example, template):
    return words(prompts.build_student_input(example, [], template)) + 1  # + "Knowledge:"


def test_truncation_cuts_last_passage_word_level_then_drops():
    t = prompts.template_for("strategyqa")
    p1 = "one two three four five"
    p2 = "six seven eight nine ten"
    base = _base_words(YN, t)
    full = prompts.build_student_input(YN, [p1, p2], t)
    assert words(full) == base + 10
    # Fits exactly: unchanged.
    assert prompts.build_student_input(YN, [p1, p2], t, max_tokens=base + 10, count_tokens=words) == full
    # Three words too many: the last passage loses its last three words.
    cut = prompts.build_student_input(YN, [p1, p2], t, max_tokens=base + 7, count_tokens=words)
    assert cut.endswith("Knowledge: one two three four five six seven\nExplanation:")
    assert words(cut) == base + 7
    # Only the first passage fits: the second is dropped whole.
    assert prompts.build_student_input(YN, [p1, p2], t, max_tokens=base + 5, count_tokens=words) == (
        prompts.build_student_input(YN, [p1], t))
    # Less than the first passage: it is cut too.
    assert prompts.build_student_input(YN, [p1, p2], t, max_tokens=base + 2, count_tokens=words).endswith(
        "Knowledge: one two\nExplanation:")
    # No knowledge fits at all: the Knowledge line goes, the question stays.
    assert prompts.build_student_input(YN, [p1, p2], t, max_tokens=base - 1, count_tokens=words) == (
        prompts.build_student_input(YN, [], t))


def test_truncation_brute_force_agrees():
    """Against a brute force over every (whole passages, word prefix) choice: the longest that fits."""
    t = prompts.template_for("obqa")
    ex = Example(id="o", question="Stars are", options=("a", "b", "c", "d"), answer=2, dataset="obqa")
    passages = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"]
    base = _base_words(ex, t)
    for budget in range(base - 1, base + 12):
        got = prompts.build_student_input(ex, passages, t, max_tokens=budget, count_tokens=words)
        flat = " ".join(passages).split()
        best = max(k for k in range(len(flat) + 1) if (base - 1 if k == 0 else base + k) <= budget)
        assert words(got) == (base - 1 if best == 0 else base + best)
        if best:
            knowledge = got.split("\nKnowledge: ")[1].split("\n")[0]
            assert knowledge.split() == flat[:best]


def test_truncation_raises_when_question_does_not_fit():
    t = prompts.template_for("strategyqa")
    with pytest.raises(InputError, match="s1") as err:
        prompts.build_student_input(YN, ["p"], t, max_tokens=10, count_tokens=words)
    assert err.value.field == "question"
    with pytest.raises(ValueError):
        prompts.build_student_input(YN, ["p"], t, max_tokens=10)


ABCD = ("Gentamicin", "Ciprofloxacin", "Ceftriaxone", "Trimethoprim")


@pytest.mark.parametrize("text,num,options,expected", [
    ("Answer: B", 4, None, 1),
    ("The drug inhibits PBPs.\nAnswer: C", 4, ABCD, 2),
    ("Answer: A ... on reflection.\nAnswer: D", 4, None, 3),
    ("the answer is (C)", 4, None, 2),
    ("Therefore, the correct answer is: (B) Ciprofloxacin.", 4, ABCD, 1),
    ("(B)", 4, None, 1),
    ("B.", 4, None, 1),
    ("d", 4, None, 3),
    ("Ceftriaxone", 4, ABCD, 2),
    ("the answer is ceftriaxone because it is a beta-lactam", 4, ABCD, 2),
    ("So the answer is yes.", 2, ("yes", "no"), 0),
    ("the answer is no", 2, ("yes", "no"), 1),
    ("Answer: no", 2, ("yes", "no"), 1),
    ("Option (A) is incorrect. Option (B) is incorrect. (D) is the correct answer.", 4, None, 3),
    ("Thus option C is correct.", 4, None, 2),
    ("The answer is E", 4, None, None),
    ("The answer is (E). Nothing else.", 4, None, None),
    ("No letter here at all.", 4, ABCD, None),
    ("", 4, None, None),
    ("Options (A) and (C) are wrong.", 4, None, None),
    ("**Answer:** (B)", 4, None, 1),
    ("(B) no, because the war was too short.", 2, ("yes", "no"), 1),
    ("Option (D) is incorrect because wilting needs no sun.", 4, None, None),
])
def test_parse_answer(text, num, options, expected):
    assert prompts.parse_answer(text, num, options) == expected


# Sentences from the real teacher rationales in ../shared/data (StrategyQA, OBQA).
@pytest.mark.parametrize("text,expected", [
    ("Therefore, the correct answer is (B) no. MMA is not totally original from Roman Colosseum games.", 1),
    ("Therefore, based on this information, we can conclude that the cuisine of Hawaii is not suitable for a "
     "vegan, making answer (B) the correct answer.", 1),
    ("So, the answer to the question \"Are blue lips normal?\" is no. If someone has blue lips, they should "
     "seek medical assistance immediately.", 1),
    ("However, overall, the cuisine of Hawaii is not necessarily well-suited to veganism, so the correct answer "
     "to this question would be (B) no.", 1),
    ("- Therefore, it can be concluded that the cuisine of Hawaii is not suitable for a vegan, as it does not "
     "offer many options that are free of animal products.", None),
    # Forms real teacher outputs use that the parser once missed (issue 8).
    ("Hawaiian dishes such as poke and kalua pig are built around fish and pork. So the answer to the question "
     "is \"no.\"", 1),
    ("Lions hunt at night. Thus the answer to the question is \"yes.\"", 0),
    ("The war lasted six months, shorter than a llama's gestation. Therefore, we select answer choice (B) - no - "
     "as the correct answer.", 1),
    ("Hamsters are prey animals. So we select answer choice (A) - yes - as the correct answer.", 0),
    ("Answer choice (A) is incorrect because hamsters are eaten by owls.", None),
])
def test_parse_answer_real_strategyqa_sentences(text, expected):
    assert prompts.parse_answer(text, 2, ("yes", "no")) == expected


def test_parse_answer_real_obqa_sentences():
    opts = ("puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
            "plants sprouting, blooming and wilting")
    text = ("Without the sun's energy, plants would not be able to grow and sustain themselves. Therefore, "
            "option (D) is the correct answer.\n\nThe other options are not related to the effects of the sun on "
            "plants. Puppies learning new tricks (option A) is unrelated to the sun.")
    assert prompts.parse_answer(text, 4, opts) == 3
    text = ("Option (A) is incorrect because spring occurs once per year, not three times. Option (B) is "
            "incorrect because there are only four seasons in a year, not twelve.")
    assert prompts.parse_answer(text, 4, opts) is None


def test_parse_answer_recovers_gold_on_most_real_strategyqa_rationales(shared_data):
    examples = {e.id: e for e in read_examples(shared_data / "strategyqa" / "train.jsonl")}
    agree = disagree = none = 0
    with gzip.open(shared_data / "strategyqa" / "rationales.train.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            if i == 300:
                break
            record = json.loads(line)
            example = examples[record["id"]]
            for text in record["rationales"]:
                parsed = prompts.parse_answer(text, 2, example.options)
                agree += parsed == example.answer
                disagree += parsed is not None and parsed != example.answer
                none += parsed is None
    total = agree + disagree + none
    print(f"strategyqa first 300 questions: {agree} agree, {disagree} disagree, {none} unparsable of {total}")
    # The teacher saw the gold answer: nearly every parsable rationale must agree with it.
    assert agree / total > 0.85 and disagree / total < 0.05
