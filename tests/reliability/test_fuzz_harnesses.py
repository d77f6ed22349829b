"""Bounded atheris run over the server's request parsing and chat rendering (fuzz_server.py): no crash, no 5xx.
schemathesis over the OpenAPI schema lives in tests/test_server_fuzz.py; rustbpe's proptest properties
(train/encode/decode round trips on arbitrary Unicode) run with `cargo test` in tests/run.sh."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.training_fixtures import REPO

RUNS = 3000


@pytest.mark.slow
def test_atheris_request_parsing_and_chat_rendering(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_server", f"-runs={RUNS}", "-seed=1",
                             "-len_control=0", "-max_len=512", "-print_final_stats=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NANOCHAT_FUZZ_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {RUNS} runs" in result.stderr, result.stderr[-2000:]
