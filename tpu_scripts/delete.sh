#!/usr/bin/env bash
# Delete the slice and its queued resource. Checkpoints and data in Cloud Storage are kept.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [--tpu-vm-only] [options]

Deletes the queued resource NAME-qr together with its TPU VM (--force). Billing stops once the
TPU VM is gone. With --tpu-vm-only, deletes a TPU VM that was created without a queued resource.

Options:
  --tpu-vm-only               gcloud compute tpus tpu-vm delete NAME instead
  --queued-resource ID        queued resource id [QUEUED_RESOURCE] (default NAME-qr)
$COMMON_USAGE
USAGE
}

VM_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu-vm-only) VM_ONLY=1; shift ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options

if [[ "$VM_ONLY" == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --quiet
else
  run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${GCLOUD_LOCATION[@]}" --force --quiet
fi
