#!/usr/bin/env bash
# Stage runner shared by speedrun.sh, ittybitty.sh and demo.sh.
#   stage NAME CMD...   runs CMD unless NAME finished before (a marker in $NANOCHAT_BASE_DIR/pipeline/);
#                       a failure stops the whole script with the stage's name.
#   setup_stage NAME CMD...  a stage that writes into the shared base dir (data, tokenizer, eval bundle): with
#                       several nodes only node 0 (NODE_RANK 0) runs it; the others wait for its marker, so nodes
#                       sharing one NANOCHAT_BASE_DIR never download or train a tokenizer into it at once.
#   resume_flag TAG DIR prints --resume when DIR/TAG holds a complete checkpoint (not a step_N.tmp left by a
#                       kill mid-save), so an interrupted run continues.

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
PIPELINE_MARKS="$NANOCHAT_BASE_DIR/pipeline"
mkdir -p "$PIPELINE_MARKS"
PIPELINE_START=$(date +%s)

stage() {
    local name="$1"
    shift
    if [ -f "$PIPELINE_MARKS/$name.done" ]; then
        echo "== [$name] already done, skipping (delete $PIPELINE_MARKS/$name.done to redo it)"
        return 0
    fi
    local started elapsed
    started=$(date +%s)
    echo "== [$name] $*"
    if ! "$@"; then
        echo "error: stage '$name' failed; fix the cause above and re-run this script: finished stages are skipped" >&2
        exit 1
    fi
    elapsed=$(( $(date +%s) - started ))
    echo "== [$name] done in ${elapsed}s (pipeline at $(( $(date +%s) - PIPELINE_START ))s)"
    touch "$PIPELINE_MARKS/$name.done"
}

setup_stage() {
    local name="$1"
    if [ "${NODE_RANK:-0}" = 0 ]; then
        stage "$@"
        return 0
    fi
    if [ ! -f "$PIPELINE_MARKS/$name.done" ]; then
        echo "== [$name] waiting for node 0 to finish it in the shared $NANOCHAT_BASE_DIR"
        while [ ! -f "$PIPELINE_MARKS/$name.done" ]; do
            sleep "${PIPELINE_POLL_S:-5}"
        done
    fi
    echo "== [$name] done by node 0"
}

resume_flag() {
    local tag="$1" dir="$2"
    if compgen -G "$NANOCHAT_BASE_DIR/$dir/$tag/step_*[0-9]/meta.json" >/dev/null; then
        echo "--resume"
    fi
}
