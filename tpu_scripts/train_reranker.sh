#!/usr/bin/env bash
# Train the KARD reranker on every worker (gin_configs/runs/train_reranker.gin + a model gin).
# Runs python -m kard_jax.main --gin_file=gin_configs/runs/train_reranker.gin ... through run_on_all_workers.sh
# (all its options apply; -h lists them).
set -euo pipefail
STAGE=train_reranker exec "$(dirname "${BASH_SOURCE[0]}")/run_on_all_workers.sh" "$@"
