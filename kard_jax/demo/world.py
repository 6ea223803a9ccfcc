"""A deterministic, generated miniature of a KARD benchmark (no downloads) in which each KARD
component has work to do.

Fictional creatures have three attributes (habitat, diet, fur colour). The knowledge base holds,
per creature, one *fact* passage per attribute and one *distractor* passage per attribute that
echoes the wording of that attribute's paraphrased question but states nothing.

Questions ask for one attribute of one creature, in one of two phrasings:
  direct      shares the fact passage's words ("Which habitat shelters the zorbla by day?" /
              "Zorbla habitat. The zorbla makes its home in the tundra, where it shelters by
              day."): BM25 by question finds the fact;
  paraphrase  shares no content word with the fact passage but several with the distractor
              ("Where is the zorbla most likely to be found?" / "Zorbla sightings. The zorbla is
              most likely to be found by patient observers ..."): BM25 by question ranks the
              distractor first; the teacher's rationale, which restates the fact, retrieves the
              fact; a reranker can learn which passage kind answers which question kind.

**Held-out entities**: test questions are about creatures that appear in no training question
(the knowledge base covers them), so a student without knowledge (FT, RD) can only guess, and
memorising the training creatures does not help: the paper's memorisation argument, tested.

**The answer step is learnable at demo scale**: each attribute's question lists the same four
values in the same order (a questionnaire), so a value always has the same letter, and rationales
end with the letter and the value ("So the answer is (B) tundra."), as real teacher rationales do.
What is left to the student is what KARD is about: reading the value from the passage.

Rationales come from a teacher: `kard_jax.demo.teacher_server`, a local OpenAI-compatible
endpoint that knows this world's facts and is wrong a stated fraction of the time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random

SYLLABLES = ["zor", "bla", "kin", "tu", "mar", "vex", "lo", "pra", "dun", "shi", "qua", "rel", "mo", "gan", "fi",
             "nop", "sek", "wu", "tam", "bri"]
# Each attribute's four values, in the fixed option order of its questions.
VALUES = {
    "habitat": ("desert", "tundra", "rainforest", "cave"),
    "diet": ("krill", "beetles", "moss", "pollen"),
    "color": ("crimson", "silver", "ochre", "teal"),
}
# attribute -> (fact title word, fact sentence, distractor title word, distractor text, direct
# question, paraphrased question). {n}: the creature's name; {v}: the attribute's value.
KINDS = {
    "habitat": ("habitat", "The {n} makes its home in the {v}, where it shelters by day.",
                "sightings", "The {n} is most likely to be found by patient observers, and those who have found "
                "a {n} once rarely find it again.",
                "Which habitat shelters the {n} by day?", "Where is the {n} most likely to be found?"),
    "diet": ("diet", "The {n} feeds mainly on {v}, gathered at dusk.",
             "in captivity", "Keepers say a captive {n} will eat whatever it is given to survive; what the {n} "
             "eats to survive in the wild is rarely watched.",
             "Which diet, gathered at dusk, feeds the {n}?", "What does the {n} eat to survive?"),
    "color": ("appearance", "The {n} has {v} fur, groomed often.",
              "folklore", "Legends describe the coat of the {n} as magical, and storytellers describe the {n} "
              "differently in every village.",
              "What appearance has the fur of the {n}, groomed often?", "How would you describe the coat of the {n}?"),
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    num_train_entities: int = 100
    num_test_entities: int = 30
    phrasings: tuple[str, ...] = ("direct", "paraphrase")
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    entity: str
    attribute: str
    phrasing: str
    text: str
    options: tuple[str, ...]
    answer: int

    def row(self) -> dict:
        """The KARD release's multiple-choice format (shared/data's)."""
        row = {"id": self.id, "sent1": self.text, "sent2": "", "label": self.answer}
        row.update({f"ending{k}": o for k, o in enumerate(self.options)})
        return row


def fact_sentence(name: str, attribute: str, value: str) -> str:
    return KINDS[attribute][1].format(n=name, v=value)


def _names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    out = sorted(names)
    rng.shuffle(out)
    return out


def generate(config: WorldConfig = WorldConfig()) -> dict:
    """{"kb": passages, "train"/"test": questions (Question), "facts": {name: {attribute: value}},
    "train_entities", "test_entities"}; deterministic in `config`."""
    rng = random.Random(config.seed)
    names = _names(rng, config.num_train_entities + config.num_test_entities)
    train_names, test_names = names[: config.num_train_entities], names[config.num_train_entities:]
    facts = {n: {a: rng.choice(v) for a, v in VALUES.items()} for n in names}
    kb = []
    for i, name in enumerate(sorted(names)):
        title = name.capitalize()
        for attribute, (fact_word, fact, noise_word, noise, _, _) in KINDS.items():
            kb.append({"id": f"{name}-{attribute}", "title": f"{title} {fact_word}",
                       "text": fact.format(n=name, v=facts[name][attribute])})
            kb.append({"id": f"{name}-{attribute}-noise", "title": f"{title} {noise_word}",
                       "text": noise.format(n=name)})
    rng.shuffle(kb)

    def questions(entities: list[str], split: str) -> list[Question]:
        out = []
        for name in entities:
            for attribute, kind in KINDS.items():
                for phrasing in config.phrasings:
                    template = kind[4] if phrasing == "direct" else kind[5]
                    options = VALUES[attribute]
                    out.append(Question(
                        id=f"{split}-{len(out)}", entity=name, attribute=attribute, phrasing=phrasing,
                        text=template.format(n=name), options=options,
                        answer=options.index(facts[name][attribute]),
                    ))
        rng.shuffle(out)
        return [dataclasses.replace(q, id=f"{split}-{i}") for i, q in enumerate(out)]

    return {"kb": kb, "train": questions(train_names, "train"), "test": questions(test_names, "test"),
            "facts": facts, "train_entities": train_names, "test_entities": test_names}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_world(out_dir: str | os.PathLike, config: WorldConfig = WorldConfig()) -> pathlib.Path:
    """Writes kb.jsonl, train.jsonl, test.jsonl, questions.json (entity/attribute/phrasing per
    question, for the teacher server and the analysis) and manifest.json, atomically."""
    from kard_jax.knowledge import atomic

    world = generate(config)
    with atomic.atomic_directory(out_dir) as tmp:
        atomic.write_text(tmp / "kb.jsonl", _jsonl(world["kb"]))
        atomic.write_text(tmp / "train.jsonl", _jsonl([q.row() for q in world["train"]]))
        atomic.write_text(tmp / "test.jsonl", _jsonl([q.row() for q in world["test"]]))
        atomic.write_text(tmp / "questions.json", json.dumps(
            {q.id: {"entity": q.entity, "attribute": q.attribute, "phrasing": q.phrasing}
             for q in world["train"] + world["test"]}, indent=1) + "\n")
        atomic.write_text(tmp / "facts.json", json.dumps(world["facts"], indent=1, sort_keys=True) + "\n")
        atomic.write_json(tmp / "manifest.json", {
            "generator": __name__, "config": dataclasses.asdict(config),
            "counts": {"kb": len(world["kb"]), "train": len(world["train"]), "test": len(world["test"]),
                       "train_entities": len(world["train_entities"]), "test_entities": len(world["test_entities"])},
        })
    return pathlib.Path(out_dir)
