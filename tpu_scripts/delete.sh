#!/usr/bin/env bash
# Delete the TPU VM / pod slice (checkpoints in gs:// are kept).
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --quiet
