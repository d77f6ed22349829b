"""Training survives: kill -9 at random points (one of them mid-save) with --resume each time ends bit for bit
where an uninterrupted run ends; a full disk, damaged checkpoints and a hostile pickle are refused with one clear
line while the previous complete step stays usable; a non-finite loss stops the run and loses nothing."""
from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from nanochat.checkpoint import PAUSE_ENV, complete_steps, load_checkpoint, sha256_file, step_dir
from nanochat.common import UserError
from nanochat.trainer import TrainingDiverged
from scripts.base_train import main as base_train_main
from tests.test_trainer import SEQ_LEN, flags_for, run_training
from tests.training_fixtures import (TINY_MODEL_ARGS, make_mini_corpus, read_losses, read_real_docs,
                                     subprocess_env, token_rows, torchrun_cmd)

RUN_ARGS = [*TINY_MODEL_ARGS, "--depth=1", "--device_batch_size=4", "--total_batch_size=128", "--eval_every=-1",
            "--sample_every=-1", "--save_every=2", "--device_type=cpu"]
STEPS = 12
KILLS = 5
KILL_MARGIN = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    directory = tmp_path_factory.mktemp("reliability_train")
    make_mini_corpus(directory, shared_data, train_docs=48, val_docs=12)
    return directory


def tag_dir(base, tag):
    return base / "base_checkpoints" / tag


def base_train(base, *args: str, env_extra: dict | None = None, preexec_fn=None, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *RUN_ARGS, *args], capture_output=True,
                          text=True, env=subprocess_env(base, **(env_extra or {})), timeout=timeout,
                          preexec_fn=preexec_fn)


def final_weights(base, tag: str) -> dict[str, torch.Tensor]:
    return load_file(step_dir(tag_dir(base, tag), STEPS) / "model.safetensors")


def run_and_kill(base, args: list[str], kill_after_step: int, delay_s: float, mid_save: bool) -> None:
    """Start base_train, SIGKILL it `delay_s` after it prints step `kill_after_step` (or while it pauses mid-save).
    Asserts that it reached that line and died by this SIGKILL: a run that crashed or finished first is no kill."""
    env = subprocess_env(base, PYTHONUNBUFFERED="1", **({PAUSE_ENV: "60"} if mid_save else {}))
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    trigger = "pausing" if mid_save else f"step {kill_after_step:05d}/"
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(trigger):
                time.sleep(delay_s)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert seen and seen[-1].startswith(trigger), f"the run ended before {trigger!r}: {''.join(seen[-5:])}"
    assert proc.returncode == -signal.SIGKILL, f"the run died with {proc.returncode}, not by the SIGKILL"


@pytest.mark.slow
def test_a_run_that_crashes_before_its_kill_point_is_not_counted_as_killed(corpus):
    with pytest.raises(AssertionError, match="ended before 'step 00003/'"):
        run_and_kill(corpus, [*RUN_ARGS, "--depth=0"], kill_after_step=3, delay_s=0, mid_save=False)


@pytest.mark.slow
def test_kill_nine_at_five_random_points_then_resume_is_bit_exact(corpus):
    straight = base_train(corpus, "--model_tag=straight", f"--num_iterations={STEPS}")
    assert straight.returncode == 0, straight.stderr[-2000:]

    rng = random.Random(1234)
    args = [*RUN_ARGS, "--model_tag=killed", f"--num_iterations={STEPS}"]
    mid_save_kill = rng.randrange(KILLS)
    for kill in range(KILLS):
        done = complete_steps(tag_dir(corpus, "killed"))
        resumed_from = done[-1] if done else 0
        resume = ["--resume"] if done else []
        # at most STEPS - KILL_MARGIN: on a loaded machine the child keeps stepping while the parent wakes up, so
        # leave it several steps to spare; a run resumed later than that is killed mid-save, which cannot miss.
        # At least 3 steps in: the save 2 steps in is then complete, so every run moves the checkpoints forward
        # (kills that all land before the first save would leave nothing to resume, whatever the timing)
        mid_save = kill == mid_save_kill or resumed_from >= STEPS - KILL_MARGIN
        earliest = min(resumed_from + 3, STEPS - KILL_MARGIN)
        kill_after_step = rng.randint(earliest, STEPS - KILL_MARGIN)
        run_and_kill(corpus, [*args, *resume], kill_after_step=kill_after_step,
                     delay_s=rng.uniform(0, 0.05), mid_save=mid_save)
        assert not complete_steps(tag_dir(corpus, "killed")) or complete_steps(tag_dir(corpus, "killed"))[-1] < STEPS
    finished = base_train(corpus, "--model_tag=killed", f"--num_iterations={STEPS}", "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]

    expected, actual = final_weights(corpus, "straight"), final_weights(corpus, "killed")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert read_losses(tag_dir(corpus, "killed") / "train_log.jsonl") == \
        read_losses(tag_dir(corpus, "straight") / "train_log.jsonl")
    assert not list(tag_dir(corpus, "killed").glob("*.tmp"))


def limit_file_size(max_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.mark.slow
def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(corpus, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(corpus))
    base_train_main([*RUN_ARGS, "--model_tag=full", "--num_iterations=2"])
    before = {p.name: sha256_file(p) for p in step_dir(tag_dir(corpus, "full"), 2).iterdir()}
    smallest_checkpoint_file = min((step_dir(tag_dir(corpus, "full"), 2) / name).stat().st_size
                                   for name in ("model.safetensors", "optim_rank0.pt"))
    full = base_train(corpus, "--model_tag=full", "--num_iterations=4", "--resume",
                      preexec_fn=limit_file_size(smallest_checkpoint_file // 2))
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.startswith("error: ") and full.stderr.strip().count("\n") == 0, full.stderr[-2000:]
    assert "step 4" in full.stderr and "step_000002" in full.stderr
    assert complete_steps(tag_dir(corpus, "full")) == [2]
    assert {p.name: sha256_file(p) for p in step_dir(tag_dir(corpus, "full"), 2).iterdir()} == before
    assert not list(tag_dir(corpus, "full").glob("*.tmp"))
    base_train_main([*RUN_ARGS, "--model_tag=full", "--num_iterations=4", "--resume"])
    assert complete_steps(tag_dir(corpus, "full")) == [2, 4]


def used_bytes(directory) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in directory.rglob("*") if p.is_file())


@contextmanager
def small_tmpfs(directory, size_bytes: int):
    """`directory` becomes a tmpfs of `size_bytes`: a real full disk (ENOSPC), unlike RLIMIT_FSIZE's EFBIG."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers EFBIG")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


@pytest.mark.slow
def test_real_enospc_during_save_is_one_line_and_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE test covers a failed write as EFBIG")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(corpus))
    base_train_main([*RUN_ARGS, "--model_tag=enospc", "--num_iterations=2"])
    saved = tmp_path / "enospc"
    shutil.move(tag_dir(corpus, "enospc"), saved)
    checkpoint_bytes = used_bytes(step_dir(saved, 2))
    # room for what is there plus half a checkpoint: step 4's save runs out of space partway through
    with small_tmpfs(tag_dir(corpus, "enospc"), used_bytes(saved) + checkpoint_bytes // 2):
        shutil.copytree(saved, tag_dir(corpus, "enospc"), dirs_exist_ok=True)
        before = {p.name: sha256_file(p) for p in step_dir(tag_dir(corpus, "enospc"), 2).iterdir()}
        full = base_train(corpus, "--model_tag=enospc", "--num_iterations=4", "--resume")
        assert full.returncode == 2, full.stderr[-2000:]
        assert full.stderr.startswith("error: ") and full.stderr.strip().count("\n") == 0, full.stderr[-2000:]
        assert "step 4" in full.stderr and "step_000002" in full.stderr and "disk full" in full.stderr
        assert complete_steps(tag_dir(corpus, "enospc")) == [2]
        assert {p.name: sha256_file(p) for p in step_dir(tag_dir(corpus, "enospc"), 2).iterdir()} == before
        assert not list(tag_dir(corpus, "enospc").glob("*.tmp"))
        subprocess.run(["mount", "-o", f"remount,size={8 * used_bytes(saved)}", str(tag_dir(corpus, "enospc"))],
                       check=True)
        base_train_main([*RUN_ARGS, "--model_tag=enospc", "--num_iterations=4", "--resume"])
        assert complete_steps(tag_dir(corpus, "enospc")) == [2, 4]


RANK_ONE_CANNOT_WRITE = """
import os, resource, runpy, sys
if os.environ["RANK"] == "1":  # this rank's every write past 4 KiB fails (EFBIG; Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
sys.argv = ["scripts.base_train", *sys.argv[1:]]
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_one_rank_failing_to_save_stops_every_rank_with_the_same_line(corpus, tmp_path):
    logs = tmp_path / "logs"
    # a long monitor interval: each rank must stop by itself, not because torchrun killed it after the other left
    command = torchrun_cmd(2, "--monitor-interval=30", f"--log-dir={logs}", "--redirects=3", "--no-python",
                           sys.executable, "-c", RANK_ONE_CANNOT_WRITE, *RUN_ARGS, "--device_batch_size=2",
                           "--model_tag=rank_fails",
                           "--num_iterations=4")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(corpus), timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - started < 120, "a rank waited for the one that failed"
    stderr = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert sorted(stderr) == ["0", "1"], stderr
    # torch's own FutureWarnings about the optimizer's collectives may come first; the error is one line, no traceback
    errors = {rank: [line for line in text.splitlines() if line.startswith("error: ")] for rank, text in stderr.items()}
    assert all(len(lines) == 1 and "Traceback" not in stderr[rank] for rank, lines in errors.items()), stderr
    assert errors["0"] == errors["1"], errors
    (line,) = errors["0"]
    assert line.startswith("error: could not write the checkpoint for step 2 (rank 1: "), line
    assert "last complete checkpoint: none yet" in line
    assert complete_steps(tag_dir(corpus, "rank_fails")) == []
    assert not list(tag_dir(corpus, "rank_fails").glob("*.tmp"))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def drop(path):
    path.unlink()


DAMAGES = [(flip_last_byte, "model.safetensors"), (truncate_half, "model.safetensors"),
           (flip_last_byte, "optim_rank0.pt"), (drop, "meta.json")]


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_refused_and_resume_uses_the_previous(corpus, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(corpus))
    base_train_main([*RUN_ARGS, "--model_tag=intact", "--num_iterations=4"])
    for damage, name in DAMAGES:
        tag = f"damaged_{damage.__name__}_{name.split('.')[0]}"
        shutil.copytree(tag_dir(corpus, "intact"), tag_dir(corpus, tag))
        damage(step_dir(tag_dir(corpus, tag), 4) / name)
        if name == "meta.json":  # without meta.json the step is not complete: it is never offered at all
            assert complete_steps(tag_dir(corpus, tag)) == [2]
        else:
            with pytest.raises(UserError, match="does not match its checksum"):
                load_checkpoint(tag_dir(corpus, tag), 4, "cpu")
            with pytest.raises(UserError, match="does not match its checksum"):
                base_train_main([*RUN_ARGS, f"--model_tag={tag}", "--num_iterations=6", "--resume_from_step=4"])
        capsys.readouterr()
        base_train_main([*RUN_ARGS, f"--model_tag={tag}", "--num_iterations=6", "--resume"])
        out = capsys.readouterr().out
        assert f"resumed from {step_dir(tag_dir(corpus, tag), 2)}" in out, out
        if name != "meta.json":
            assert f"skipping {step_dir(tag_dir(corpus, tag), 4)}" in out
        assert complete_steps(tag_dir(corpus, tag))[-1] == 6


@pytest.mark.slow
def test_two_ranks_agree_to_skip_a_step_whose_damage_only_one_rank_reads(corpus):
    """Each rank loads only its own optimizer file, so rank 1 alone sees the damage; both must fall back together."""
    args = [*RUN_ARGS, "--device_batch_size=2", "--model_tag=two_ranks"]
    env = subprocess_env(corpus)
    first = subprocess.run(torchrun_cmd(2, "-m", "scripts.base_train", *args, "--num_iterations=4"),
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    flip_last_byte(step_dir(tag_dir(corpus, "two_ranks"), 4) / "optim_rank1.pt")
    resumed = subprocess.run(torchrun_cmd(2, "-m", "scripts.base_train", *args, "--num_iterations=6", "--resume"),
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping {step_dir(tag_dir(corpus, 'two_ranks'), 4)}" in resumed.stdout, resumed.stdout[-2000:]
    assert "optim_rank1.pt does not match its checksum" in resumed.stdout
    assert f"resumed from {step_dir(tag_dir(corpus, 'two_ranks'), 2)}" in resumed.stdout
    assert complete_steps(tag_dir(corpus, "two_ranks"))[-1] == 6


class RunsCode:
    """What an attacker would pickle: unpickling it would create MARKER."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_hostile_optimizer_pickle_is_refused_and_nothing_else_is_a_pickle(corpus, tmp_path, monkeypatch):
    tag = "hostile"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(corpus))
    base_train_main([*RUN_ARGS, f"--model_tag={tag}", "--num_iterations=2"])
    directory = step_dir(tag_dir(corpus, tag), 2)
    marker = tmp_path / "pwned"
    torch.save([RunsCode(marker)], directory / "optim_rank0.pt")
    meta = json.loads((directory / "meta.json").read_text())
    meta["files"]["optim_rank0.pt"] = sha256_file(directory / "optim_rank0.pt")  # the attacker fixes the sum
    (directory / "meta.json").write_text(json.dumps(meta))

    refused = base_train(corpus, f"--model_tag={tag}", "--num_iterations=4", "--resume_from_step=2")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.startswith("error: ") and refused.stderr.strip().count("\n") == 0, refused.stderr[-2000:]
    assert "optim_rank0.pt" in refused.stderr and "weights_only" in refused.stderr
    assert not marker.exists()

    pickle_magic = pickle.PROTO
    for path in [*(corpus / "tokenizer").iterdir(), directory / "meta.json", directory / "model.safetensors"]:
        assert not path.read_bytes().startswith(pickle_magic), path
    json.loads((corpus / "tokenizer" / "tokenizer.json").read_text())
    json.loads((directory / "meta.json").read_text())


@pytest.fixture(scope="module")
def rows(corpus, shared_data):
    from nanochat.tokenizer import Tokenizer

    return token_rows(Tokenizer.load(corpus / "tokenizer"), read_real_docs(shared_data, 48), SEQ_LEN)


@pytest.mark.slow
def test_non_finite_loss_stops_and_resume_loses_nothing(rows, tmp_path):
    straight_model, straight = run_training(flags_for(num_iterations=8, save_every=2), rows, tmp_path / "straight")
    calls = [0]

    def nan_at_step_five(model, batch):
        calls[0] += 1
        loss = model(batch[0], batch[1])
        return loss * float("nan") if calls[0] > 4 * 2 else loss  # 2 micro-steps per step: the 5th step's loss

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5; .*step_000004"):
        run_training(flags_for(num_iterations=8, save_every=2), rows, tmp_path / "poisoned",
                     loss_fn=nan_at_step_five)
    assert complete_steps(tmp_path / "poisoned") == [2, 4]
    resumed_model, resumed = run_training(flags_for(num_iterations=8, save_every=2, resume=True), rows,
                                          tmp_path / "poisoned")
    assert [resumed.losses[s] for s in range(5, 9)] == [straight.losses[s] for s in range(5, 9)]
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
