#!/usr/bin/env bash
# Run `python -m kard_jax.main --multihost ...` on every worker of the slice (one JAX process per
# host; jax.distributed.initialize() finds the coordinator from the TPU metadata) and collect each
# worker's log to $LOG_DIR/<run>/worker-<i>.log. The stage scripts (train_student.sh, ...) wrap it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE="${STAGE:-}"
usage() {
  local what="python -m kard_jax.main --multihost KARD_JAX_ARGS..."
  if [[ -n "$STAGE" ]]; then what="python -m kard_jax.main --multihost --gin_file=gin_configs/runs/$STAGE.gin ..."; fi
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [options] [--] KARD_JAX_ARGS...

Runs on every worker, in ~/$REPO_DIR with ~/$VENV_DIR active:
  $what
${STAGE_NOTE:-}
Arguments after '--' (and any --gin*, --plan_* argument) go to kard_jax; gin values are quoted
as on a local command line, e.g. --gin.MODEL_DIR="'/mnt/kard/runs/obqa'". Each worker writes
~/$REMOTE_LOG_DIR/<run>.log; the logs are then copied to $LOG_DIR/<run>/worker-<i>.log
(also after a failure). MODEL_DIR and every input path must be visible to every worker (the
same gcsfuse mount on every worker, see docs/TPU.md).

Options:
  --run-name NAME             names the logs [RUN_NAME] (default: <stage>-<date>-<time>)
  --detach                    start in the background (nohup) and return; collect the logs later
                              with logs.sh --run-name NAME, stop with stop.sh
  --worker W                  'all' (default) or one worker index
  --no-multihost              do not pass --multihost (single-process jobs)
  --cpu                       JAX_PLATFORMS=cpu (CPU-only stages on one worker of a pod slice)
$COMMON_USAGE
USAGE
}

RUN_NAME="${RUN_NAME:-}"
DETACH=0
WORKER="all"
MULTIHOST=1
CPU=0
KARD_ARGS=()
if [[ -n "$STAGE" ]]; then KARD_ARGS+=("--gin_file=gin_configs/runs/$STAGE.gin"); fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; KARD_ARGS+=("$@"); break ;;
    --run-name|--run-name=*) option_value "$@"; RUN_NAME="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --worker|--worker=*) option_value "$@"; WORKER="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --detach) DETACH=1; shift ;;
    --no-multihost) MULTIHOST=0; shift ;;
    --all-workers) WORKER="all"; MULTIHOST=1; CPU=0; shift ;;
    --cpu) CPU=1; shift ;;
    --gin*|--plan_*|--dry_run) KARD_ARGS+=("$1"); shift ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1 (kard_jax arguments go after --)"; }
       shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be 'all' or an index, got '$WORKER'"
[[ ${#KARD_ARGS[@]} -gt 0 ]] || { usage >&2; die "no kard_jax arguments (at least --gin_file=...)"; }
if [[ -z "$RUN_NAME" ]]; then RUN_NAME="${STAGE:-kard_jax}-$(date +%Y%m%d-%H%M%S)"; fi
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name may use letters, digits, '_', '.', '-' only"

main_args=(python -m kard_jax.main)
if [[ "$MULTIHOST" == 1 ]]; then main_args+=(--multihost); fi
main_args+=(--gin_search_paths=gin_configs "${KARD_ARGS[@]}")
env_prefix=""
if [[ "$CPU" == 1 ]]; then env_prefix="JAX_PLATFORMS=cpu "; fi
remote_log="$REMOTE_LOG_DIR/$RUN_NAME.log"
if [[ "$DETACH" == 1 ]]; then
  inner="$(remote_env) && ${env_prefix}exec $(quote "${main_args[@]}")"
  command="mkdir -p ~/$REMOTE_LOG_DIR && nohup setsid bash -c $(quote "$inner") \
> ~/$remote_log 2>&1 < /dev/null & echo \"worker \$(hostname): started $RUN_NAME (pid \$!)\""
  tpu_ssh "$WORKER" "$command"
  if [[ "$DRY_RUN" != 1 ]]; then
    echo "started $RUN_NAME; collect its logs with: $SCRIPTS_DIR/logs.sh --name $TPU_NAME --zone $ZONE --run-name $RUN_NAME" >&2
  fi
  exit 0
fi

command="mkdir -p ~/$REMOTE_LOG_DIR && $(remote_env) && set -o pipefail && \
${env_prefix}$(quote "${main_args[@]}") 2>&1 | tee ~/$remote_log"
status=0
tpu_ssh "$WORKER" "$command" || status=$?
logs_args=(--name "$TPU_NAME" --zone "$ZONE" --num-workers "$NUM_WORKERS" --run-name "$RUN_NAME" --worker "$WORKER")
if [[ -n "$PROJECT" ]]; then logs_args+=(--project "$PROJECT"); fi
if [[ "$DRY_RUN" == 1 ]]; then logs_args+=(--dry-run); fi
"$SCRIPTS_DIR/logs.sh" "${logs_args[@]}" || echo "warning: could not collect every log of $RUN_NAME" >&2
exit "$status"
