#!/usr/bin/env bash
# Signal the kard_jax processes on every worker (SIGTERM: training checkpoints, then stops).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [--signal TERM|INT|KILL] [options]

Sends the signal to every 'python -m kard_jax.main' process on every worker. SIGTERM (the
default) is what a preemption sends: training saves a checkpoint and exits 0, any other stage
stops cleanly; a rerun resumes from the newest checkpoint in MODEL_DIR. KILL stops at once.
The slice keeps running (and billing): delete.sh removes it.

Options:
  --signal SIG                TERM (default), INT or KILL
$COMMON_USAGE
USAGE
}

SIG="TERM"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --signal|--signal=*) option_value "$@"; SIG="${OPT_VALUE#SIG}"; shift "$OPT_SHIFT" ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options
case "$SIG" in TERM|INT|KILL) ;; *) die "--signal must be TERM, INT or KILL" ;; esac

# The [.] keeps pkill from matching the shell that runs it.
tpu_ssh all "pkill -$SIG -f 'python -m kard_jax[.]main' && echo \"worker \$(hostname): sent SIG$SIG\" \
|| echo \"worker \$(hostname): no kard_jax process\""
