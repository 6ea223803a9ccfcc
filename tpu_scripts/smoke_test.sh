#!/usr/bin/env bash
# Check the slice: every host sees the global device count, and a tiny sharded training run
# (tiny T5, synthetic data) steps across all hosts and checkpoints to MODEL_DIR.
source "$(dirname "$0")/common.sh"
: "${MODEL_DIR:?set MODEL_DIR to a gs:// directory for the smoke run}"
tpu_ssh_all "cd ~/$REPO_DIR && . .venv/bin/activate && python -c 'import jax; jax.distributed.initialize(); \
print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())'"
bash "$(dirname "$0")/run_on_all_workers.sh" --gin_file=gin_configs/runs/train_student.gin \
  --gin_file=gin_configs/models/t5_1_1_tiny.gin --gin.MODEL_DIR="'$MODEL_DIR'" --gin.TRAIN_STEPS=20
