#!/usr/bin/env bash
# Create a TPU VM / pod slice. Preemptible/spot with SPOT=1 (runs then resume from MODEL_DIR).
source "$(dirname "$0")/common.sh"
extra=()
[ "${SPOT:-0}" = 1 ] && extra+=(--spot)
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${extra[@]}"
