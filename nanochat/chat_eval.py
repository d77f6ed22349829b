"""Chat-model evaluation on the tasks in tasks/: categorical (ARC, MMLU) and generative (GSM8K, HumanEval,
SpellingBee), and ChatCORE, the mean accuracy centered against each task's random baseline.

- categorical: one forward pass per batch of prompts; the answer is the argmax over the answer letters'
  tokens at the position after `<|assistant_start|>` (so a model that has not learned the format still picks
  a letter).
- generative: `num_samples` completions per problem from the engine (one batched generation per problem, each
  with its own seed); a problem counts as solved when any sample passes `task.evaluate` (pass@k).
Prompts longer than the context lose tokens from the left. Rank r takes problems r, r+w, ...; counts are
summed over ranks.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from nanochat.common import UserError, print0, sum_across_ranks
from nanochat.core_eval import centered
from nanochat.engine import SamplingParams, fit_prompt
from tasks.common import Task

TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
# random-guess accuracy per task: 4-way multiple choice for ARC/MMLU, 0 for open answers
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
SPELLING_BEE_SIZE = 256


def build_task(name: str, data_dir: str | Path | None = None) -> Task:
    """The eval split of a task by its name; `data_dir` holds `<task>.jsonl.gz` (None = base dir / Hub)."""
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.spellingbee import SpellingBee

    builders = {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", data_dir),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", data_dir),
        "MMLU": lambda: MMLU("test", data_dir),
        "GSM8K": lambda: GSM8K("test", data_dir),
        "HumanEval": lambda: HumanEval(data_dir),
        "SpellingBee": lambda: SpellingBee(SPELLING_BEE_SIZE, "val"),
    }
    if name not in builders:
        raise UserError(f"unknown task {name!r}; choose from {'|'.join(TASK_NAMES)}")
    return builders[name]()


def parse_task_names(spec: str) -> list[str]:
    """`ARC-Easy|GSM8K` -> names; empty = all tasks."""
    names = [n.strip() for n in spec.split("|") if n.strip()] if spec else list(TASK_NAMES)
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; choose from {'|'.join(TASK_NAMES)}")
    return names


def problem_indices(task: Task, max_problems: int, rank: int, world_size: int) -> list[int]:
    count = len(task) if max_problems < 0 else min(max_problems, len(task))
    return list(range(rank, count, world_size))


def sum_over_ranks(correct: int, total: int, device) -> tuple[int, int]:
    counts = sum_across_ranks([correct, total], device)
    return int(counts[0].item()), int(counts[1].item())


def answer_token_ids(tokenizer, letters: str) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise UserError(f"answer letter {letter!r} is {len(encoded)} tokens in this tokenizer; expected 1")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def run_categorical(model, tokenizer, task: Task, device, max_problems: int = -1, batch_size: int = 8,
                    rank: int = 0, world_size: int = 1, progress: bool = False) -> tuple[int, int]:
    """(correct, total) over all ranks: argmax over the letter tokens after the prompt."""
    max_seq_len = model.config.max_seq_len
    indices = problem_indices(task, max_problems, rank, world_size)
    correct = 0
    for b in tqdm(range(0, len(indices), batch_size), desc=type(task).__name__, disable=not progress):
        conversations = [task[i] for i in indices[b:b + batch_size]]
        prompts = [fit_prompt(tokenizer.render_for_completion(c), max_seq_len, 0)[0] for c in conversations]
        width = max(len(p) for p in prompts)
        inputs = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            inputs[row, :len(prompt)] = torch.tensor(prompt)
        logits = model(inputs.to(device))
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            letter_logits = logits[row, len(prompt) - 1, answer_token_ids(tokenizer, letters)]
            correct += task.evaluate(conversation, letters[int(letter_logits.argmax())])
    return sum_over_ranks(correct, len(indices), device)


def run_generative(engine, tokenizer, task: Task, sampling: SamplingParams, max_problems: int = -1,
                   rank: int = 0, world_size: int = 1, progress: bool = False) -> tuple[int, int]:
    """(solved, total) over all ranks, where solved = any of the `num_samples` completions passes; problem i
    samples with seed i."""
    context = engine.model.config.max_seq_len
    # a small model's context cannot hold a long answer budget: keep at least half of it for the prompt
    max_new_tokens = min(sampling.max_tokens, context // 2)
    if max_new_tokens < sampling.max_tokens:
        print0(f"note: --max_new_tokens {sampling.max_tokens} capped at {max_new_tokens} "
               f"(half of the model's {context}-token context)")
    indices = problem_indices(task, max_problems, rank, world_size)
    solved = 0
    for i in tqdm(indices, desc=type(task).__name__, disable=not progress):
        conversation = task[i]
        prompt, budget = fit_prompt(tokenizer.render_for_completion(conversation), context, max_new_tokens)
        results, _ = engine.generate_batch(prompt, **replace(sampling, max_tokens=budget, seed=i).engine_kwargs())
        completions = [tokenizer.decode(row[len(prompt):]) for row in results]
        solved += any(task.evaluate(conversation, completion) for completion in completions)
    return sum_over_ranks(solved, len(indices), engine.device)


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean centered accuracy over the tasks evaluated."""
    return sum(centered(acc, BASELINES[name]) for name, acc in accuracies.items()) / len(accuracies)
