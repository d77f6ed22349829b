#!/usr/bin/env bash
# The full run on one 8xH100 node in about four hours: ClimbMix shards (DATA_SOURCE=fineweb for FineWeb-Edu),
# a 65536-token tokenizer, a d20 base model (~560M params, 20 tokens per parameter), mid-training, SFT, evals and the report card.
#   bash speedrun.sh                                   # one node, 8 GPUs
#   WANDB_RUN=speedrun bash speedrun.sh                # log to wandb
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash speedrun.sh   # on each node, NODE_RANK 0 and 1
# Every size is an environment variable (see scripts/pipeline.sh); re-running skips finished stages and
# resumes interrupted training from its last checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

: "${DATA_SOURCE:=climbmix}"         # or fineweb (FineWeb-Edu); each source has its own base_data/<source>/
: "${NPROC_PER_NODE:=8}"
: "${VOCAB_SIZE:=65536}"
: "${DEPTH:=20}"
: "${DEVICE_BATCH_SIZE:=32}"
: "${GPU_HOURLY_COST:=3.0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# shellcheck source=scripts/pipeline.sh
source scripts/pipeline.sh
run_pipeline
