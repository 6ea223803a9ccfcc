"""The one record type every stage passes around: a multiple-choice question."""
from __future__ import annotations

import dataclasses

from kard_jax.errors import InputError

YES_NO_DATASETS = frozenset({"strategyqa"})


def option_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ... (options are labelled with capital letters)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 26:
        raise ValueError(f"option index {index!r} has no letter (0..25)")
    return chr(ord("A") + index)


@dataclasses.dataclass(frozen=True)
class Example:
    """A multiple-choice question; `answer` indexes `options` (StrategyQA: ("yes", "no")).

    `answer` is None for an unlabeled example (a test set without answers): retrieval and
    inference accept it; anything that needs the gold answer (teacher prompts and filtering,
    training targets, accuracy) raises an `InputError` naming the example.
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: int | None
    dataset: str = ""

    def __post_init__(self):
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if not 2 <= len(self.options) <= 26:
            raise ValueError(f"example {self.id!r}: needs 2..26 options, got {len(self.options)}")
        if self.answer is not None and (isinstance(self.answer, bool) or not 0 <= self.answer < len(self.options)):
            raise ValueError(f"example {self.id!r}: answer {self.answer} out of range 0..{len(self.options) - 1}")

    @property
    def labeled(self) -> bool:
        return self.answer is not None

    def _gold(self) -> int:
        if self.answer is None:
            raise InputError(f"example {self.id!r} has no gold answer (an unlabeled examples file); this step "
                             "needs labeled examples", field="answer")
        return self.answer

    def answer_letter(self) -> str:
        """The gold option's letter ("A".. ; yes/no datasets use "A"/"B" too)."""
        return option_letter(self._gold())

    @property
    def answer_text(self) -> str:
        return self.options[self._gold()]

    @property
    def is_yes_no(self) -> bool:
        return tuple(o.lower() for o in self.options) == ("yes", "no")
