#!/usr/bin/env bash
# Request a TPU slice as a queued resource (gcloud compute tpus queued-resources create).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [--accelerator-type TYPE] [--spot] [--wait] [options] [-- GCLOUD_ARGS...]

Requests the slice NAME as the queued resource NAME-qr (or --queued-resource ID). It is filled
when capacity frees up; --wait polls until it is ACTIVE. Spot slices cost less but can be
preempted at any time: training then saves a checkpoint on SIGTERM and a rerun resumes.
Arguments after '--' are added to the gcloud command (e.g. --service-account=SA --reserved).

Options:
  --spot                      a Spot slice (preemptible)
  --valid-until-duration D    give up if not filled within D (e.g. 6h)
  --wait                      poll until the queued resource is ACTIVE (fail on FAILED/SUSPENDED)
  --queued-resource ID        queued resource id [QUEUED_RESOURCE] (default NAME-qr)
$COMMON_USAGE
USAGE
}

SPOT=0
WAIT=0
VALID_UNTIL=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    --spot) SPOT=1; shift ;;
    --wait) WAIT=1; shift ;;
    --valid-until-duration|--valid-until-duration=*) option_value "$@"; VALID_UNTIL="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options

args=(gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" "${GCLOUD_LOCATION[@]}"
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
if [[ "$SPOT" == 1 ]]; then args+=(--spot); fi
if [[ -n "$VALID_UNTIL" ]]; then args+=(--valid-until-duration="$VALID_UNTIL"); fi
args+=("${EXTRA[@]}")
run "${args[@]}"

if [[ "$WAIT" == 1 ]]; then
  describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_LOCATION[@]}"
            --format=value\(state.state\))
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"  # polled every 60 s until ACTIVE
    exit 0
  fi
  while true; do
    state="$(run "${describe[@]}")"
    echo "queued resource $QUEUED_RESOURCE: $state" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource $QUEUED_RESOURCE is $state" ;;
    esac
    sleep 60
  done
fi
