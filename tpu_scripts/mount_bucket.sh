#!/usr/bin/env bash
# Mount a Cloud Storage bucket with gcsfuse at the same path on every worker (MODEL_DIR, data,
# knowledge bases and exports then live in the bucket and every host sees the same files).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE --bucket BUCKET [--mount-point DIR] [options]

Installs gcsfuse (Google's apt repository) on every worker and mounts gs://BUCKET at DIR
(default /mnt/kard). Use a bucket with hierarchical namespace enabled: orbax finishes each
checkpoint by renaming its temporary directory, and only such buckets rename folders atomically.
The TPU VM's service account needs read/write access to the bucket. Rerun after a slice restarts.

Options:
  --bucket BUCKET             bucket name, without gs:// [BUCKET]
  --mount-point DIR           absolute path, the same on every worker [MOUNT_POINT] (default /mnt/kard)
$COMMON_USAGE
USAGE
}

BUCKET="${BUCKET:-}"
MOUNT_POINT="${MOUNT_POINT:-/mnt/kard}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --bucket|--bucket=*) option_value "$@"; BUCKET="${OPT_VALUE#gs://}"; shift "$OPT_SHIFT" ;;
    --mount-point|--mount-point=*) option_value "$@"; MOUNT_POINT="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    *) parse_common_option "$@" || { usage >&2; die "unknown option: $1"; }; shift "$COMMON_SHIFT" ;;
  esac
done
finish_common_options
[[ -n "$BUCKET" ]] || die "set --bucket"
[[ "$MOUNT_POINT" == /* ]] || die "--mount-point must be an absolute path"
bucket="$(quote "${BUCKET%/}")"
mnt="$(quote "$MOUNT_POINT")"

tpu_ssh all "set -e; if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi; \
sudo mkdir -p $mnt && sudo chown \"\$(id -u):\$(id -g)\" $mnt; \
if ! mountpoint -q $mnt; then gcsfuse --implicit-dirs $bucket $mnt; fi; \
echo \"worker \$(hostname): gs://$BUCKET on $MOUNT_POINT\""
