"""MMLU: 57 subjects of four-choice questions. `test` to evaluate, `dev` (5 per subject), and the
`auxiliary_train` set that mid-training uses to teach the multiple-choice format."""
from __future__ import annotations

from pathlib import Path

from tasks.evaldata import HubSource, MultipleChoiceTask, load_rows

SPLITS = {"test": ("mmlu", "eval_data", "all", "test"), "dev": ("mmlu_dev", "eval_data", "all", "dev"),
          "auxiliary_train": ("mmlu_aux_train", "chat_data", "auxiliary_train", "train")}


def convert_hub_row(record: dict, index: int) -> dict:
    # auxiliary_train nests each row under a `train` struct column
    row = record.get("train") if isinstance(record.get("train"), dict) else record
    return {"id": f"mmlu-{index}", "subject": row.get("subject", ""), "question": row["question"],
            "choices": list(row["choices"]), "answer": int(row["answer"])}


class MMLU(MultipleChoiceTask):
    def __init__(self, split: str = "test", data_dir: str | Path | None = None, **slice_kwargs):
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {list(SPLITS)}, got {split!r}")
        name, kind, subdir, hub_split = SPLITS[split]
        source = HubSource("cais/mmlu", subdir, f"{hub_split}-*.parquet", (), convert_hub_row)
        super().__init__(load_rows(name, kind, data_dir, source), **slice_kwargs)
