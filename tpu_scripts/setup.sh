#!/usr/bin/env bash
# Copy this checkout to every worker and install it with jax[tpu] in a virtualenv there.
source "$(dirname "$0")/common.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$root" --exclude='.venv*' --exclude='.git' -czf /tmp/kard_jax_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/kard_jax_src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --project "$PROJECT" --worker=all
tpu_ssh_all "mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf /tmp/kard_jax_src.tgz && cd ~/$REPO_DIR && \
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e '.[tpu]' \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
