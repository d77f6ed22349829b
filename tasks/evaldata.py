"""Rows for the eval tasks (ARC, MMLU, GSM8K, HumanEval), one `<name>.jsonl.gz` per split, found in this order:

1. `data_dir/<name>.jsonl.gz` when a task is given an explicit `data_dir` (tests pass `../shared/data/eval`);
2. `$NANOCHAT_BASE_DIR/<eval_data|chat_data>/<name>.jsonl.gz` (what `--source demo` builds, or an earlier fetch);
3. otherwise the public parquet files are fetched from the Hub (`tasks.hub`, atomic and cached), converted to
   the same row format and written there, so the next run reads step 2.

Row format (as in `../shared/data/README.md`): multiple choice `{"id", "question", "choices", "answer": int}`
(+ `subject` for MMLU); GSM8K `{"id", "question", "answer"}`; HumanEval as the package ships it.
`MultipleChoiceTask` is the categorical task ARC and MMLU share.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from nanochat.common import UserError, atomic_path, get_base_dir
from tasks.common import Task, render_mc
from tasks.hub import fetch_hub_parquet

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class HubSource:
    """Where the public copy of a split lives and how to turn one parquet row into our row format."""
    repo: str
    subdir: str
    pattern: str
    columns: tuple[str, ...]
    convert: Callable[[dict, int], dict]


def read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows_atomic(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def fetch_rows(source: HubSource, dest_dir: Path) -> list[dict]:
    parquet_dir = dest_dir / "hub" / source.repo.replace("/", "__") / source.subdir
    rows = []
    for path in fetch_hub_parquet(source.repo, source.subdir, source.pattern, source.columns, parquet_dir):
        for record in pq.read_table(path).to_pylist():
            rows.append(source.convert(record, len(rows)))
    return rows


def load_rows(name: str, kind: str, data_dir: str | Path | None, source: HubSource | None) -> list[dict]:
    """Rows of `<name>.jsonl.gz`; `kind` is "eval_data" (test splits) or "chat_data" (train splits)."""
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl.gz"
        if not path.exists():
            raise UserError(f"{path} not found; point data_dir at a folder of <task>.jsonl.gz files")
        return read_rows(path)
    path = get_base_dir() / kind / f"{name}.jsonl.gz"
    if not path.exists():
        if source is None:
            raise UserError(f"{path} not found; build it with python -m nanochat.dataset --source demo --what eval")
        rows = fetch_rows(source, path.parent)
        write_rows_atomic(path, rows)
    return read_rows(path)


class MultipleChoiceTask(Task):
    """A categorical task over multiple-choice rows: the user sees `render_mc`, the assistant answers a letter."""

    eval_type = "categorical"

    def __init__(self, rows: list[dict], **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.rows = rows

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        letters = LETTERS[:len(row["choices"])]
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], letters, row["choices"])},
                         {"role": "assistant", "content": letters[row["answer"]]}],
            "letters": letters,  # the answer tokens categorical evaluation compares
        }

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
