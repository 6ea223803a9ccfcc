"""A deterministic, generated miniature of a KARD benchmark (no downloads).

Fictional species with attributes make a knowledge base (one passage per species, plus
distractor passages); multiple-choice questions ask which species has a given attribute; the
"teacher rationale" cites the fact that decides the answer. The question alone shares few words
with the deciding passage while the rationale names it, which is exactly the gap KARD's
rationale-based retrieval and reranker exist for.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import tempfile

SYLLABLES = ["zor", "bla", "kin", "tu", "mar", "vex", "lo", "pra", "dun", "shi", "qua", "rel", "mo", "gan", "fi"]
HABITATS = ["desert", "tundra", "rainforest", "coral reef", "salt marsh", "volcanic slope", "cave", "bamboo grove"]
DIETS = ["cactus", "krill", "beetles", "moss", "fallen fruit", "lichen", "small fish", "pollen"]
COLORS = ["crimson", "silver", "ochre", "teal", "violet", "amber", "charcoal", "ivory"]
ATTRIBUTES = {"habitat": HABITATS, "diet": DIETS, "color": COLORS}
TEMPLATES = {
    "habitat": ("Which creature would you most likely find living in the {v}?", "The {n} lives in the {v}."),
    "diet": ("Which creature feeds mainly on {v}?", "The {n} feeds mainly on {v}."),
    "color": ("Which creature has {v} fur?", "The {n} has {v} fur."),
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    num_species: int = 60
    num_train_questions: int = 240
    num_test_questions: int = 60
    rationales_per_question: int = 2
    seed: int = 0


def _species_names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(names)


def generate(config: WorldConfig) -> dict:
    """Returns {"kb": [...], "train": [...], "test": [...], "rationales": [...]} as JSON-able rows."""
    rng = random.Random(config.seed)
    names = _species_names(rng, config.num_species)
    species = {n: {k: rng.choice(v) for k, v in ATTRIBUTES.items()} for n in names}
    kb = []
    for i, (n, attrs) in enumerate(species.items()):
        text = " ".join(TEMPLATES[k][1].format(n=n, v=v) for k, v in attrs.items())
        kb.append({"id": f"sp{i}", "title": n.capitalize(), "text": text + f" Field guides list the {n} as uncommon."})
    for i, (attr, values) in enumerate(ATTRIBUTES.items()):
        for j, v in enumerate(values):
            kb.append({"id": f"gen{i}_{j}", "title": v.capitalize(),
                       "text": f"The {v} is discussed by naturalists; many creatures are associated with {v}."})

    def make_questions(count: int, split: str) -> tuple[list[dict], list[dict]]:
        rows, rats = [], []
        for q in range(count):
            attr = rng.choice(list(ATTRIBUTES))
            answer_name = rng.choice(names)
            value = species[answer_name][attr]
            wrong = [n for n in names if species[n][attr] != value]
            options = rng.sample(wrong, 3) + [answer_name]
            rng.shuffle(options)
            label = options.index(answer_name)
            qid = f"{split}-{q}"
            row = {"id": qid, "sent1": TEMPLATES[attr][0].format(v=value), "sent2": "", "label": label}
            row.update({f"ending{k}": o for k, o in enumerate(options)})
            rows.append(row)
            letter = "ABCD"[label]
            fact = TEMPLATES[attr][1].format(n=answer_name, v=value)
            rationales = [
                f"{fact} None of the other options is known for this. So the answer is ({letter}).",
                f"We need the creature associated with {value}. {fact} Therefore the answer is ({letter}).",
                f"{fact} So the answer is ({'ABCD'[(label + 1) % 4]}).",  # a wrong one: filtering must drop it
            ]
            rats.append({"id": qid, "teacher": "kard_jax.demo.world", "rationales": rationales[: config.rationales_per_question] + rationales[2:]})
        return rows, rats

    train, rationales = make_questions(config.num_train_questions, "train")
    test, _ = make_questions(config.num_test_questions, "test")
    return {"kb": kb, "train": train, "test": test, "rationales": rationales}


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_world(out_dir: str | os.PathLike, config: WorldConfig = WorldConfig()) -> pathlib.Path:
    """Writes kb.jsonl, train.jsonl, test.jsonl, rationales.train.jsonl (shared/data formats) atomically."""
    out = pathlib.Path(out_dir)
    world = generate(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    _write_jsonl(tmp / "kb.jsonl", world["kb"])
    _write_jsonl(tmp / "train.jsonl", world["train"])
    _write_jsonl(tmp / "test.jsonl", world["test"])
    _write_jsonl(tmp / "rationales.train.jsonl", world["rationales"])
    (tmp / "manifest.json").write_text(json.dumps({"generator": __name__, "config": dataclasses.asdict(config),
                                                    "counts": {k: len(v) for k, v in world.items()}}, indent=2))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
