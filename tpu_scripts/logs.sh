#!/usr/bin/env bash
# Copy one run's log from every worker to $LOG_DIR/<run>/worker-<i>.log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE --run-name RUN [--worker W] [options]

Copies ~/$REMOTE_LOG_DIR/RUN.log from each worker to $LOG_DIR/RUN/worker-<i>.log (LOG_DIR
from the environment, default 'logs'). Safe to repeat while a detached run is going.

Options:
  --run-name RUN              the run (run_on_all_workers.sh --run-name / the stage scripts)
  --worker W                  'all' (default: workers 0..N-1) or one worker index
$COMMON_USAGE
USAGE
}

RUN_NAME=""
WORKER="all"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --run-name|--run-name=*) option_value "$@"; RUN_NAME="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --worker|--worker=*) option_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options
[[ -n "$RUN_NAME" ]] || die "set --run-name"

if [[ "$WORKER" == all ]]; then
  workers=()
  for (( i = 0; i < NUM_WORKERS; i++ )); do workers+=("$i"); done
else
  workers=("$WORKER")
fi
run mkdir -p "$LOG_DIR/$RUN_NAME"
status=0
for i in "${workers[@]}"; do
  tpu_scp "$i" "$TPU_NAME:$REMOTE_LOG_DIR/$RUN_NAME.log" "$LOG_DIR/$RUN_NAME/worker-$i.log" || status=$?
done
exit "$status"
