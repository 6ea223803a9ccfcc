"""Deterministic held-out splits by question id (the ONE definition every stage uses).

A question is held out when the first 8 hex digits of sha256(question_id), read as a fraction of
2**32, fall in [start, start + fraction) (`start` 0 by default): stable across runs, machines and
file orders, and independent of how many questions a file holds. Disjoint ranges are disjoint
question sets, so K-fold cross-validation is fraction 1/K with start 0, 1/K, ..., (K-1)/K. The reranker's validation split and the reranker evaluation
of its held-out questions both call `is_held_out`, so they agree on which questions were unseen.
"""
from __future__ import annotations

import hashlib

VALIDATION_SPLIT = "validation"


def is_held_out(question_id: str, fraction: float, start: float = 0.0) -> bool:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if not 0.0 <= start or start + fraction > 1.0 + 1e-9:
        raise ValueError(f"held-out start must be >= 0 with start + fraction <= 1, got start {start}, "
                         f"fraction {fraction}")
    digest = hashlib.sha256(str(question_id).encode("utf-8")).hexdigest()
    return start <= int(digest[:8], 16) / 2**32 < start + fraction
