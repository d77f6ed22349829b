"""chat_sft: a real learning signal on held-out words, and one-line errors for bad batch arithmetic."""
from __future__ import annotations

import subprocess

import pyarrow.parquet as pq
import pytest

from nanochat.chat_eval import run_generative
from nanochat.checkpoint import checkpoint_dir, load_checkpoint, load_model
from nanochat.common import UserError
from nanochat.engine import Engine, SamplingParams
from nanochat.tokenizer import Tokenizer
from scripts.chat_sft import main
from tasks.spellingbee import SimpleSpelling, words_from_texts
from tests.chat_fixtures import chat_texts, make_base_checkpoint, one_thread  # noqa: F401 (fixture)
from tests.test_tasks_chat import WORDS
from tests.training_fixtures import read_losses, subprocess_env, torchrun_cmd

SYNTHETIC_OFF = ["--chat_examples", "0", "--spelling_bee", "0", "--arithmetic", "0", "--task_train_sets", "false"]


@pytest.fixture
def spelling_base(base_dir, shared_data):
    """Short real words (from a pretraining shard) and a random depth-2 base model with a near-byte-level vocab,
    so that spelling a held-out word means reading its bytes, not recalling it."""
    texts = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet").read_row_group(0).column("text")
    words = [w for w in words_from_texts(texts.to_pylist(), min_count=2) if len(w) <= 6]
    words_file = base_dir / "words.txt"
    words_file.write_text("\n".join(words) + "\n")
    make_base_checkpoint(base_dir, Tokenizer.train_from_iterator(chat_texts(100), 300), model_dim=64, seq_len=64)
    return words, words_file


def spelling_accuracy(source: str, words: list[str]) -> float:
    model, tokenizer, _ = load_model(source, "cpu")
    held_out = SimpleSpelling(50, split="val", words=words)
    solved, total = run_generative(Engine(model, tokenizer), tokenizer, held_out, SamplingParams(max_tokens=32))
    return solved / total


@pytest.mark.slow
def test_sft_learns_to_spell_held_out_words(spelling_base, one_thread):  # noqa: F811
    words, words_file = spelling_base
    before = spelling_accuracy("base", words)
    main(["--source", "base", *SYNTHETIC_OFF, "--simple_spelling", "4800", "--words_file", str(words_file),
          "--device_batch_size", "16", "--target_examples_per_step", "16", "--init_lr_frac", "1.0",
          "--eval_every", "-1", "--chat_eval_every", "-1"])
    after = spelling_accuracy("sft", words)
    # A random model never spells a word exactly; 300 steps get about half of the unseen words right.
    assert before == 0.0 and after >= 0.3, (before, after)


def test_sft_batch_arithmetic_and_empty_mixture_errors(spelling_base):
    _, words_file = spelling_base
    with pytest.raises(UserError, match="--target_examples_per_step 30 is not a multiple of 4 .* try "
                                        "--target_examples_per_step 32"):
        main(["--source", "base", *SYNTHETIC_OFF, "--simple_spelling", "10", "--words_file", str(words_file),
              "--target_examples_per_step", "30"])
    with pytest.raises(UserError, match="the mixture is empty"):
        main(["--source", "base", *SYNTHETIC_OFF, "--simple_spelling", "0"])
    with pytest.raises(SystemExit):  # argparse's one-line "invalid choice" error, exit 2
        main(["--source", "rl"])


@pytest.mark.slow
def test_sft_under_torchrun_two_ranks_resumes_exactly(base_dir, shared_data):
    make_base_checkpoint(base_dir, Tokenizer.train_from_iterator(chat_texts(100), 300), seq_len=48)
    words = base_dir / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    args = ["-m", "scripts.chat_sft", "--source", "base", "--chat_data", str(shared_data / "chat"),
            "--chat_examples", "40", "--words_file", str(words), "--device_batch_size", "2",
            "--target_examples_per_step", "8", "--num_iterations", "4", "--eval_every", "4", "--eval_batches", "2",
            "--chat_eval_every", "4", "--chat_eval_max", "4", "--save_every", "2", "--keep_last", "-1"]

    def run(*extra):
        result = subprocess.run(torchrun_cmd(2, *args, *extra), capture_output=True, text=True,
                                env=subprocess_env(base_dir), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    out = run()
    assert "2 rank(s)" in out and "val_loss" in out and "SpellingBee_acc" in out
    tag_dir = checkpoint_dir("sft", "d2")
    losses = read_losses(tag_dir / "train_log.jsonl")
    assert sorted(losses) == [1, 2, 3, 4]
    assert load_checkpoint(tag_dir, 4, "cpu", load_optimizer=False).meta["world_size"] == 2
    run("--resume_from_step", "2")
    assert read_losses(tag_dir / "train_log.jsonl") == losses
