# Shared settings for the TPU scripts; override any of them in the environment.
#   TPU_NAME=kard-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 bash tpu_scripts/create.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO_DIR="${REPO_DIR:-kard_jax}"   # checkout directory on every worker, relative to $HOME

tpu_ssh_all() {  # run one command on every worker of the slice (each host runs one JAX process)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}
