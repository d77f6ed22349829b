"""Tiny real training setups shared by the optimizer, checkpoint, trainer, base_train and model_info tests:
a slice of a real pretraining shard, re-cut into small row groups, and a tokenizer trained on it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 320
# depth 1-2, width 32: big enough to learn, small enough that a step takes milliseconds on one core
TINY_MODEL_ARGS = ["--depth=2", "--model_dim=32", "--head_dim=16", "--max_seq_len=32"]


def read_real_docs(shared_data: Path, count: int, max_chars: int = 1200) -> list[str]:
    shard = sorted((shared_data / "pretrain").glob("shard_*.parquet"))[0]
    texts = pq.ParquetFile(shard).read_row_group(0, columns=["text"]).column("text").to_pylist()
    return [text[:max_chars] for text in texts[:count]]


def make_mini_corpus(base_dir: Path, shared_data: Path, train_docs: int = 96, val_docs: int = 24,
                     docs_per_group: int = 12) -> Tokenizer:
    """base_data/ with one train and one val shard (small row groups, so two ranks get different ones) and a
    tokenizer trained on the train text in base_dir/tokenizer."""
    docs = read_real_docs(shared_data, train_docs + val_docs)
    data_dir = base_dir / "base_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for index, texts in enumerate((docs[:train_docs], docs[train_docs:])):
        table = pa.table({"text": pa.array(texts, type=pa.string())})
        pq.write_table(table, data_dir / f"shard_{index:05d}.parquet", row_group_size=docs_per_group)
    tokenizer = Tokenizer.train_from_iterator(docs[:train_docs], VOCAB_SIZE)
    tokenizer.save(base_dir / "tokenizer")
    return tokenizer


def subprocess_env(base_dir: Path, **extra: str) -> dict:
    # one thread per process: the machine's cores are shared, and thread count changes float summation order
    return {**os.environ, "PYTHONPATH": str(REPO), "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", **extra}


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def read_losses(log_path: Path) -> dict[int, float]:
    """step -> raw loss from a train_log.jsonl (later lines win, as after a resume)."""
    import json

    losses = {}
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            losses[entry["step"]] = entry["loss"]
    return losses


def token_rows(tokenizer: Tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """All docs tokenized (BOS before each), cut into rows of seq_len + 1 tokens."""
    ids = [t for doc in tokenizer.encode(docs, prepend=tokenizer.bos_token_id) for t in doc]
    rows = len(ids) // (seq_len + 1)
    return torch.tensor(ids[:rows * (seq_len + 1)]).view(rows, seq_len + 1)
