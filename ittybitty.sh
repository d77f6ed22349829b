#!/usr/bin/env bash
# The full pipeline on one 24 GB GPU (RTX 3090/4090) without torchrun: a 24576-token tokenizer and a
# 4-layer, 512-wide base model (8 heads of 64) under the frontier recipe, trained on ~500M tokens (954 steps of
# 524,288).
#   bash ittybitty.sh
# Sizes are environment variables (see scripts/pipeline.sh); re-running skips finished stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

: "${DATA_SOURCE:=climbmix}"         # or fineweb (FineWeb-Edu); each source has its own base_data/<source>/
: "${NPROC_PER_NODE:=1}"
: "${VOCAB_SIZE:=24576}"
: "${DEPTH:=4}"
: "${RECIPE:=frontier}"
: "${MODEL_DIM:=512}"
: "${HEAD_DIM:=64}"
: "${DEVICE_BATCH_SIZE:=48}"
: "${TOTAL_BATCH_SIZE:=524288}"
: "${BASE_ITERS:=954}"
: "${SFT_DEVICE_BATCH_SIZE:=8}"
: "${VRAM_GB:=24}"
: "${GPU_HOURLY_COST:=0.3}"

# Before training: model_info estimates peak memory for these flags and compares it with the free VRAM.
# Without a CUDA GPU (the CPU tests of this script) there is no VRAM to check, so it says so and goes on.
vram_check() {
    if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "vram check: skipped, no CUDA GPU on this machine"
        return 0
    fi
    python -m scripts.model_info --depth="$DEPTH" --model_dim="$MODEL_DIM" --head_dim="$HEAD_DIM" \
        --max_seq_len="${MAX_SEQ_LEN:-2048}" --vocab_size="$VOCAB_SIZE" --device_batch_size="$DEVICE_BATCH_SIZE" \
        --vram_gb="$VRAM_GB" --check_free_vram
}
PRE_TRAIN_CHECK=vram_check

# shellcheck source=scripts/pipeline.sh
source scripts/pipeline.sh
run_pipeline
