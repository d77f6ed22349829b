"""Pretraining shards in `$NANOCHAT_BASE_DIR/base_data/`: listing and reading them.

The highest-numbered shard is the validation split; every other shard is training data.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir

MAKE_SHARDS_HINT = ("make shards with `python -m nanochat.dataset -n 8` (download), "
                    "`--from_text PATH` (your own text) or `--source demo` (offline)")


def data_dir() -> Path:
    return get_base_dir() / "base_data"


def list_shards(directory: Path | None = None) -> list[Path]:
    """All complete shards, sorted; temp files from interrupted writes never match the pattern."""
    directory = directory or data_dir()
    return sorted(directory.glob("shard_*.parquet")) if directory.is_dir() else []


def split_shards(split: str, directory: Path | None = None) -> list[Path]:
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    shards = list_shards(directory)
    if len(shards) < 2:
        where = directory or data_dir()
        raise UserError(f"need at least 2 shards in {where} (train + val), found {len(shards)}; {MAKE_SHARDS_HINT}")
    return shards[:-1] if split == "train" else shards[-1:]


def iter_text_batches(split: str, start: int = 0, step: int = 1,
                      directory: Path | None = None) -> Iterator[list[str]]:
    """Yield the `text` column of row groups start, start+step, ... across the split's shards, in order."""
    index = 0
    for path in split_shards(split, directory):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            if index % step == start:
                yield parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            index += 1
