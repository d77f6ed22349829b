"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science questions, 3-5 choices."""
from __future__ import annotations

from pathlib import Path

from tasks.evaldata import HubSource, MultipleChoiceTask, load_rows

SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


def convert_hub_row(record: dict, index: int) -> dict:
    labels = list(record["choices"]["label"])
    return {"id": record["id"], "question": record["question"], "choices": list(record["choices"]["text"]),
            "answer": labels.index(record["answerKey"])}


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str = "ARC-Easy", split: str = "test", data_dir: str | Path | None = None,
                 **slice_kwargs):
        if subset not in SUBSETS or split not in ("test", "train"):
            raise ValueError(f"ARC subset must be one of {list(SUBSETS)} and split test|train, "
                             f"got {subset!r}, {split!r}")
        name = SUBSETS[subset] + ("" if split == "test" else "_train")
        source = HubSource("allenai/ai2_arc", subset, f"{split}-*.parquet", ("id", "question", "choices", "answerKey"),
                           convert_hub_row)
        rows = load_rows(name, "eval_data" if split == "test" else "chat_data", data_dir, source)
        super().__init__(rows, **slice_kwargs)
