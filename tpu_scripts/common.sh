# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by every tpu_scripts/*.sh (sourced, not run). Settings come from flags or the environment:
#   --name / TPU_NAME            TPU VM (node) name; also names the queued resource (<name>-qr)
#   --zone / ZONE                e.g. us-central2-b (v4), us-west4-a (v5e)
#   --project / PROJECT          optional; gcloud's configured project when unset
#   --accelerator-type / ACCELERATOR_TYPE   v4-8, v4-32, v5litepod-16, ... (default v4-8)
#   --runtime-version / RUNTIME_VERSION     default from the accelerator type
#   --num-workers / NUM_WORKERS  hosts in the slice (default from the accelerator type)
#   --dry-run                    print every command (one per line, prefixed "DRY-RUN: ") and run none
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
NUM_WORKERS="${NUM_WORKERS:-}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-}"
REPO_DIR="${REPO_DIR:-kard_jax}"              # checkout on every worker, relative to $HOME
VENV_DIR="${VENV_DIR:-kard_jax_venv}"         # virtualenv on every worker, relative to $HOME
REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-kard_jax_logs}"  # per-run logs on every worker, relative to $HOME
LOG_DIR="${LOG_DIR:-logs}"                    # collected logs here: $LOG_DIR/<run>/worker-<i>.log
DRY_RUN="${DRY_RUN:-0}"
DRY_RUN_PREFIX="DRY-RUN: "
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPTS_DIR/.." && pwd)"

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

COMMON_USAGE="Common options (or the environment variable in brackets):
  --name NAME                 TPU VM name [TPU_NAME], required
  --zone ZONE                 zone [ZONE], required, e.g. us-central2-b (v4) or us-west4-a (v5e)
  --project PROJECT           project [PROJECT]; gcloud's configured project when unset
  --accelerator-type TYPE     v4-8, v4-32, v5litepod-16, ... [ACCELERATOR_TYPE] (default v4-8)
  --runtime-version VERSION   [RUNTIME_VERSION] (default: from the accelerator type)
  --num-workers N             hosts in the slice [NUM_WORKERS] (default: from the accelerator type)
  --dry-run                   print the commands (one per line, prefixed '$DRY_RUN_PREFIX') and run nothing
  -h, --help                  this text"

# parse_common_option "$@": consumes one common option; sets COMMON_SHIFT (1 or 2); returns 1 if unknown.
parse_common_option() {
  local opt="$1" value=""
  COMMON_SHIFT=1
  case "$opt" in
    --dry-run) DRY_RUN=1; return 0 ;;
    --*=*) value="${opt#*=}"; opt="${opt%%=*}" ;;
    --name|--zone|--project|--accelerator-type|--runtime-version|--num-workers|--queued-resource)
      [[ $# -ge 2 ]] || die "$opt needs a value"
      value="$2"; COMMON_SHIFT=2 ;;
    *) return 1 ;;
  esac
  case "$opt" in
    --name) TPU_NAME="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --accelerator-type) ACCELERATOR_TYPE="$value" ;;
    --runtime-version) RUNTIME_VERSION="$value" ;;
    --num-workers) NUM_WORKERS="$value" ;;
    --queued-resource) QUEUED_RESOURCE="$value" ;;
    *) return 1 ;;
  esac
}

# option_value "$@": the value of "--opt VALUE" or "--opt=VALUE"; sets OPT_SHIFT.
option_value() {
  if [[ "$1" == *=* ]]; then
    OPT_VALUE="${1#*=}"; OPT_SHIFT=1
  else
    [[ $# -ge 2 ]] || die "$1 needs a value"
    OPT_VALUE="$2"; OPT_SHIFT=2
  fi
}

default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    *) echo "tpu-ubuntu2204-base" ;;  # v4 and older
  esac
}

# Hosts (TPU VM workers) in a slice: v2/v3/v4/v5p names count TensorCores (8 per host), v5e/v6e
# names count chips (8 per single-host slice, 4 per host beyond that).
default_num_workers() {
  local type="$1" n
  n="${type##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || { echo 1; return; }
  case "$type" in
    v5litepod-*|v5e-*|v6e-*) if (( n <= 8 )); then echo 1; else echo $(( n / 4 )); fi ;;
    *) if (( n <= 8 )); then echo 1; else echo $(( n / 8 )); fi ;;
  esac
}

finish_common_options() {
  [[ -n "$TPU_NAME" ]] || die "set --name (or TPU_NAME)"
  [[ -n "$ZONE" ]] || die "set --zone (or ZONE)"
  [[ -n "$RUNTIME_VERSION" ]] || RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")"
  [[ -n "$NUM_WORKERS" ]] || NUM_WORKERS="$(default_num_workers "$ACCELERATOR_TYPE")"
  [[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer, got '$NUM_WORKERS'"
  [[ -n "$QUEUED_RESOURCE" ]] || QUEUED_RESOURCE="${TPU_NAME}-qr"
  GCLOUD_LOCATION=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then GCLOUD_LOCATION+=(--project="$PROJECT"); fi
}

# quote ARG...: each argument as bash would need it (plain words stay plain).
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# run CMD...: print the command; run it unless --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "${DRY_RUN_PREFIX}$(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# tpu_ssh WORKER COMMAND: run a shell command on one worker (index) or on all of them ("all").
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker="$1" --command="$2"
}

# tpu_scp WORKER SRC DST: copy between here and workers (prefix the remote side with "$TPU_NAME:").
tpu_scp() {
  run gcloud compute tpus tpu-vm scp "$2" "$3" "${GCLOUD_LOCATION[@]}" --worker="$1"
}

# The remote preamble of every kard_jax command: the checkout, its virtualenv and, when present,
# ~/kard_jax.env (KEY=VALUE lines, e.g. OPENAI_API_KEY for the teacher: secrets stay off command lines).
remote_env() {
  echo "cd ~/$REPO_DIR && source ~/$VENV_DIR/bin/activate && if [ -f ~/kard_jax.env ]; then set -a; \
source ~/kard_jax.env; set +a; fi"
}
