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

echo "== pytest"
python -m pytest "$@"
