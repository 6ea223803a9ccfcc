"""A small demo world on disk with one correct teacher rationale per training question: the
shared starting point of tests that need real examples, a knowledge base and rationales."""
import pathlib

from kard_jax.demo import world as world_lib
from kard_jax.teacher.store import write_rationales


def world_with_rationales(root: pathlib.Path, *, train_entities: int, test_entities: int, seed: int,
                          answer_line: bool = True) -> pathlib.Path:
    """Writes root/world (train/test/kb files) and root/teacher (each training question's fact
    sentence, with "So the answer is ..." when `answer_line`); returns root/world."""
    config = world_lib.WorldConfig(num_train_entities=train_entities, num_test_entities=test_entities, seed=seed)
    world = world_lib.generate(config)
    world_dir = world_lib.write_world(root / "world", config)
    answer = (lambda q: f" So the answer is ({'ABCD'[q.answer]}) {q.options[q.answer]}.") if answer_line else (
        lambda q: "")
    rationales = {q.id: [world_lib.fact_sentence(q.entity, q.attribute, q.options[q.answer]) + answer(q)]
                  for q in world["train"]}
    write_rationales(root / "teacher", rationales, {"teacher": "test"})
    return world_dir
