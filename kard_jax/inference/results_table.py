"""The results table (gin_configs/runs/results_table.gin): several evaluation runs' metrics.json
gathered into the paper's layout, method x dataset, accuracy mean (std over seeds).

Each evaluation directory (written by `kard_jax.inference.run.infer`) records its `method` (the
row: ft, rd, kard_bm25, kard_reranker, silver, ...) and `dataset` (the column). Writes
`results.md` (a markdown table), `results.json` and `results.png` (a grouped bar chart) to
`out_dir`, and prints the table.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping, Sequence

from kard_jax.errors import InputError
from kard_jax.knowledge import atomic

# The paper's row order (Table 1); unknown methods follow in the order given.
METHOD_ORDER = ("ft", "rd", "kard_bm25", "kard_dense", "kard_reranker", "silver")
METHOD_NAMES = {"ft": "FT (no rationale, no knowledge)", "rd": "RD (reasoning distillation)",
                "kard_bm25": "KARD, BM25 by question", "kard_dense": "KARD, dense by question",
                "kard_reranker": "KARD, reranked", "silver": "KARD, silver knowledge (oracle)"}


def _load(path: str | os.PathLike) -> dict:
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise InputError("no metrics.json (run runs/infer.gin into this directory first)", path=path)
    try:
        metrics = atomic.read_json(path)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg})", path=path, line=e.lineno) from None
    for field in ("method", "accuracy"):
        if metrics.get(field) is None:
            raise InputError("an evaluation's metrics.json must record it (labeled examples, runs/infer.gin)",
                             path=path, field=field)
    metrics.setdefault("dataset", "data")
    metrics["path"] = str(path)
    return metrics


def gather(runs: Sequence[str | os.PathLike]) -> dict[str, dict[str, dict]]:
    """method -> dataset -> metrics; a method x dataset given twice is an error (ambiguous cell)."""
    if not runs:
        raise InputError("no evaluation runs given", field="runs")
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        m = _load(run)
        cell = table.setdefault(m["method"], {})
        if m["dataset"] in cell:
            raise InputError(f"two runs for method {m['method']!r} on dataset {m['dataset']!r}: "
                             f"{cell[m['dataset']]['path']} and {m['path']}", field="runs")
        cell[m["dataset"]] = m
    return table


def _ordered_methods(table: Mapping[str, Mapping]) -> list[str]:
    return [m for m in METHOD_ORDER if m in table] + [m for m in table if m not in METHOD_ORDER]


def _cell(m: Mapping) -> str:
    text = f"{100 * m['accuracy']:.1f}"
    if len(m.get("seeds", [])) > 1:
        text += f" ± {100 * m.get('accuracy_std', 0.0):.1f}"
    return text


def markdown(table: Mapping[str, Mapping[str, Mapping]]) -> str:
    datasets = sorted({d for cells in table.values() for d in cells})
    lines = ["| method | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for method in _ordered_methods(table):
        cells = [(_cell(table[method][d]) if d in table[method] else "–") for d in datasets]
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    seeds = sorted({len(m.get("seeds", [])) for cells in table.values() for m in cells.values()})
    n = sorted({m.get("num_examples") for cells in table.values() for m in cells.values()})
    lines.append("")
    lines.append(f"Accuracy (%) on {', '.join(map(str, n))} test questions"
                 + ("; mean ± std over decoding seeds" if max(seeds or [0]) > 1 else "; greedy decoding") + ".")
    return "\n".join(lines)


def bar_chart(table: Mapping[str, Mapping[str, Mapping]], path: str | os.PathLike, title: str = "") -> None:
    """A grouped bar chart (datasets on x, one bar per method, std as error bars), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = _ordered_methods(table)
    datasets = sorted({d for cells in table.values() for d in cells})
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(datasets) * max(1, len(methods)) / 3), 3.6), dpi=120)
    for i, method in enumerate(methods):
        xs = np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width
        ys = [100 * table[method][d]["accuracy"] if d in table[method] else 0.0 for d in datasets]
        err = [100 * table[method][d].get("accuracy_std", 0.0) if d in table[method] else 0.0 for d in datasets]
        bars = ax.bar(xs, ys, width, yerr=err, capsize=2, label=METHOD_NAMES.get(method, method))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "KARD: accuracy by method")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def results_table(*, runs: Sequence[str], out_dir: str, title: str = "") -> str:
    """Gathers `runs` (evaluation directories or metrics.json files) into out_dir; returns the markdown."""
    table = gather(runs)
    text = markdown(table)
    out = pathlib.Path(out_dir)
    atomic.write_text(out / "results.md", (f"# {title}\n\n" if title else "") + text + "\n")
    atomic.write_text(out / "results.json", json.dumps(
        {method: {d: {k: m.get(k) for k in ("accuracy", "accuracy_std", "accuracy_per_seed", "seeds",
                                            "num_examples", "source", "path")}
                  for d, m in cells.items()} for method, cells in table.items()}, indent=2) + "\n")
    bar_chart(table, out / "results.png", title)
    print(text, flush=True)
    print(f"kard_jax results_table: {sum(len(c) for c in table.values())} runs -> {out / 'results.md'}, "
          f"{out / 'results.png'}", flush=True)
    return text
