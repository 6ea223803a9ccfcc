"""Deterministic held-out splits by question id (the ONE definition every stage uses).

A question is held out when the first 8 hex digits of sha256(question_id), read as a fraction of
2**32, fall below `fraction`: stable across runs, machines and file orders, and independent of
how many questions a file holds. The reranker's validation split and the reranker evaluation
of its held-out questions both call `is_held_out`, so they agree on which questions were unseen.
"""
from __future__ import annotations

import hashlib

VALIDATION_SPLIT = "validation"


def is_held_out(question_id: str, fraction: float) -> bool:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    digest = hashlib.sha256(str(question_id).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32 < fraction
