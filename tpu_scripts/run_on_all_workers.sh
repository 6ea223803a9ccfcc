#!/usr/bin/env bash
# Run one kard_jax job on every worker of the slice (one process per host; --multihost makes each
# call jax.distributed.initialize(), which discovers the coordinator from the TPU metadata).
#   bash tpu_scripts/run_on_all_workers.sh --gin_file=gin_configs/runs/train_student.gin \
#        --gin.MODEL_DIR="'gs://bucket/run1'"
# MODEL_DIR must be shared storage (gs://) so orbax sees one checkpoint directory.
source "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || { echo "usage: $0 --gin_file=... [--gin.NAME=VALUE ...]" >&2; exit 2; }
args=$(printf "%q " "$@")
tpu_ssh_all "cd ~/$REPO_DIR && . .venv/bin/activate && python -m kard_jax.main --multihost $args 2>&1 | tee -a ~/kard_jax_run.log"
