"""On-policy RL pieces for chat_rl: rollouts as a resumable batch iterator, the policy-gradient loss, pass@k.

Each micro-batch is one question: the engine samples `num_samples` answers from the current model, each gets
reward 1 when the task's `evaluate` accepts it, and advantage = reward - mean reward of the group. The loss is
-Σ advantage · log p(sampled token) / (number of sampled tokens), over tokens the model chose (not the prompt,
not calculator output the engine forced, not padding). The trainer's `loss_fn` hook runs it inside the one loop.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from nanochat.chat_data import IGNORE
from nanochat.common import autocast_context, sum_across_ranks
from nanochat.engine import Engine, SamplingParams, fit_prompt
from tasks.common import Task


class RolloutBatches:
    """`(inputs, targets, advantages)` per question, sampled on demand; the state is the question position."""

    def __init__(self, model, tokenizer, task: Task, sampling: SamplingParams, device: torch.device, rank: int = 0,
                 world_size: int = 1, dtype: torch.dtype = torch.float32):
        """`sampling.num_samples` answers per question, each at most `sampling.max_tokens` long."""
        self.engine, self.tokenizer, self.task = Engine(model, tokenizer), tokenizer, task
        self.max_seq_len = model.config.max_seq_len
        self.sampling = sampling
        self.device, self.rank, self.world_size = device, rank, world_size
        self.dtype = dtype  # rollouts sample in the training compute dtype, as the loss is computed
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.position = 0
        self.reward_sum = 0.0
        self.samples = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = (self.position * self.world_size + self.rank) % len(self.task)
        conversation = self.task[index]
        prompt, budget = fit_prompt(self.tokenizer.render_for_completion(conversation), self.max_seq_len,
                                    self.sampling.max_tokens)
        # The seed follows the question, so a resumed run samples exactly what the original would have.
        question = replace(self.sampling, max_tokens=budget, seed=self.sampling.seed * 1_000_003 + index)
        with autocast_context(self.device, self.dtype):
            results, masks = self.engine.generate_batch(prompt, **question.engine_kwargs())
        self.position += 1
        rows, rewards = [], []
        for tokens, mask in zip(results, masks):
            completion = tokens[len(prompt):]
            rewards.append(float(self.task.evaluate(conversation, self.tokenizer.decode(completion))))
            if len(completion) < budget:  # stopped on its own: <|assistant_end|> was sampled too
                tokens, mask = tokens + [self.assistant_end], mask + [1]
            rows.append((tokens[:self.max_seq_len + 1], mask[:self.max_seq_len + 1]))
        self.reward_sum += sum(rewards)
        self.samples += len(rewards)
        length = max(len(t) for t, _ in rows)
        ids = torch.full((len(rows), length), self.assistant_end, dtype=torch.long)
        targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        for i, (tokens, mask) in enumerate(rows):
            ids[i, :len(tokens)] = torch.tensor(tokens)
            targets[i, :len(tokens)] = torch.where(torch.tensor(mask, dtype=torch.bool), ids[i, :len(tokens)], IGNORE)
        reward = torch.tensor(rewards)
        advantages = reward - reward.mean()
        return (ids[:, :-1].to(self.device), targets[:, 1:].to(self.device), advantages.to(self.device))

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / max(self.samples, 1)

    def state_dict(self) -> dict:
        return {"position": self.position, "reward_sum": self.reward_sum, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.reward_sum, self.samples = state["position"], state["reward_sum"], state["samples"]


def policy_gradient_loss(model, batch) -> torch.Tensor:
    """-mean over sampled tokens of advantage · log p(token); 0 (not NaN) when nothing was sampled."""
    inputs, targets, advantages = batch
    log_probs = -model(inputs, targets, loss_reduction="none")  # (B, T), 0 where target is IGNORE
    sampled = (targets != IGNORE).sum().clamp(min=1)
    return -(log_probs * advantages[:, None].to(log_probs.dtype)).sum() / sampled


def pass_at_k(model, tokenizer, task: Task, num_problems: int, sampling: SamplingParams, rank: int = 0,
              world_size: int = 1) -> dict[str, float]:
    """pass@1..k (k = `sampling.num_samples`): the fraction of the first `num_problems` problems that one of the
    first j samples solves; problem i samples with seed `sampling.seed + i`."""
    engine = Engine(model, tokenizer)
    k = sampling.num_samples
    solved = [0] * (k + 1)  # solved[j-1] counts pass@j; the last entry counts problems
    for index in range(rank, min(num_problems, len(task)), world_size):
        conversation = task[index]
        prompt, budget = fit_prompt(tokenizer.render_for_completion(conversation), model.config.max_seq_len,
                                    sampling.max_tokens)
        results, _ = engine.generate_batch(
            prompt, **replace(sampling, max_tokens=budget, seed=sampling.seed + index).engine_kwargs())
        correct = [task.evaluate(conversation, tokenizer.decode(r[len(prompt):])) for r in results]
        for j in range(1, k + 1):
            solved[j - 1] += any(correct[:j])
        solved[k] += 1
    solved = sum_across_ranks(solved, engine.device)
    problems = solved[k].clamp(min=1)
    return {f"pass@{j}": (solved[j - 1] / problems).item() for j in range(1, k + 1)}
