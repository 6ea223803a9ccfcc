#!/usr/bin/env bash
# Retrieval cache of one split (gin_configs/runs/retrieve.gin).
# Runs python -m kard_jax.main --gin_file=gin_configs/runs/retrieve.gin ... through run_on_all_workers.sh
# (all its options apply; -h lists them).
set -euo pipefail
STAGE_NOTE="This stage is CPU work: it runs on worker 0 only (JAX_PLATFORMS=cpu, no --multihost); --all-workers runs it on every worker with --multihost." STAGE=retrieve exec "$(dirname "${BASH_SOURCE[0]}")/run_on_all_workers.sh" --worker 0 --no-multihost --cpu "$@"
