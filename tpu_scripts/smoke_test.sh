#!/usr/bin/env bash
# Check a slice end to end: every host sees the whole slice through jax.distributed, then a tiny
# sharded training run (tiny T5, synthetic data) steps on all hosts and checkpoints to MODEL_DIR.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE --model-dir DIR [options]

Options:
  --model-dir DIR             a fresh directory every worker sees (on the gcsfuse mount) [MODEL_DIR]
  --steps N                   training steps (default 20)
$COMMON_USAGE
USAGE
}

MODEL_DIR="${MODEL_DIR:-}"
STEPS=20
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --model-dir|--model-dir=*) option_value "$@"; MODEL_DIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --steps|--steps=*) option_value "$@"; STEPS="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options
[[ -n "$MODEL_DIR" ]] || die "set --model-dir"
[[ "$STEPS" =~ ^[0-9]+$ ]] || die "--steps must be a number"

tpu_ssh all "$(remote_env) && python -c 'import jax; jax.distributed.initialize(); \
print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"local devices\", jax.local_device_count(), \
\"global devices\", jax.device_count())'"
common=(--name "$TPU_NAME" --zone "$ZONE" --num-workers "$NUM_WORKERS")
if [[ -n "$PROJECT" ]]; then common+=(--project "$PROJECT"); fi
if [[ "$DRY_RUN" == 1 ]]; then common+=(--dry-run); fi
STAGE=train_student "$SCRIPTS_DIR/run_on_all_workers.sh" "${common[@]}" --run-name "smoke-$(date +%Y%m%d-%H%M%S)" -- \
  --gin_file=gin_configs/models/t5_1_1_tiny.gin --gin_file=gin_configs/runs/synthetic_copy_data.gin \
  --gin.MODEL_DIR="'$MODEL_DIR'" --gin.TRAIN_STEPS="$STEPS" --gin.SAVE_PERIOD=10
