#!/usr/bin/env bash
# Shared set-up for every shell entry point (demo.sh, tests/run.sh, speedrun.sh, ittybitty.sh):
# make .venv, install the project (which builds the Rust crate), and activate it.
# Usage: source scripts/setup.sh [extra]   e.g. `source scripts/setup.sh test`
# Re-running is cheap: pip skips what is installed; the crate rebuild is incremental.

nanochat_setup() {
    local extra="${1:-}"
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local python="${PYTHON:-python3}"

    if ! command -v "$python" >/dev/null 2>&1; then
        echo "error: $python not found; install Python >= 3.10 (or set PYTHON=/path/to/python3)" >&2
        return 2
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "error: Python >= 3.10 is needed, $python is $("$python" -V 2>&1); set PYTHON=/path/to/python3.10+" >&2
        return 2
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo (Rust) not found; install it with: curl https://sh.rustup.rs -sSf | sh -s -- -y && source \$HOME/.cargo/env" >&2
        return 2
    fi

    if [ ! -x "$root/.venv/bin/python" ]; then
        echo "setup: creating $root/.venv"
        "$python" -m venv "$root/.venv" || return 2
        "$root/.venv/bin/python" -m pip install -q --upgrade pip || return 2
    fi
    # shellcheck disable=SC1091
    source "$root/.venv/bin/activate"

    # A CPU-only torch wheel beside the repo saves a multi-GB CUDA download on machines without a GPU.
    if ! python -c 'import torch' >/dev/null 2>&1; then
        local wheel
        wheel="$(find "$root/../shared/wheels" -maxdepth 1 -name 'torch-*.whl' 2>/dev/null | head -n 1)"
        if [ -n "$wheel" ] && pip install -q "$wheel" 2>/dev/null; then
            echo "setup: installed torch from $wheel"
        fi
    fi

    # Python code is installed editable, so only the crate and the dependency list call for a reinstall:
    # a stamp of their contents makes re-runs skip the build.
    local stamp_file="$root/.venv/.nanochat-install-${extra:-base}" stamp
    stamp="$(cd "$root" && find pyproject.toml rustbpe/Cargo.toml rustbpe/Cargo.lock rustbpe/src -type f -print0 \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
    # an install with the test extra covers the plain one (CI runs the pipelines after tests/run.sh's set-up)
    if [ -z "$extra" ] && [ "$(cat "$root/.venv/.nanochat-install-test" 2>/dev/null)" = "$stamp" ]; then
        stamp_file="$root/.venv/.nanochat-install-test"
    fi
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && python -c 'import rustbpe, nanochat' 2>/dev/null; then
        return 0
    fi
    local target="$root"
    [ -n "$extra" ] && target="${root}[${extra}]"
    echo "setup: installing nanochat${extra:+[$extra]} (builds the rustbpe crate)"
    pip install -q -e "$target" || { echo "error: installing the project failed (see pip's output above)" >&2; return 2; }
    echo "$stamp" > "$stamp_file"
}

nanochat_setup "$@"
