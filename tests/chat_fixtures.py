"""Helpers for the chat-training tests: a tiny tokenizer trained on real chat text, tiny checkpoints."""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from nanochat.tokenizer import Tokenizer

SHARED_CHAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat"


def chat_texts(limit: int = 300) -> list[str]:
    """Message texts of the first `limit` shared validation conversations."""
    with gzip.open(SHARED_CHAT / "val.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in itertools.islice(handle, limit)]
    return [m["content"] for row in rows for m in row["messages"]]


def train_tiny_tokenizer(vocab_size: int = 512, extra_texts: list[str] | None = None) -> Tokenizer:
    return Tokenizer.train_from_iterator(chat_texts() + (extra_texts or []), vocab_size)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_base_checkpoint(base_dir: Path, tokenizer: Tokenizer, tag: str = "d2", depth: int = 2, model_dim: int = 32,
                         seq_len: int = 64, seed: int = 0) -> Path:
    """A freshly initialised tiny GPT saved as base checkpoint step 0, with the tokenizer in base_dir/tokenizer."""
    import torch

    from nanochat.checkpoint import checkpoint_dir, create_model, save_checkpoint
    from tests.model_cases import tiny_config

    tokenizer.save(base_dir / "tokenizer")
    torch.manual_seed(seed)
    model = create_model(tiny_config(tokenizer.vocab_size, depth=depth, model_dim=model_dim, max_seq_len=seq_len),
                         "cpu")
    return save_checkpoint(checkpoint_dir("base", tag), 0, model, [], {}, {})


@pytest.fixture
def one_thread():
    """In-process training on one thread: on a shared 2-core machine extra torch threads thrash (100x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
