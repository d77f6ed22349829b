"""The one-line skip summary that tests/conftest.py prints at the end of a run, checked on a real pytest run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SKIPPING_TESTS = '''
import pytest

@pytest.mark.skip(reason="needs a CUDA GPU")
def test_gpu_one():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_gpu_two():
    pass

def test_tool():
    pytest.skip("tmux is not installed")

def test_runs():
    pass
'''


def run_pytest(tmp_path: Path, source: str) -> list[str]:
    (tmp_path / "test_sample.py").write_text(source)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider",
                             str(tmp_path / "test_sample.py")], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def test_skips_are_grouped_by_reason_on_one_line_before_the_totals(tmp_path):
    lines = run_pytest(tmp_path, SKIPPING_TESTS)
    assert lines[-2] == "skipped: 2 × needs a CUDA GPU; 1 × tmux is not installed"
    assert lines[-1].startswith("1 passed, 3 skipped")


def test_no_line_when_nothing_skipped(tmp_path):
    lines = run_pytest(tmp_path, "def test_runs():\n    pass\n")
    assert not any(line.startswith("skipped:") for line in lines)
