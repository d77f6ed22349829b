"""Synthetic arithmetic word problems that teach the calculator tool.

Each answer writes its calculations the way GSM8K solutions do (`17 + 25 = <<17+25=42>>42`), so it goes through
the same conversion into python/output parts (tasks/tooluse.py) and ends with `#### N`. Problems are one or two
steps of + - × ÷ (divisions always exact) over small story templates, generated from the index with a seeded
RNG; train and val draw from disjoint seed ranges.
"""
from __future__ import annotations

import random
from typing import Any

from tasks.common import Task
from tasks.tooluse import answers_match, tool_parts

SPLIT_SEEDS = {"train": 3_000_017, "val": 4_000_037}
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonah", "Kemi", "Lars"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "coins", "cards", "stamps", "buttons"]


def add_story(rng: random.Random, name: str, item: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 500), rng.randint(2, 500)
    question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return question, f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.", a + b


def subtract_story(rng: random.Random, name: str, item: str) -> tuple[str, str, int]:
    a = rng.randint(10, 900)
    b = rng.randint(1, a - 1)
    question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    return question, f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left.", a - b


def multiply_story(rng: random.Random, name: str, item: str) -> tuple[str, str, int]:
    boxes, per_box = rng.randint(2, 40), rng.randint(2, 60)
    total = boxes * per_box
    question = f"{name} buys {boxes} boxes with {per_box} {item} in each box. How many {item} is that?"
    return question, f"That is {boxes} * {per_box} = <<{boxes}*{per_box}={total}>>{total} {item}.", total


def divide_story(rng: random.Random, name: str, item: str) -> tuple[str, str, int]:
    friends, share = rng.randint(2, 12), rng.randint(2, 80)
    total = friends * share
    question = f"{name} shares {total} {item} equally among {friends} friends. How many does each friend get?"
    return question, f"Each friend gets {total} / {friends} = <<{total}/{friends}={share}>>{share} {item}.", share


def two_step_story(rng: random.Random, name: str, item: str) -> tuple[str, str, int]:
    boxes, per_box, extra = rng.randint(2, 20), rng.randint(2, 30), rng.randint(1, 99)
    subtotal = boxes * per_box
    total = subtotal + extra
    question = (f"{name} has {boxes} bags of {per_box} {item} and finds {extra} loose {item}. "
                f"How many {item} does {name} have in total?")
    solution = (f"The bags hold {boxes} * {per_box} = <<{boxes}*{per_box}={subtotal}>>{subtotal} {item}.\n"
                f"With the loose ones that is {subtotal} + {extra} = <<{subtotal}+{extra}={total}>>{total} {item}.")
    return question, solution, total


STORIES = [add_story, subtract_story, multiply_story, divide_story, two_step_story]


class Arithmetic(Task):
    """`size` calculator word problems; correct when the completion's `#### N` is the answer."""

    def __init__(self, size: int, split: str = "train", **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in SPLIT_SEEDS:
            raise ValueError(f"arithmetic split must be train or val, got {split!r}")
        self.size, self.split = size, split

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict[str, Any]:
        rng = random.Random(SPLIT_SEEDS[self.split] * 7919 + index)
        story = rng.choice(STORIES)
        question, solution, answer = story(rng, rng.choice(NAMES), rng.choice(ITEMS))
        solution += f"\n#### {answer}"
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": tool_parts(solution)}],
                "answer": solution}

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        return answers_match(completion, conversation["answer"])
