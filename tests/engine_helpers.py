"""Real tiny components for the engine, base_complete and chat_cli tests: a tokenizer trained on a few dozen
strings, random depth-1/2 GPTs, a GPT with known logits, and a saved checkpoint in a test base dir."""
from __future__ import annotations

import os
import re
import shlex
import string
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import CHECKPOINT_DIRS, save_checkpoint
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from tests.model_cases import tiny_config

TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 6 times 7? It is 42.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "the cat sat on the mat; the dog sat on the log.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 100 1000",
    "hello world, hello there, hello again",
    "A strawberry has three r letters in it.",
    "def add(a, b): return a + b",
] * 4


# Tiny models run fastest on one thread, and on a shared 2-core machine two threads per process oversubscribe
# the cores badly (150 training steps measured 83 s with 2 threads under load, 3 s with 1).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Autouse in every module that imports it: torch on one thread for the module, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    return Tokenizer.train_from_iterator(TRAINING_TEXTS, vocab_size)


def random_gpt(vocab_size: int, seed: int = 0, **switches) -> GPT:
    """A random GPT whose blocks do real work: zero-initialised projections are perturbed. Depth 2, 4 heads of 8
    (2 kv heads), context 128, unless `switches` (any GPTConfig field, see tests/model_cases.py) say otherwise."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab_size, **{**dict(head_dim=8, num_kv_heads=2, max_seq_len=128), **switches}))
    model.init_weights()
    return perturb_projections(model).eval()


@torch.no_grad()
def perturb_projections(model: GPT) -> GPT:
    """Zero-initialised projections make every block the identity, and some switches start neutral (smear off,
    x0 blend 0); perturb them so tests exercise attention and every switch."""
    for block in model.blocks:
        block.attn.c_proj.weight.normal_(std=0.1)
        block.mlp.c_proj.weight.normal_(std=0.1)
    model.lm_head.weight.normal_(std=0.3)
    for name in ("smear_lambda", "x0_lambdas", "backout_lambda"):
        if getattr(model, name, None) is not None:
            getattr(model, name).add_(torch.rand_like(getattr(model, name)) * 0.5)
    return model


def known_logits_gpt(vocab_size: int, logits_by_token: dict[int, float], max_seq_len: int = 64) -> GPT:
    """A GPT whose next-token logits are the same at every position: `logits_by_token` (pre soft-cap), 0 else.

    Every token embeds to the same vector and each block is the identity (zero output projections), so the final
    hidden state is all ones after RMSNorm; lm_head row j = logit_j / dim makes logit j exactly logit_j.
    """
    config = tiny_config(vocab_size, depth=1, head_dim=8, num_kv_heads=2, max_seq_len=max_seq_len)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.wte.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for token, logit in logits_by_token.items():
            model.lm_head.weight[token].fill_(logit / config.model_dim)
    return model.eval()


def printable_gpt(tokenizer: Tokenizer, max_seq_len: int = 128, seed: int = 0) -> GPT:
    """A random depth-1 GPT that can only win greedy picks with plain printable ASCII tokens (no newlines,
    no '#', no special tokens), so its text is safe to show in a terminal and compare with the screen."""
    model = random_gpt(tokenizer.vocab_size, depth=1, max_seq_len=max_seq_len, seed=seed)
    allowed = set(string.ascii_letters + string.digits + " .,?!'")
    with torch.no_grad():
        for token in range(tokenizer.vocab_size):
            if not set(tokenizer.decode([token])) <= allowed or token >= len(tokenizer.mergeable_ranks):
                model.lm_head.weight[token] = 0.0
    return model


def save_model(base_dir: Path, model: GPT, source: str = "base", tag: str = "d1", step: int = 5) -> None:
    """Save `model` where `load_model(source)` finds it (weights only, no optimizer)."""
    save_checkpoint(base_dir / CHECKPOINT_DIRS[source] / tag, step, model, optimizers=[], meta={},
                    rank_state={}, keep_last=-1)


def train_tool_caller(tokenizer: Tokenizer, sequence: list[int], steps: int = 80) -> GPT:
    """Overfit a depth-1 GPT on one conversation so greedy decoding reproduces its tool call."""
    model = random_gpt(tokenizer.vocab_size, depth=1, max_seq_len=64).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([sequence])
    for _ in range(steps):
        loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


TOOL_CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 6 times 7?"},
    # the training answer says 41: generation must show the calculator's 42, not what the model learned
    {"role": "assistant", "content": [{"type": "python", "text": "6*7"},
                                      {"type": "python_output", "text": "41"},
                                      {"type": "text", "text": " so 42."}]},
]}


class Tmux:
    """A command running in a detached tmux session on a private socket, driven with send-keys like a user."""

    def __init__(self, command: str, env: dict[str, str], width: int = 120, height: int = 40):
        self.socket = f"nanochat-test-{os.getpid()}-{id(self)}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**SUBPROCESS_ENV, **env}.items())
        # keep the pane after exit so the last screen and the exit code can still be read
        script = f"export {exports}; {command}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", "main", "-x", str(width), "-y", str(height),
                  f"bash -c {shlex.quote(script)}")
        self.socket_path = Path(self.tmux("display-message", "-p", "#{socket_path}").strip())

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True).stdout

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "main", *keys)

    def type_line(self, text: str) -> None:
        self.tmux("send-keys", "-t", "main", "-l", text)
        self.send("Enter")

    def screen(self, escapes: bool = False) -> str:
        """The whole pane history, wrapped lines joined, trailing blank space dropped; with `escapes`, colour
        codes included."""
        args = ["capture-pane", "-p", "-J", "-S", "-", "-t", "main", *(["-e"] if escapes else [])]
        return self.tmux(*args).rstrip()

    def wait_for(self, pattern: str, timeout: float = 60.0, escapes: bool = False) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.screen(escapes), re.S)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never matched {pattern!r}:\n{self.screen()}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        self.socket_path.unlink(missing_ok=True)  # the killed server leaves its socket file behind
