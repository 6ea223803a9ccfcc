"""`run_demo`: the README's main job, end to end on the generated world (kard_jax.demo.world)."""
from __future__ import annotations

import json
import pathlib

from kard_jax.demo import world as world_lib


def run_demo(*, output_dir: str, world: world_lib.WorldConfig = world_lib.WorldConfig()) -> dict:
    """Generates the demo world into output_dir/world and reports what it holds."""
    out = pathlib.Path(output_dir)
    world_dir = world_lib.write_world(out / "world", world)
    counts = json.loads((world_dir / "manifest.json").read_text())["counts"]
    print(f"kard_jax demo: world written to {world_dir}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return {"world_dir": str(world_dir), "counts": counts}
