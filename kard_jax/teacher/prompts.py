"""Few-shot chain-of-thought prompts for the teacher LLM, one set per dataset family.

Paper style (KARD, Sec. 4 / App.): the gold answer is shown and the teacher explains it::

    Question: {question}
    (A) {option} (B) {option} ...
    Answer: (X)
    Explanation: {step-by-step rationale ending in "So the answer is (X)."}

The query repeats the layout and stops after "Explanation:". The exemplars below are written for
this project (the release ships MedQA's only); each one ends with an explicit "So the answer is
(X).", which teaches the teacher to state the answer the filter then checks.
"""
from __future__ import annotations

import dataclasses

from kard_jax.data.example import Example, option_letter
from kard_jax.data.prompts import DATASET_FAMILIES


@dataclasses.dataclass(frozen=True)
class Exemplar:
    question: str
    options: tuple[str, ...]
    answer: int
    explanation: str


@dataclasses.dataclass(frozen=True)
class TeacherPrompt:
    instruction: str
    exemplars: tuple[Exemplar, ...]


TEACHER_PROMPTS: dict[str, TeacherPrompt] = {
    "medical": TeacherPrompt(
        instruction=(
            "The following are multiple-choice questions about medical knowledge, each shown with "
            "its correct answer. Generate a step-by-step explanation of why the answer is correct."
        ),
        exemplars=(
            Exemplar(
                question=(
                    "A 24-year-old woman presents with fatigue and shortness of breath on exertion. She "
                    "has heavy menstrual periods. Her hemoglobin is 9.1 g/dL, mean corpuscular volume "
                    "is 71 fL and serum ferritin is low. Which of the following is the most likely "
                    "cause of her anemia?"
                ),
                options=("Iron deficiency", "Vitamin B12 deficiency", "Folate deficiency", "Hemolysis"),
                answer=0,
                explanation=(
                    "The patient has anemia with a low mean corpuscular volume, so it is a microcytic "
                    "anemia. A low serum ferritin means her iron stores are depleted, and heavy "
                    "menstrual bleeding is a common cause of chronic iron loss in young women. "
                    "Vitamin B12 and folate deficiency cause macrocytic anemia, and hemolysis usually "
                    "gives a normocytic anemia with a normal or high ferritin. So the answer is (A)."
                ),
            ),
            Exemplar(
                question=(
                    "A 58-year-old man with hypertension is started on lisinopril. Two weeks later he "
                    "reports a persistent dry cough. Which of the following best explains this adverse "
                    "effect?"
                ),
                options=(
                    "Blockade of beta-2 adrenergic receptors",
                    "Accumulation of bradykinin",
                    "Increased aldosterone secretion",
                    "Direct irritation of the airway mucosa",
                ),
                answer=1,
                explanation=(
                    "Lisinopril is an angiotensin-converting enzyme (ACE) inhibitor. ACE converts "
                    "angiotensin I to angiotensin II and also breaks down bradykinin. Inhibiting ACE "
                    "therefore lets bradykinin accumulate in the respiratory tract, which causes the "
                    "typical dry cough. ACE inhibitors lower aldosterone, do not act on beta receptors "
                    "and are not inhaled. So the answer is (B)."
                ),
            ),
        ),
    ),
    "commonsense": TeacherPrompt(
        instruction=(
            "The following are yes/no questions that need implicit multi-step reasoning, each shown "
            "with its correct answer ((A) yes or (B) no). Generate a step-by-step explanation of why "
            "the answer is correct."
        ),
        exemplars=(
            Exemplar(
                question="Could a llama give birth twice during the War in Vietnam (1945-46)?",
                options=("yes", "no"),
                answer=1,
                explanation=(
                    "The War in Vietnam (1945-46) lasted about 6 months. The gestation period of a "
                    "llama is about 11 months, which is longer than 6 months. So a llama could not "
                    "give birth even once, let alone twice, during that war. So the answer is (B)."
                ),
            ),
            Exemplar(
                question="Do hamsters provide food for any animals?",
                options=("yes", "no"),
                answer=0,
                explanation=(
                    "Hamsters are small rodents and prey animals. Prey animals are eaten by "
                    "predators such as owls, snakes and foxes. Thus hamsters provide food for some "
                    "animals. So the answer is (A)."
                ),
            ),
        ),
    ),
    "science": TeacherPrompt(
        instruction=(
            "The following are multiple-choice questions about elementary science, each shown with "
            "its correct answer. Generate a step-by-step explanation of why the answer is correct."
        ),
        exemplars=(
            Exemplar(
                question="Which of these would let the most heat travel through?",
                options=("a new pair of jeans", "a steel spoon in a cafeteria", "a cotton candy at a store",
                         "a calvin klein cotton hat"),
                answer=1,
                explanation=(
                    "Heat travels through a material by conduction. Metals are good thermal "
                    "conductors, while cloth and sugar are poor conductors (insulators). Steel is a "
                    "metal, so the steel spoon lets the most heat travel through. So the answer is (B)."
                ),
            ),
            Exemplar(
                question="Which of the following can start a forest fire?",
                options=("rain", "a lightning strike", "snow", "fog"),
                answer=1,
                explanation=(
                    "A fire needs fuel, oxygen and heat. A forest has plenty of dry wood and oxygen; "
                    "a lightning strike delivers a large amount of heat and can ignite the wood. "
                    "Rain, snow and fog are forms of water, which put fires out rather than start "
                    "them. So the answer is (B)."
                ),
            ),
        ),
    ),
}


def teacher_prompt_for(dataset: str) -> TeacherPrompt:
    """The teacher prompt of a dataset ("medqa", "strategyqa", "obqa") or a family name."""
    family = DATASET_FAMILIES.get(dataset.lower(), dataset.lower())
    if family not in TEACHER_PROMPTS:
        raise ValueError(f"no teacher prompt for dataset {dataset!r}; known: {sorted(TEACHER_PROMPTS)}")
    return TEACHER_PROMPTS[family]


def _block(question: str, options: tuple[str, ...], answer: int) -> str:
    choices = " ".join(f"({option_letter(i)}) {' '.join(o.split())}" for i, o in enumerate(options))
    return f"Question: {' '.join(question.split())}\n{choices}\nAnswer: ({option_letter(answer)})\nExplanation:"


def build_teacher_prompt(example: Example, prompt: TeacherPrompt) -> str:
    """Instruction, the exemplars with their explanations, then the query ending in "Explanation:"."""
    parts = [prompt.instruction]
    for ex in prompt.exemplars:
        parts.append(f"{_block(ex.question, ex.options, ex.answer)} {ex.explanation}")
    parts.append(_block(example.question, example.options, example.answer))
    return "\n\n".join(parts)


def build_teacher_messages(example: Example, prompt: TeacherPrompt) -> list[dict[str, str]]:
    """Chat-completions messages: the whole few-shot prompt as one user turn."""
    return [{"role": "user", "content": build_teacher_prompt(example, prompt)}]
