"""Tasks: indexable sources of conversations, and ways to combine them.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}` (DESIGN.md's chat format). Eval tasks
also say how to score a completion (`eval_type` and `evaluate`). Slicing with `start/stop/step` lets a run use
part of a task (e.g. the first 1000 examples, or every 4th) without copying data.
"""
from __future__ import annotations

import random
from typing import Any


class Task:
    """Base class: subclasses implement `num_examples()` and `get_example(i)` over their full data."""

    eval_type: str = "generative"  # "categorical" (pick one of given letters) or "generative" (sample + check)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        """True when `completion` answers `conversation` correctly (eval tasks only)."""
        raise NotImplementedError(f"{type(self).__name__} is not an eval task")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range (len {len(self)})")
        return self.get_example(self.start + index * self.step)


class TaskMixture(Task):
    """Several tasks interleaved in one fixed-seed shuffle; list a task twice to oversample it."""

    def __init__(self, tasks: list[Task], seed: int = 42):
        super().__init__()
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict[str, Any]:
        task_idx, example_idx = self.index_map[index]
        return self.tasks[task_idx][example_idx]


class TaskSequence(Task):
    """Tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks: list[Task]):
        super().__init__()
        self.tasks = tasks
        self.offsets = []
        total = 0
        for task in tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    def num_examples(self) -> int:
        return self.total

    def get_example(self, index: int) -> dict[str, Any]:
        for task, offset in zip(reversed(self.tasks), reversed(self.offsets)):
            if index >= offset:
                return task[index - offset]
        raise IndexError(index)


def render_mc(question: str, letters: str, choices: list[str]) -> str:
    """The multiple-choice prompt every categorical task uses, so the model sees one format."""
    lines = [f"Question: {question}"]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines.append("Answer with the letter of the correct choice only.")
    return "\n".join(lines)
