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

# The UI tests drive Debian's chromium; as root with apt, install it once (they skip, saying why, without it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium + chromium-driver for the UI tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || echo "warning: installing chromium failed; the UI tests will be skipped"
fi

echo "== pytest"
python -m pytest "$@"
