"""The one record type every stage passes around: a multiple-choice question."""
from __future__ import annotations

import dataclasses

YES_NO_DATASETS = frozenset({"strategyqa"})


def option_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ... (options are labelled with capital letters)."""
    if not 0 <= index < 26:
        raise ValueError(f"option index {index} has no letter (0..25)")
    return chr(ord("A") + index)


@dataclasses.dataclass(frozen=True)
class Example:
    """A multiple-choice question; `answer` indexes `options` (StrategyQA: ("yes", "no"))."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    dataset: str = ""

    def __post_init__(self):
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if not 2 <= len(self.options) <= 26:
            raise ValueError(f"example {self.id!r}: needs 2..26 options, got {len(self.options)}")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"example {self.id!r}: answer {self.answer} out of range 0..{len(self.options) - 1}")

    def answer_letter(self) -> str:
        """The gold option's letter ("A".. ; yes/no datasets use "A"/"B" too)."""
        return option_letter(self.answer)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]

    @property
    def is_yes_no(self) -> bool:
        return tuple(o.lower() for o in self.options) == ("yes", "no")
