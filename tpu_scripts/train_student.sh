#!/usr/bin/env bash
# Train the KARD student on every worker (gin_configs/runs/train_student.gin + model/data/partitioning gins).
# Runs python -m kard_jax.main --gin_file=gin_configs/runs/train_student.gin ... through run_on_all_workers.sh
# (all its options apply; -h lists them).
set -euo pipefail
STAGE=train_student exec "$(dirname "${BASH_SOURCE[0]}")/run_on_all_workers.sh" "$@"
