#!/usr/bin/env bash
# Evaluate a student (and reranker) on every worker (gin_configs/runs/infer.gin + the student's model gin).
# Runs python -m kard_jax.main --gin_file=gin_configs/runs/infer.gin ... through run_on_all_workers.sh
# (all its options apply; -h lists them).
set -euo pipefail
STAGE=infer exec "$(dirname "${BASH_SOURCE[0]}")/run_on_all_workers.sh" "$@"
