"""The shell pipelines end to end at tiny scale on CPU: the same speedrun.sh (two torchrun ranks on gloo) and
ittybitty.sh users run, every download served by a loopback mirror of ../shared/data (tests/pipeline_mirror.py),
re-runs that skip finished stages, an interrupted base_train that resumes, and bash -n + shellcheck."""
from __future__ import annotations

import importlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat import download
from nanochat.checkpoint import complete_steps, step_dir
from nanochat.flags import parse_flags
from tests.http_fixtures import FileServer
from tests.pipeline_mirror import build_mirror, mirror_env

REPO = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = sorted(p.relative_to(REPO).as_posix()
                       for p in [*REPO.glob("*.sh"), *(REPO / "scripts").glob("*.sh"), *(REPO / "tests").glob("*.sh"),
                                 *(REPO / "bench").glob("*.sh")])
# report generate copies the report card and plots into the working dir, which is the repo for these scripts
REPORT_COPIES = ("report.md", "train_loss.png", "val_bpb.png")
PIPELINE_TIMEOUT_S = 600

TINY_SIZES = {
    "FIRST_SHARDS": "2", "VOCAB_SIZE": "512", "TOK_MAX_CHARS": "1000000",
    "DEPTH": "1", "MODEL_DIM": "32", "HEAD_DIM": "16", "MAX_SEQ_LEN": "64",
    "DEVICE_BATCH_SIZE": "4", "TOTAL_BATCH_SIZE": "512", "BASE_ITERS": "6", "BASE_EVAL_EVERY": "3",
    "BASE_EVAL_TOKENS": "1024", "BASE_SAVE_EVERY": "3", "MID_ITERS": "3", "SFT_ITERS": "3",
    "SFT_DEVICE_BATCH_SIZE": "2", "LOSS_SPLIT_TOKENS": "1024", "CORE_MAX_PER_TASK": "2", "CHAT_EVAL_MAX": "2",
    # chat_rl needs GSM8K prompts (80-300 tokens at this vocab) to fit the context, which 64 tokens cannot hold
    "RUN_RL": "0", "OMP_NUM_THREADS": "1",
}
# every stage a finished run skips by name (the background shard download is not even started again)
SKIPPED_STAGES = ("report_reset", "shards_first", "tok_train", "tok_eval", "base_train", "base_loss",
                  "base_eval", "mid_train", "chat_eval_mid", "chat_sft", "chat_eval_sft")
PREFETCHED = ("SmolTalk train", "SmolTalk val", "MMLU auxiliary_train", "MMLU test", "GSM8K train", "GSM8K test",
              "ARC-Easy train", "ARC-Easy test", "ARC-Challenge train", "ARC-Challenge test", "HumanEval",
              "CORE bundle tasks")


@pytest.fixture(scope="module")
def mirror_server(tmp_path_factory, shared_data):
    site = build_mirror(tmp_path_factory.mktemp("mirror"), shared_data)
    with FileServer(site) as server:
        yield server


@pytest.fixture
def mirror(mirror_server):
    return mirror_env(mirror_server.url())


@pytest.fixture
def keep_repo_report():
    """Put back whatever report card the repo held before the pipeline under test overwrote it."""
    saved = {name: (REPO / name).read_bytes() for name in REPORT_COPIES if (REPO / name).is_file()}
    yield
    for name in REPORT_COPIES:
        if name in saved:
            (REPO / name).write_bytes(saved[name])
        else:
            (REPO / name).unlink(missing_ok=True)


def pipeline_env(base_dir: Path, mirror: dict[str, str], **sizes: str) -> dict[str, str]:
    return {**os.environ, **mirror, **TINY_SIZES, **sizes, "NANOCHAT_BASE_DIR": str(base_dir)}


def run_script(script: str, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=PIPELINE_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{output[-6000:]}"
    return output


def newest_step(base_dir: Path, stage_dir: str, tag: str = "d1") -> Path | None:
    """The newest complete checkpoint: a `step_N.tmp/` being written already holds meta.json before its rename."""
    steps = complete_steps(base_dir / stage_dir / tag)
    return step_dir(base_dir / stage_dir / tag, steps[-1]) if steps else None


def assert_finished(base_dir: Path, output: str) -> None:
    for stage_dir in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints"):
        assert newest_step(base_dir, stage_dir) is not None, f"no complete {stage_dir}/d1 checkpoint"
    report = (base_dir / "report" / "report.md").read_text()
    assert "## Summary" in report and "| Metric | BASE | MID | SFT | RL |" in report
    assert re.search(r"^\| CORE \| -?\d", report, re.M), "the summary table lacks the base model's CORE score"
    assert (REPO / "report.md").read_text() == report
    assert "python -m scripts.chat_web --source sft --model_tag=d1" in output


def assert_everything_skipped(output: str) -> None:
    skipped = re.findall(r"^== \[(\w+)\] already done", output, re.M)
    assert set(skipped) == set(SKIPPED_STAGES), f"not skipped on the re-run: {set(SKIPPED_STAGES) - set(skipped)}"
    assert not re.search(r"^== \[\w+\] (launch|python|wait)", output, re.M), "a stage ran again"
    assert "waiting for the remaining shards" not in output and "waiting for the task data" not in output


@pytest.mark.slow
def test_speedrun_on_two_torchrun_ranks_end_to_end_then_rerun_skips(tmp_path, mirror, mirror_server,
                                                                    keep_repo_report):
    base_dir = tmp_path / "base"
    env = pipeline_env(base_dir, mirror, NPROC_PER_NODE="2")
    output = run_script("speedrun.sh", env)
    assert "1 node(s) x 2 process(es)" in output and "2 rank(s) on cpu" in output
    assert_finished(base_dir, output)
    # every task dataset was fetched and checked before base_train, and every later stage ran --offline
    base_train_at = output.index("== [base_train] launch")
    for name in PREFETCHED:
        assert re.search(rf"^prefetch: {re.escape(name)} \(.*\): [1-9][\d,]*$", output[:base_train_at], re.M), name
    assert re.search(r"^== \[chat_sft\] launch scripts\.chat_sft .*--offline", output, re.M)
    plan = re.search(r"^plan: 6 steps \(--num_iterations\) × 512 = 3,072 tokens; ([\d,]+) tokens per climbmix "
                     r"train shard \(measured, --packing crop\) -> (\d+) train shards", output, re.M)
    assert plan, output[-4000:]
    assert int(plan.group(2)) == math.ceil(3072 * 1.1 / int(plan.group(1).replace(",", "")))
    shards = sorted(p.name for p in (base_dir / "base_data" / "climbmix").glob("shard_*.parquet"))
    assert shards == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]  # FIRST_SHARDS + val

    started = time.monotonic()
    requests_before = len(mirror_server.requests)
    rerun = run_script("speedrun.sh", env)
    assert_everything_skipped(rerun)
    assert len(mirror_server.requests) == requests_before, "the re-run fetched something from the net"
    assert time.monotonic() - started < 90, "the re-run should skip every stage quickly"


@pytest.mark.slow
def test_ittybitty_killed_in_base_train_resumes_and_finishes(tmp_path, mirror, keep_repo_report):
    base_dir = tmp_path / "base"
    # enough steps that a periodic checkpoint lands well before the end, so the kill hits a running base_train
    env = pipeline_env(base_dir, mirror, BASE_ITERS="120", BASE_EVAL_EVERY="-1", BASE_SAVE_EVERY="10")
    log_path = tmp_path / "first_run.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(["bash", "ittybitty.sh"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + PIPELINE_TIMEOUT_S
            while newest_step(base_dir, "base_checkpoints") is None:
                assert first.poll() is None, f"ittybitty.sh stopped early:\n{log_path.read_text()[-6000:]}"
                assert time.monotonic() < deadline, "no base checkpoint appeared"
                time.sleep(0.1)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    first_output = log_path.read_text()
    assert "vram check: skipped, no CUDA GPU on this machine" in first_output
    assert not (base_dir / "pipeline" / "base_train.done").exists(), "base_train finished before the kill"
    killed_at = int(newest_step(base_dir, "base_checkpoints").name.removeprefix("step_"))
    assert killed_at < 120

    output = run_script("ittybitty.sh", env)
    assert "== [base_train] launch scripts.base_train" in output and " --resume" in output
    assert re.search(r"^resumed from .*base_checkpoints/d1/step_\d{6}$", output, re.M), output[-4000:]
    assert newest_step(base_dir, "base_checkpoints").name == "step_000120"
    assert "1 node(s) x 1 process(es)" in output and "1 rank(s) on cpu" in output
    assert_finished(base_dir, output)


@pytest.mark.parametrize("module, flags_class", [
    ("nanochat.dataset", "DatasetFlags"), ("scripts.prefetch", "PrefetchFlags"), ("scripts.shard_plan", "ShardPlanFlags"),
    ("scripts.tok_eval", "TokEvalFlags"), ("scripts.base_eval", "BaseEvalFlags"), ("scripts.mid_train", "MidFlags"),
    ("scripts.chat_sft", "SFTFlags"), ("scripts.chat_rl", "RLFlags"), ("scripts.chat_eval", "ChatEvalFlags")])
def test_every_stage_that_downloads_takes_offline(module, flags_class, monkeypatch):
    cls = getattr(importlib.import_module(module), flags_class)
    argv = ["--data_source=climbmix"] if module == "scripts.shard_plan" else ["-n", "1"] \
        if module == "nanochat.dataset" else []
    monkeypatch.setattr(download, "offline", False)
    parse_flags(cls, [*argv, "--offline"])
    assert download.offline
    parse_flags(cls, argv)
    assert not download.offline


def test_shard_plan_needs_a_source_to_download(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    result = run_module("scripts.shard_plan", "--depth=1", env=env)
    assert result.returncode == 2
    assert result.stderr == "error: --data_source must name a source to download (climbmix, fineweb), got ''\n"


def run_module(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=PIPELINE_TIMEOUT_S)


def test_prefetch_fetches_every_task_file_once_and_offline_names_what_is_missing(tmp_path, mirror, mirror_server):
    env = {**os.environ, **mirror, "NANOCHAT_BASE_DIR": str(tmp_path)}
    missing = run_module("scripts.prefetch", "--offline", env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert re.match(r"error: offline: .*chat_data/.* is missing or damaged \(it comes from http://127\.0\.0\.1:\d+/"
                    r".*\); fetch it once with the network \(`python -m scripts.prefetch`", missing.stderr)
    fetched = run_module("scripts.prefetch", env=env)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    for name in PREFETCHED:
        assert re.search(rf"^prefetch: {re.escape(name)} \(.*\): [1-9][\d,]*$", fetched.stdout, re.M), name
    requests = len(mirror_server.requests)
    again = run_module("scripts.prefetch", "--offline", env=env)
    assert again.returncode == 0 and again.stdout == fetched.stdout, again.stderr[-3000:]
    assert len(mirror_server.requests) == requests
    shards = run_module("nanochat.dataset", "--source", "fineweb", "-n", "1", "--offline", env=env)
    assert shards.returncode == 2 and re.search(r"^error: offline: .*fineweb/shard_0\d+\.parquet is missing", shards.stderr,
                                                re.M), shards.stderr
    assert len(mirror_server.requests) == requests


def run_stages(base_dir: Path, body: str) -> subprocess.CompletedProcess:
    """`body` run in bash -e after sourcing scripts/stages.sh, as the pipeline does."""
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/stages.sh; {body}"], cwd=REPO,
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}, capture_output=True, text=True)


def test_failed_stage_stops_with_its_name_and_finished_stages_are_skipped(tmp_path):
    first = run_stages(tmp_path, "stage fetch echo fetched; stage train false; echo after")
    assert first.returncode == 1
    assert "error: stage 'train' failed" in first.stderr and "re-run this script" in first.stderr
    assert "fetched" in first.stdout and "after" not in first.stdout
    assert (tmp_path / "pipeline" / "fetch.done").is_file() and not (tmp_path / "pipeline" / "train.done").exists()
    second = run_stages(tmp_path, "stage fetch echo fetched; stage train echo trained")
    assert second.returncode == 0, second.stderr
    assert "== [fetch] already done" in second.stdout and "fetched\n" not in second.stdout
    assert "trained" in second.stdout and (tmp_path / "pipeline" / "train.done").is_file()


def test_resume_flag_only_for_a_complete_checkpoint(tmp_path):
    tag_dir = tmp_path / "base_checkpoints" / "d1"
    flag = "echo \"[$(resume_flag d1 base_checkpoints)]\""
    assert run_stages(tmp_path, flag).stdout.strip() == "[]"
    (tag_dir / "step_000010.tmp").mkdir(parents=True)  # a kill mid-save leaves this behind
    (tag_dir / "step_000010.tmp" / "meta.json").write_text("{}")
    assert run_stages(tmp_path, flag).stdout.strip() == "[]"
    (tag_dir / "step_000005").mkdir()
    (tag_dir / "step_000005" / "meta.json").write_text("{}")
    assert run_stages(tmp_path, flag).stdout.strip() == "[--resume]"


def test_demo_rejects_an_unknown_argument_in_one_line(tmp_path):
    result = subprocess.run(["bash", "demo.sh", "--serve-forever"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == "error: unknown argument --serve-forever (the only option is --no-serve)\n"
    assert not any(tmp_path.iterdir()), "nothing should run before the arguments are checked"


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_is_bash_n_and_shellcheck_clean(script):
    syntax = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    lint = subprocess.run(["shellcheck", "-x", script], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
