#!/usr/bin/env bash
# Teacher stage: import or generate rationales (gin_configs/runs/teacher.gin).
# Runs python -m kard_jax.main --gin_file=gin_configs/runs/teacher.gin ... through run_on_all_workers.sh
# (all its options apply; -h lists them).
set -euo pipefail
STAGE_NOTE="This stage is CPU work: it runs on worker 0 only (JAX_PLATFORMS=cpu, no --multihost); --all-workers runs it on every worker with --multihost." STAGE=teacher exec "$(dirname "${BASH_SOURCE[0]}")/run_on_all_workers.sh" --worker 0 --no-multihost --cpu "$@"
