"""chat_eval: letter choice for categorical tasks, pass@k for generative ones, ChatCORE, flag errors."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nanochat.chat_eval import chatcore, parse_task_names, run_categorical, run_generative
from nanochat.common import UserError
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from scripts.chat_eval import ChatEvalFlags
from tasks.arc import ARC
from tasks.common import Task
from tests.model_cases import tiny_config
from tests.training_fixtures import REPO


@pytest.fixture(scope="module")
def arc(shared_data):
    return ARC("ARC-Easy", data_dir=shared_data / "eval", stop=40)


@pytest.fixture(scope="module")
def tokenizer(arc):
    texts = [arc[i]["messages"][0]["content"] for i in range(len(arc))]
    return Tokenizer.train_from_iterator(texts, vocab_size=320)


class PrefersLetter(nn.Module):
    """Every position puts most weight on one token (an answer letter) and a little on another letter."""

    def __init__(self, vocab_size, favourite, runner_up, max_seq_len):
        super().__init__()
        self.config = GPTConfig(max_seq_len=max_seq_len, vocab_size=vocab_size)
        self.vocab_size, self.favourite, self.runner_up = vocab_size, favourite, runner_up
        self.widths = []

    def forward(self, idx):
        self.widths.append(idx.shape[1])
        logits = torch.zeros(*idx.shape, self.vocab_size)
        logits[..., self.runner_up] = 5.0
        logits[..., self.favourite] = 9.0
        return logits


def test_categorical_picks_the_argmax_letter(arc, tokenizer):
    letter_c = tokenizer.encode("C")[0]
    # the favourite is not a letter at all: only letters compete, so the runner-up C is the answer
    model = PrefersLetter(tokenizer.vocab_size, tokenizer.encode(" ")[0], letter_c, max_seq_len=4096)
    correct, total = run_categorical(model, tokenizer, arc, "cpu", max_problems=30, batch_size=7)
    expected = sum(arc[i]["messages"][1]["content"] == "C" for i in range(30))
    assert (correct, total) == (expected, 30)
    assert 0 < expected < 30


def test_categorical_crops_long_prompts(arc, tokenizer):
    model = PrefersLetter(tokenizer.vocab_size, tokenizer.encode("A")[0], tokenizer.encode("B")[0], max_seq_len=24)
    correct, total = run_categorical(model, tokenizer, arc, "cpu", max_problems=10, batch_size=4)
    assert total == 10 and correct == sum(arc[i]["messages"][1]["content"] == "A" for i in range(10))
    assert max(model.widths) == 24


def test_categorical_rank_split(arc, tokenizer):
    model = PrefersLetter(tokenizer.vocab_size, tokenizer.encode("B")[0], tokenizer.encode("A")[0], 4096)
    parts = [run_categorical(model, tokenizer, arc, "cpu", 11, 4, rank, 3) for rank in range(3)]
    assert sum(total for _, total in parts) == 11
    assert sum(c for c, _ in parts) == run_categorical(model, tokenizer, arc, "cpu", 11, 4)[0]


class ThirdTimeLucky(Task):
    """A generative toy task: each problem passes on its third evaluation only, so pass@k needs k >= 3."""

    eval_type = "generative"

    def __init__(self, size, question="tell me something"):
        super().__init__()
        self.size, self.question, self.calls = size, question, {}

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.question} {index}"}], "index": index}

    def evaluate(self, conversation, completion):
        index = conversation["index"]
        self.calls[index] = self.calls.get(index, 0) + 1
        return self.calls[index] == 3


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, depth=1, max_seq_len=32))
    model.init_weights()
    model.eval()
    return Engine(model, tokenizer)


def test_pass_at_k_counts_a_problem_once_any_sample_passes(engine, tokenizer):
    settings = SamplingParams(num_samples=3, max_tokens=4, temperature=1.0)
    assert run_generative(engine, tokenizer, ThirdTimeLucky(5), settings, max_problems=4) == (4, 4)
    single = SamplingParams(num_samples=1, max_tokens=4, temperature=0.0)
    assert run_generative(engine, tokenizer, ThirdTimeLucky(5), single) == (0, 5)


def test_generative_prompts_are_cropped_to_leave_room(engine, tokenizer):
    task = ThirdTimeLucky(2, question="a very long question " * 40)
    settings = SamplingParams(num_samples=3, max_tokens=8, temperature=1.0)
    assert run_generative(engine, tokenizer, task, settings) == (2, 2)
    # an answer budget as long as the context is capped at half of it, leaving the other half to the prompt
    too_long = SamplingParams(num_samples=3, max_tokens=32, temperature=1.0)
    assert run_generative(engine, tokenizer, ThirdTimeLucky(2, question="long " * 80), too_long) == (2, 2)


def test_chatcore_centers_each_task():
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.5}) == pytest.approx((0.0 + 0.5) / 2)
    assert chatcore({"MMLU": 1.0}) == 1.0
    assert parse_task_names("ARC-Easy|GSM8K") == ["ARC-Easy", "GSM8K"]
    assert len(parse_task_names("")) == 6


def test_flag_errors():
    with pytest.raises(UserError, match="unknown task"):
        ChatEvalFlags(task_name="ARC-Easy|Trivia")
    with pytest.raises(UserError, match="-t"):
        ChatEvalFlags(num_samples=4, temperature=0.0)


@pytest.mark.slow
def test_bad_flag_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-x", "0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: -x/--max_problems must be >= 1 or -1 (all), got 0"
