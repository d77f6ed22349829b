"""HumanEval: 164 Python functions to complete; a completion passes when the task's tests run to the end in the
sandbox (nanochat.execution)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nanochat.execution import SandboxLimits, execute_code
from tasks.common import Task
from tasks.evaldata import HubSource, load_rows

FENCED_CODE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def convert_hub_row(record: dict, index: int) -> dict:
    return {key: record[key] for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}


def extract_code(completion: str) -> str:
    """The first fenced code block when there is one, else the completion as it is."""
    match = FENCED_CODE.search(completion)
    return match.group(1) if match else completion


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The completion as a whole module (a bare function body continues the prompt), then the tests."""
    code = extract_code(completion)
    if not re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        code = prompt + code
    else:
        imports = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
        code = "\n".join(imports) + "\n\n" + code
    return f"{code}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, data_dir: str | Path | None = None, limits: SandboxLimits | None = None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        source = HubSource("openai/openai_humaneval", "openai_humaneval", "test-*.parquet",
                           ("task_id", "prompt", "canonical_solution", "test", "entry_point"), convert_hub_row)
        self.rows = load_rows("humaneval", "eval_data", data_dir, source)
        self.limits = limits or SandboxLimits(timeout_s=10)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "test": row["test"], "entry_point": row["entry_point"], "task_id": row["task_id"]}

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        prompt = conversation["messages"][0]["content"]
        program = build_program(prompt, completion, conversation["test"], conversation["entry_point"])
        return execute_code(program, self.limits, label=conversation["task_id"]).success
