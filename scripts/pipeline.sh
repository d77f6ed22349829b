#!/usr/bin/env bash
# The one pipeline body behind speedrun.sh, ittybitty.sh and demo.sh. Those scripts only choose sizes;
# every size below is an environment variable, so tests run the same pipeline at tiny scale on CPU.
# Sourced (not executed) by the top-level scripts after they set their defaults.

: "${DATA_SOURCE:=climbmix}"        # climbmix | fineweb (shards + public chat/eval data downloaded) | demo (package index)
: "${FIRST_SHARDS:=8}"              # downloaded before the tokenizer; the rest (as many as base_train's token
                                    # budget needs, scripts/shard_plan.py) follow in the background
: "${VOCAB_SIZE:=65536}"
: "${TOK_MAX_CHARS:=2000000000}"
: "${DEPTH:=20}"
: "${MODEL_DIM:=-1}"                # -1 = 64 x depth
: "${HEAD_DIM:=128}"
: "${MAX_SEQ_LEN:=2048}"
: "${DEVICE_BATCH_SIZE:=32}"
: "${TOTAL_BATCH_SIZE:=524288}"     # mid-training's tokens per step (and base_train's unless BASE_TOTAL_BATCH_SIZE)
: "${RECIPE:=frontier}"             # base_train --recipe: frontier | 2025 (nanochat/recipes.py)
: "${BASE_TOTAL_BATCH_SIZE:=$TOTAL_BATCH_SIZE}"   # -1 = derived from the run length (needs a param:data ratio)
: "${PARAM_DATA_RATIO:=}"           # empty = the recipe's tokens per parameter
: "${PACKING:=crop}"                # base_train --packing: crop | continue (docs/benchmarks.md)
: "${FP8:=0}"                       # base_train --fp8: 1 | 0 | none (on when an H100-class GPU and torchao are present)
: "${BASE_ITERS:=-1}"               # -1 = from the param:data ratio
: "${BASE_EVAL_EVERY:=250}"
: "${BASE_EVAL_TOKENS:=10485760}"   # val tokens per bits-per-byte evaluation during base_train
: "${BASE_SAVE_EVERY:=1000}"
: "${MID_ITERS:=-1}"                # -1 = one epoch of the mixture
: "${MID_DEVICE_BATCH_SIZE:=$DEVICE_BATCH_SIZE}"
: "${SFT_ITERS:=-1}"                # -1 = --num_epochs of the SFT mixture
: "${SFT_DEVICE_BATCH_SIZE:=4}"
: "${LOSS_SPLIT_TOKENS:=10485760}"
: "${CORE_MAX_PER_TASK:=-1}"        # -1 = every example
: "${CHAT_EVAL_MAX:=-1}"            # -1 = every problem
: "${RUN_RL:=0}"                    # 1 = also run chat_rl and chat_eval -i rl
: "${WANDB_RUN:=dummy}"
: "${NPROC_PER_NODE:=1}"
: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=127.0.0.1}"
: "${MASTER_PORT:=29500}"
: "${GPU_HOURLY_COST:=0}"           # $/GPU-hour for the report's cost line

MODEL_TAG="d$DEPTH"
MODEL_FLAGS=(--depth="$DEPTH" --model_dim="$MODEL_DIM" --head_dim="$HEAD_DIM" --max_seq_len="$MAX_SEQ_LEN")

# Run a training/eval stage: under torchrun when more than one process, plain python otherwise.
launch() {
    local module="$1"
    shift
    if [ "$NPROC_PER_NODE" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
        local rendezvous=(--standalone)
        if [ "$NNODES" -gt 1 ]; then
            rendezvous=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
                        --master_port="$MASTER_PORT")
        fi
        # `--` ends torchrun's own options: otherwise it reads --run=... as an ambiguous abbreviation of --run-path
        torchrun "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" -m "$module" -- "$@"
    else
        python -m "$module" "$@"
    fi
}

# Wait for a background job started with `> $NANOCHAT_BASE_DIR/NAME.log 2> ....err`: show what it printed,
# and the end of its errors when it failed.
wait_for() {
    local pid="$1" name="$2" status=0
    wait "$pid" || status=$?
    cat "$NANOCHAT_BASE_DIR/$name.log"
    if [ "$status" != 0 ]; then
        tail -n 5 "$NANOCHAT_BASE_DIR/$name.err" >&2
    fi
    return "$status"
}

run_pipeline() {
    # shellcheck source=scripts/setup.sh
    source scripts/setup.sh "${SETUP_EXTRA:-}"
    # shellcheck source=scripts/stages.sh
    source scripts/stages.sh
    echo "pipeline: base dir $NANOCHAT_BASE_DIR; data $DATA_SOURCE; model $MODEL_TAG; $NNODES node(s) x $NPROC_PER_NODE process(es)"

    # base_train's run length and data: shard_plan derives the shard count from the same flags
    local base_flags=("${MODEL_FLAGS[@]}" --data_source="$DATA_SOURCE" --device_batch_size="$DEVICE_BATCH_SIZE"
                      --recipe="$RECIPE" --total_batch_size="$BASE_TOTAL_BATCH_SIZE" --num_iterations="$BASE_ITERS"
                      --packing="$PACKING")
    if [ -n "$PARAM_DATA_RATIO" ]; then
        base_flags+=(--target_param_data_ratio="$PARAM_DATA_RATIO")
    fi
    setup_stage report_reset python -m nanochat.report reset
    local shard_pid="" prefetch_pid=""
    if [ "$DATA_SOURCE" = demo ]; then
        setup_stage demo_data python -m nanochat.dataset --source demo --what all
    else
        if [ ! -f "$PIPELINE_MARKS/prefetch.done" ] && [ "$NODE_RANK" = 0 ]; then
            python -m scripts.prefetch > "$NANOCHAT_BASE_DIR/prefetch.log" 2> "$NANOCHAT_BASE_DIR/prefetch.err" &
            prefetch_pid=$!
        fi
        setup_stage shards_first python -m nanochat.dataset --source "$DATA_SOURCE" -n "$FIRST_SHARDS"
    fi
    setup_stage tok_train python -m scripts.tok_train --vocab_size="$VOCAB_SIZE" --max_chars="$TOK_MAX_CHARS" \
        --data_source="$DATA_SOURCE"
    if [ "$DATA_SOURCE" != demo ] && [ ! -f "$PIPELINE_MARKS/shards_all.done" ] && [ "$NODE_RANK" = 0 ]; then
        python -m scripts.shard_plan "${base_flags[@]}" > "$NANOCHAT_BASE_DIR/shard_plan.log" \
            2> "$NANOCHAT_BASE_DIR/shard_plan.err" &
        shard_pid=$!
    fi
    setup_stage tok_eval python -m scripts.tok_eval
    if [ -n "$prefetch_pid" ]; then
        echo "pipeline: waiting for the task data and CORE bundle (log: $NANOCHAT_BASE_DIR/prefetch.err)"
        stage prefetch wait_for "$prefetch_pid" prefetch
    elif [ "$DATA_SOURCE" != demo ] && [ "$NODE_RANK" != 0 ]; then
        setup_stage prefetch true
    fi
    if [ -n "$shard_pid" ]; then
        echo "pipeline: waiting for the remaining shards (log: $NANOCHAT_BASE_DIR/shard_plan.err)"
        stage shards_all wait_for "$shard_pid" shard_plan
    elif [ "$DATA_SOURCE" != demo ] && [ "$NODE_RANK" != 0 ]; then
        setup_stage shards_all true
    fi
    if [ -n "${PRE_TRAIN_CHECK:-}" ]; then
        stage preflight "$PRE_TRAIN_CHECK"
    fi

    # the run's steps, tokens and (on a known GPU) expected training time, printed before training starts
    local plan_flags=("${MODEL_FLAGS[@]}" --recipe="$RECIPE" --device_batch_size="$DEVICE_BATCH_SIZE"
                      --total_batch_size="$BASE_TOTAL_BATCH_SIZE" --num_iterations="$BASE_ITERS"
                      --world_size=$((NPROC_PER_NODE * NNODES)))
    if [ -n "$PARAM_DATA_RATIO" ]; then
        plan_flags+=(--target_param_data_ratio="$PARAM_DATA_RATIO")
    fi
    python -m scripts.model_info "${plan_flags[@]}"

    local train=(--run="$WANDB_RUN" --model_tag="$MODEL_TAG")
    # shellcheck disable=SC2046  # resume_flag prints nothing or one word
    stage base_train launch scripts.base_train "${base_flags[@]}" "${train[@]}" --fp8="$FP8" \
        --eval_every="$BASE_EVAL_EVERY" --eval_tokens="$BASE_EVAL_TOKENS" --save_every="$BASE_SAVE_EVERY" \
        $(resume_flag "$MODEL_TAG" base_checkpoints)
    stage base_loss launch scripts.base_loss --model_tag="$MODEL_TAG" --device_batch_size="$DEVICE_BATCH_SIZE" \
        --split_tokens="$LOSS_SPLIT_TOKENS" --data_source="$DATA_SOURCE"
    # from here on nothing is downloaded: --offline names any file that prefetch (or demo_data) did not provide
    stage base_eval launch scripts.base_eval --offline --model_tag="$MODEL_TAG" --max_per_task="$CORE_MAX_PER_TASK"
    # shellcheck disable=SC2046
    stage mid_train launch scripts.mid_train "${train[@]}" --offline --device_batch_size="$MID_DEVICE_BATCH_SIZE" \
        --total_batch_size="$TOTAL_BATCH_SIZE" --num_iterations="$MID_ITERS" \
        $(resume_flag "$MODEL_TAG" mid_checkpoints)
    stage chat_eval_mid launch scripts.chat_eval --offline -i mid --model_tag="$MODEL_TAG" -x "$CHAT_EVAL_MAX"
    # shellcheck disable=SC2046
    stage chat_sft launch scripts.chat_sft "${train[@]}" --offline --device_batch_size="$SFT_DEVICE_BATCH_SIZE" \
        --num_iterations="$SFT_ITERS" $(resume_flag "$MODEL_TAG" chatsft_checkpoints)
    stage chat_eval_sft launch scripts.chat_eval --offline -i sft --model_tag="$MODEL_TAG" -x "$CHAT_EVAL_MAX"
    if [ "$RUN_RL" = 1 ]; then
        # shellcheck disable=SC2046
        stage chat_rl launch scripts.chat_rl "${train[@]}" --offline $(resume_flag "$MODEL_TAG" chatrl_checkpoints)
        stage chat_eval_rl launch scripts.chat_eval --offline -i rl --model_tag="$MODEL_TAG" -a GSM8K -x "$CHAT_EVAL_MAX"
    fi
    python -m nanochat.report generate --gpu_hourly_cost="$GPU_HOURLY_COST"
    local source=sft
    [ "$RUN_RL" = 1 ] && source=rl
    echo "pipeline: finished in $(( $(date +%s) - PIPELINE_START ))s; the report card is in report.md"
    echo "pipeline: chat in the browser:  python -m scripts.chat_web --source $source --model_tag=$MODEL_TAG"
    echo "pipeline: or in the terminal:   python -m scripts.chat_cli --source $source --model_tag=$MODEL_TAG"
}
