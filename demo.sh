#!/usr/bin/env bash
# The whole nanochat pipeline at toy scale on whatever this machine has (CPU is fine), offline-capable:
# demo data from the package index, a tokenizer, a small base model, mid-training, SFT, evals, the report
# card, and the chat server on 127.0.0.1. About 20 minutes on 2 CPU cores.
#   bash demo.sh             # ends with the chat server up on http://127.0.0.1:8000 (Ctrl-C stops it)
#   bash demo.sh --no-serve  # stops before the server (CI uses this)
# Any size in scripts/pipeline.sh can be overridden from the environment; re-running skips finished stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

SERVE=1
for arg in "$@"; do
    case "$arg" in
        --no-serve) SERVE=0 ;;
        *) echo "error: unknown argument $arg (the only option is --no-serve)" >&2; exit 2 ;;
    esac
done

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-demo}"
: "${DATA_SOURCE:=demo}"
: "${VOCAB_SIZE:=4096}"
: "${TOK_MAX_CHARS:=30000000}"
: "${DEPTH:=4}"
: "${MODEL_DIM:=128}"
: "${HEAD_DIM:=64}"
: "${MAX_SEQ_LEN:=256}"
: "${RECIPE:=frontier}"    # leads 2025 at 200 and 1000 steps on CPU (docs/benchmarks.md, the race)
: "${PACKING:=continue}"      # the demo corpus is a few very long texts: crop would keep only their first rows
: "${DEVICE_BATCH_SIZE:=16}"
: "${TOTAL_BATCH_SIZE:=$((DEVICE_BATCH_SIZE * MAX_SEQ_LEN))}"
: "${BASE_ITERS:=1000}"      # >= 500 steps: base_train compiles on CPU (nanochat.trainer.auto_compile)
: "${BASE_EVAL_EVERY:=250}"
: "${BASE_EVAL_TOKENS:=131072}"
: "${BASE_SAVE_EVERY:=250}"
: "${MID_ITERS:=100}"
: "${SFT_ITERS:=100}"
: "${SFT_DEVICE_BATCH_SIZE:=8}"
: "${LOSS_SPLIT_TOKENS:=65536}"
: "${CORE_MAX_PER_TASK:=40}"
: "${CHAT_EVAL_MAX:=40}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

# shellcheck source=scripts/pipeline.sh
source scripts/pipeline.sh
run_pipeline

if [ "$SERVE" = 1 ]; then
    echo "demo: starting the chat server; open http://127.0.0.1:8000 (Ctrl-C to stop)"
    exec python -m scripts.chat_web --source sft --model_tag="$MODEL_TAG"
fi
