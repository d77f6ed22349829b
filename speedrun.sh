#!/usr/bin/env bash
# The record configuration on one 8xH100 node: ClimbMix shards (DATA_SOURCE=fineweb for FineWeb-Edu), a
# 32768-token tokenizer (the record's), a d24 base model under the frontier recipe (nanochat/recipes.py) at 8 tokens per
# block-matrix parameter, fp8 matmuls on H100-class GPUs, the batch derived from the run length, then
# mid-training, SFT, evals and the report card. Public reference for this configuration: karpathy/nanochat's
# leaderboard run 6 (d24, ratio 8, fp8, ClimbMix) trained base_train in 1.65 h for CORE 0.2626; model_info
# prints the expected time (our FLOPs at that run's MFU) before training starts.
#   bash speedrun.sh                                   # one node, 8 GPUs
#   WANDB_RUN=speedrun bash speedrun.sh                # log to wandb
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash speedrun.sh   # on each node, NODE_RANK 0 and 1
# Every size is an environment variable (see scripts/pipeline.sh); re-running skips finished stages and
# resumes interrupted training from its last checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

: "${DATA_SOURCE:=climbmix}"         # or fineweb (FineWeb-Edu); each source has its own base_data/<source>/
: "${NPROC_PER_NODE:=8}"
: "${VOCAB_SIZE:=32768}"
: "${DEPTH:=24}"
: "${DEVICE_BATCH_SIZE:=16}"
: "${RECIPE:=frontier}"
: "${BASE_TOTAL_BATCH_SIZE:=${TOTAL_BATCH_SIZE:--1}}"   # -1: derived from the run length
: "${PARAM_DATA_RATIO:=8}"
: "${FP8:=none}"
if command -v nvidia-smi >/dev/null 2>&1; then
    : "${SETUP_EXTRA:=fp8}"          # torchao, for --fp8 on H100-class GPUs
fi
: "${GPU_HOURLY_COST:=3.0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# shellcheck source=scripts/pipeline.sh
source scripts/pipeline.sh
run_pipeline
