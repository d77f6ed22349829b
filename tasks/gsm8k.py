"""GSM8K: grade-school math word problems. The solution's `<<expr=value>>` calculator annotations become tool
calls (tasks.tooluse), and a completion is right when its final `#### N` equals the reference's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import Task
from tasks.evaldata import HubSource, load_rows
from tasks.tooluse import answers_match, tool_parts


def convert_hub_row(record: dict, index: int) -> dict:
    return {"id": f"gsm8k-{index}", "question": record["question"], "answer": record["answer"]}


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str = "test", data_dir: str | Path | None = None, **slice_kwargs):
        if split not in ("test", "train"):
            raise ValueError(f"GSM8K split must be test or train, got {split!r}")
        super().__init__(**slice_kwargs)
        source = HubSource("openai/gsm8k", "main", f"{split}-*.parquet", ("question", "answer"), convert_hub_row)
        self.rows = load_rows("gsm8k" if split == "test" else "gsm8k_train",
                              "eval_data" if split == "test" else "chat_data", data_dir, source)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": tool_parts(row["answer"])}]}

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        reference = "".join(part["text"] for part in conversation["messages"][-1]["content"])
        return answers_match(completion, reference)
