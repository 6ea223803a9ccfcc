#!/usr/bin/env bash
# The data half of KARD on real OBQA, stage by stage through the run gins (what a researcher
# runs): import + filter rationales -> KB over wikipedia_summaries -> rationale retrieval ->
# vocabulary -> materialized `kard` task. Prints each stage's summary line and timing.
#   bash benchmarks/obqa_kard_pipeline.sh [OUT_DIR]   (needs ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${KARD_SHARED_DATA:-../shared/data}"
OUT="${1:-/tmp/kard_obqa_pipeline}"
[ -d "$DATA/obqa" ] || { echo "no $DATA/obqa: this benchmark needs the shared real data" >&2; exit 2; }
mkdir -p "$OUT"
run() { local t0=$SECONDS; python -m kard_jax.main "$@" 2>&1 | grep -E "^kard_jax|materialized|examples" || true; echo "   ($((SECONDS - t0)) s)"; }
echo "== teacher rationales (import + filter)"
run --gin_file=gin_configs/runs/teacher.gin --gin.EXAMPLES="'$DATA/obqa/train.jsonl'" \
    --gin.RATIONALES="'$DATA/obqa/rationales.train.jsonl.gz'" --gin.OUT_DIR="'$OUT/teacher'"
echo "== knowledge base"
run --gin_file=gin_configs/runs/build_kb.gin --gin.CORPUS_PATHS="['$DATA/kb/wikipedia_summaries.jsonl.gz']" \
    --gin.KB_PATH="'$OUT/kb'"
echo "== rationale retrieval (train) and question retrieval (dev)"
run --gin_file=gin_configs/runs/retrieve.gin --gin.EXAMPLES_PATH="'$DATA/obqa/train.jsonl'" \
    --gin.KB_PATH="'$OUT/kb'" --gin.OUTPUT_DIR="'$OUT/retrieval_train'" --gin.RATIONALES_PATH="'$OUT/teacher'" \
    --gin.QUESTION_TOP_K=20
run --gin_file=gin_configs/runs/retrieve.gin --gin.EXAMPLES_PATH="'$DATA/obqa/dev.jsonl'" \
    --gin.KB_PATH="'$OUT/kb'" --gin.OUTPUT_DIR="'$OUT/retrieval_dev'" --gin.QUESTION_TOP_K=20
echo "== vocabulary"
run --gin_file=gin_configs/runs/build_vocab.gin --gin.VOCAB_DIR="'$OUT/vocab'" \
    --gin.CORPUS_PATHS="['$DATA/kb/wikipedia_summaries.jsonl.gz']" \
    --gin.DATASET_PATHS="['$DATA/obqa/train.jsonl', '$DATA/obqa/rationales.train.jsonl.gz']" --gin.VOCAB_SIZE=8000
echo "== materialize kard_obqa_kard (train)"
run --gin_file=gin_configs/runs/materialize.gin --gin.DATASET="'obqa'" --gin.TASK="'kard_obqa_kard'" \
    --gin.OUT_DIR="'$OUT/tasks'" --gin.TRAIN_PATH="'$DATA/obqa/train.jsonl'" --gin.VOCAB_PATH="'$OUT/vocab'" \
    --gin.RATIONALES_PATH="'$OUT/teacher'" --gin.RETRIEVAL_CACHE_DIR="'$OUT/retrieval_train'" \
    --gin.KB_DIR="'$OUT/kb'" --gin.N_PASSAGES=1
