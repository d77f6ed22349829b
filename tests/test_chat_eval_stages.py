"""End to end on a depth-1 checkpoint in a tmp base dir: base_loss, base_eval, chat_eval, report generate."""
import shutil
import subprocess
import sys

import pytest

from tests.chat_fixtures import make_base_checkpoint
from tests.training_fixtures import REPO, make_mini_corpus, subprocess_env


def run_stage(base_dir, cwd, *args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(base_dir),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_eval_stages_and_report_on_a_tiny_checkpoint(base_dir, shared_data, tmp_path):
    tokenizer = make_mini_corpus(base_dir, shared_data)
    make_base_checkpoint(base_dir, tokenizer, tag="d1", depth=1, model_dim=32, seq_len=128)
    shutil.copytree(base_dir / "base_checkpoints", base_dir / "chatsft_checkpoints")
    (base_dir / "eval_bundle").symlink_to(shared_data / "core")
    (base_dir / "eval_data").symlink_to(shared_data / "eval")

    run_stage(base_dir, REPO, "nanochat.report", "reset")
    out = run_stage(base_dir, REPO, "scripts.base_loss", "--device_batch_size=2", "--split_tokens=512",
                    "--sample_tokens=4")
    assert "train bpb:" in out and "val bpb:" in out
    out = run_stage(base_dir, REPO, "scripts.base_eval", "--max_per_task=3")
    assert "| winogrande |" in out and "CORE" in out
    assert (base_dir / "base_eval" / "d1_step000000.csv").exists()
    out = run_stage(base_dir, REPO, "scripts.chat_eval", "-i", "sft", "-x", "3", "--max_new_tokens=8")
    assert "ChatCORE (6 tasks)" in out and "HumanEval: " in out and "SpellingBee: " in out

    run_stage(base_dir, tmp_path, "nanochat.report", "generate")
    report = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| ")}
    assert rows["CORE"][0] != "–" and rows["CORE"][1:] == ["–", "–", "–"]
    assert rows["ChatCORE"][2] != "–" and rows["ChatCORE"][3] == "–"
    assert "## Base model loss" in report and "## Chat evaluation sft" in report
