"""Report card: sections, summary table with missing stages, time/cost, plots from train logs, the CLI."""
import json
import os
import subprocess
import sys

import pytest

from nanochat import report


def write_train_log(base_dir, source_dir, records):
    tag_dir = base_dir / source_dir / "d1"
    tag_dir.mkdir(parents=True)
    (tag_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_generate_with_some_stages_missing(base_dir, tmp_path):
    report.reset()
    report.log_section("Base eval", [{"CORE": 0.1234, "tasks": 20}, "| a | b |\n|---|---|\n| 1 | 2 |"],
                       source="base", metrics={"CORE": 0.1234}, wall_time_s=90.0)
    report.log_section("Chat eval sft", {"ARC-Easy": 0.31}, source="sft",
                       metrics={"ARC-Easy": 0.31, "GSM8K": 0.02, "not a summary metric": 5.0}, wall_time_s=1800)
    report.log_section("A late section", "logged last, listed last")
    write_train_log(base_dir, "base_checkpoints", [{"step": s, "loss": 5.0 - s * 0.1} for s in range(10)]
                    + [{"step": 0, "val_bpb": 2.5}, {"step": 9, "val_bpb": 2.1}])
    write_train_log(base_dir, "chatsft_checkpoints", [{"step": 0, "loss": 2.0}, {"step": 0, "val_loss": 1.5}])
    out_dir = tmp_path / "cwd"
    out_dir.mkdir()
    path = report.generate(gpu_hourly_cost=2.0, num_gpus=8, copy_to=out_dir)
    text = path.read_text()
    assert (out_dir / "report.md").read_text() == text

    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["Metric"] == ["BASE", "MID", "SFT", "RL"]
    assert rows["CORE"] == ["0.1234", "–", "–", "–"]
    assert rows["ARC-Easy"] == ["–", "–", "0.3100", "–"]
    assert rows["GSM8K"] == ["–", "–", "0.0200", "–"]
    assert rows["HumanEval"] == ["–"] * 4 and rows["ChatCORE"] == ["–"] * 4
    assert "not a summary metric" not in rows
    assert rows["**Total**"] == ["31m30s"]
    # 1890 s = 0.525 h on 8 GPUs at $2 = $8.40
    assert "Estimated cost: $8.40" in text
    assert "## Base eval" in text and "- CORE: 0.1234" in text and "| 1 | 2 |" in text
    assert text.index("## Base eval") < text.index("## Chat eval sft") < text.index("## A late section")
    assert "Git commit" in text and "torch" in text and "Lines" in text
    assert "![Training loss](train_loss.png)" in text and "![Validation bpb (base) and loss (mid, sft)](val_bpb.png)" in text
    for name in ("train_loss.png", "val_bpb.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_on_an_empty_report(base_dir, tmp_path):
    path = report.generate(copy_to=tmp_path)
    text = path.read_text()
    assert "No training logs found." in text
    assert text.count("| – | – | – | – |") == len(report.SUMMARY_METRICS)


def test_relogging_a_title_replaces_it_and_reset_clears(base_dir, tmp_path):
    report.log_section("Base loss", {"val_bpb": 3.0})
    report.log_section("Base loss", {"val_bpb": 2.0})
    text = report.generate(copy_to=tmp_path).read_text()
    assert "val_bpb: 2.0000" in text and "val_bpb: 3.0000" not in text
    report.reset()
    assert "## Base loss" not in report.generate(copy_to=tmp_path).read_text()


@pytest.mark.slow
def test_cli_reset_generate_and_bad_command(base_dir, tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanochat.report", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=120)
    assert run("reset").returncode == 0
    generated = run("generate", "--gpu_hourly_cost", "1.5")
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "report.md").exists() and (base_dir / "report" / "report.md").exists()
    bad = run("publish")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: usage: python -m nanochat.report reset|generate [--gpu_hourly_cost X] [--num_gpus N]"]
