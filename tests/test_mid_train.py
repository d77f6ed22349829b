"""mid_train on the shared chat data with a tiny model: runs, resumes bit for bit, refuses bad input in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nanochat.checkpoint import checkpoint_dir, complete_steps, load_checkpoint
from nanochat.common import UserError
from scripts.mid_train import main
from tests.chat_fixtures import make_base_checkpoint, one_thread, train_tiny_tokenizer, write_jsonl  # noqa: F401
from tests.test_tasks_chat import WORDS
from tests.training_fixtures import read_losses, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mid_base(base_dir, shared_data):
    """A base dir with a tokenizer, a random depth-2 base checkpoint and a word list; returns the common flags."""
    make_base_checkpoint(base_dir, train_tiny_tokenizer(400), seq_len=48)
    words = base_dir / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    return ["--chat_data", str(shared_data / "chat"), "--words_file", str(words), "--device_batch_size", "2",
            "--total_batch_size", "192", "--eval_batches", "2", "--chat_examples", "200"]


@pytest.mark.slow
def test_mid_train_runs_and_resumes_exactly(mid_base, base_dir):
    main(mid_base + ["--num_iterations", "6", "--eval_every", "3", "--save_every", "3", "--keep_last", "-1"])
    out = checkpoint_dir("mid", "d2")
    assert complete_steps(out) == [3, 6]
    first = read_losses(out / "train_log.jsonl")
    assert sorted(first) == [1, 2, 3, 4, 5, 6] and first[6] < first[1]
    meta = load_checkpoint(out, 6, "cpu", load_optimizer=False).meta
    assert meta["source"] == "base" and meta["source_step"] == 0 and "val_loss" in meta
    assert meta["flags"]["chat_data"].endswith("chat")
    # Resume from step 3: steps 4-6 must reproduce the same losses exactly.
    main(mid_base + ["--num_iterations", "6", "--eval_every", "3", "--save_every", "3", "--keep_last", "-1",
                     "--resume_from_step", "3"])
    assert read_losses(out / "train_log.jsonl") == first
    report = (base_dir / "report" / "midtraining.md").read_text()
    assert "overlong cropped" in report and "val loss" in report


def test_mid_train_one_epoch_by_default_and_lr_never_rises(mid_base):
    main(mid_base + ["--chat_examples", "12", "--simple_spelling", "4", "--spelling_bee", "0", "--arithmetic", "2",
                     "--identity", "off", "--eval_every", "-1"])
    log = (checkpoint_dir("mid", "d2") / "train_log.jsonl").read_text().splitlines()
    import json

    entries = [json.loads(line) for line in log if '"loss"' in line]
    lrs = [e["lr_mult"] for e in entries]
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] == 0.0
    # 18 conversations, mostly longer than a row: about one row each, 4 rows per step.
    assert 3 <= len(entries) <= 6


def test_mid_train_bad_batch_arithmetic_suggests_values(mid_base):
    with pytest.raises(UserError, match=r"--total_batch_size 100 is not a multiple of 96 .* try --total_batch_size 96"):
        main(mid_base[:-6] + ["--total_batch_size", "100", "--chat_examples", "10"])


@pytest.mark.slow
def test_mid_train_bad_identity_file_is_one_line(mid_base, base_dir):
    good = [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}]
    bad = write_jsonl(base_dir / "identity.jsonl", [good, [{"role": "user", "content": "no reply"}]])
    result = subprocess.run([sys.executable, "-m", "scripts.mid_train", *mid_base, "--identity", str(bad),
                             "--num_iterations", "1"], capture_output=True, text=True,
                            env=subprocess_env(base_dir), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {bad}:2: a conversation needs at least one user and one assistant message"
    assert "Traceback" not in result.stderr


def test_mid_train_without_base_checkpoint_says_what_to_run(base_dir):
    with pytest.raises(UserError, match="base_train"):
        main(["--num_iterations", "1"])


def test_eval_task_train_sets_join_the_mixture_when_asked(mid_base, base_dir, shared_data):
    """The train splits of GSM8K and MMLU load from chat_data/ (here: small files standing in for the fetched ones)."""
    import gzip
    import shutil

    from nanochat.chat_stage import chat_mixture, resolve_chat_data
    from nanochat.flags import parse_flags
    from scripts.mid_train import MID_FRACTIONS, MidFlags, mixture_task_sets

    (base_dir / "chat_data").mkdir(exist_ok=True)
    shutil.copy(shared_data / "eval" / "mmlu_dev.jsonl.gz", base_dir / "chat_data" / "mmlu_aux_train.jsonl.gz")
    with gzip.open(shared_data / "eval" / "gsm8k.jsonl.gz", "rt") as src, \
            gzip.open(base_dir / "chat_data" / "gsm8k_train.jsonl.gz", "wt") as dst:
        dst.writelines(line for _, line in zip(range(7), src))
    flags = parse_flags(MidFlags, mid_base[:4] + ["--chat_examples", "5", "--task_train_sets"])
    names = lambda mixture: sorted(type(t).__name__ for t in mixture.tasks)  # noqa: E731
    train = chat_mixture(flags, "train", resolve_chat_data(flags.chat_data), MID_FRACTIONS, mixture_task_sets)
    assert names(train) == ["Arithmetic", "GSM8K", "Identity", "Identity", "MMLU", "SimpleSpelling", "SmolTalk",
                            "SpellingBee"]
    assert len(train) == 5 + 285 + 7 + 2 * 10 + 2 + 1 + 1
    flags = parse_flags(MidFlags, mid_base[:4] + ["--chat_examples", "5"])  # not hub: off by default
    assert "GSM8K" not in names(chat_mixture(flags, "train", flags.chat_data, MID_FRACTIONS, mixture_task_sets))
