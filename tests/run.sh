#!/usr/bin/env bash
# The test command: set up .venv with the test extra, check and test the Rust crate, then run pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"` or `bash tests/run.sh tests/test_common.py`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/setup.sh
source scripts/setup.sh test

echo "== rustbpe: cargo fmt / clippy / test"
(
    cd rustbpe
    cargo fmt --check
    cargo clippy --all-targets --quiet -- -D warnings
    cargo test --quiet
)

# Tools the tests drive: chromium + chromedriver (UI), shellcheck (lint of the shell scripts), tmux (interactive
# CLIs). As root with apt, install the missing ones once; without them those tests skip, saying why.
missing=()
for tool in chromium:chromium chromedriver:chromium-driver shellcheck:shellcheck tmux:tmux; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]} for the tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || echo "warning: installing ${missing[*]} failed; the tests that need them will be skipped"
fi

echo "== pytest"
python -m pytest "$@"
