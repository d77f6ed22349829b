"""Schedules: step -> value. The trainer applies one `Schedule` per step, before the update:
every param group's `lr = initial_lr * schedule.lr(step)`, Muon's `momentum = schedule.muon_momentum(step)` and
its `weight_decay = initial_weight_decay * schedule.weight_decay(step)`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from nanochat.common import UserError

StepFn = Callable[[int], float]


def warmup_warmdown(num_iterations: int, warmup_steps: int = 0, warmdown_ratio: float = 0.2,
                    final_lr_frac: float = 0.0) -> StepFn:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to `final_lr_frac` over the last
    `warmdown_ratio` of the run (the last step itself runs at final_lr_frac)."""
    if not 0.0 <= warmdown_ratio <= 1.0:
        raise UserError(f"--warmdown_ratio must be in [0, 1], got {warmdown_ratio}")
    if warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0, got {warmup_steps}")
    if final_lr_frac < 0:
        raise UserError(f"--final_lr_frac must be >= 0, got {final_lr_frac}")
    warmdown_steps = round(warmdown_ratio * num_iterations)

    def lr_multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if warmdown_steps == 0 or step < num_iterations - warmdown_steps:
            return 1.0
        progress = (num_iterations - 1 - step) / max(warmdown_steps - 1, 1)  # 1 at the start of warm-down, 0 at the end
        return final_lr_frac + (1.0 - final_lr_frac) * max(progress, 0.0)

    return lr_multiplier


def muon_momentum(start: float = 0.85, peak: float = 0.95, warmup_steps: int = 300, final: float | None = None,
                  num_iterations: int = 0, warmdown_ratio: float = 0.0) -> StepFn:
    """Linear `start` -> `peak` over `warmup_steps`; with `final`, linear `peak` -> `final` over the LR warm-down
    (the last `warmdown_ratio` of `num_iterations`): lower momentum while the LR anneals (modded-nanogpt,
    nanochat 2026: 0.85 -> 0.97 over 400 steps, 0.90 at the end)."""
    warmdown_steps = round(warmdown_ratio * num_iterations) if final is not None else 0
    warmdown_start = num_iterations - warmdown_steps

    def momentum(step: int) -> float:
        frac = min(step / warmup_steps, 1.0) if warmup_steps else 1.0
        warming = (1 - frac) * start + frac * peak
        if warmdown_steps and step >= warmdown_start:
            progress = (step - warmdown_start) / warmdown_steps
            # the lower of the two curves: continuous even when the warm-down starts before the warm-up ends
            return min(warming, peak * (1 - progress) + final * progress)
        return warming

    return momentum


def constant(value: float = 1.0) -> StepFn:
    return lambda step: value


def cosine_to_zero(num_iterations: int) -> StepFn:
    """1 at step 0, 0 at `num_iterations` (nanochat 2026's Muon weight-decay schedule: strong decay early, none at
    the end when the LR is already small)."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / num_iterations))


@dataclass
class Schedule:
    """What the trainer sets before each step; the defaults are the 2025 behaviour (fixed weight decay, Muon
    momentum warmed 0.85 -> 0.95 over 300 steps)."""
    lr: StepFn
    muon_momentum: StepFn = field(default_factory=muon_momentum)
    weight_decay: StepFn = field(default_factory=constant)


REFERENCE_BATCH = 2 ** 19  # tokens; the batch nanochat 2026 measured best at d12, the reference width


def auto_batch_size(tokens: float, reference_tokens: float, reference_batch: int = REFERENCE_BATCH) -> int:
    """The batch for a run of `tokens`, from the reference run's best batch: B ∝ D^0.383 (Power Lines,
    arXiv:2505.13738), rounded to a power of two."""
    return 2 ** round(math.log2(reference_batch * (tokens / reference_tokens) ** 0.383))


def batch_scaling(batch: int, tokens: float, reference_tokens: float, floor_batch: int = 0,
                  reference_batch: int = REFERENCE_BATCH) -> tuple[float, float]:
    """(LR factor, weight-decay factor) for `batch` tokens per step over a run of `tokens`: LR ∝ sqrt(B/B_ref)
    (the AdamW rule, used for Muon too), batches below `floor_batch` getting that batch's factor, and decay
    chosen to keep B/(η·λ·D) constant (arXiv:2405.13698): above the floor, λ ∝ sqrt(B/B_ref) · D_ref/D."""
    ratio = batch / reference_batch
    lr = (max(batch, floor_batch) / reference_batch) ** 0.5
    return lr, ratio / lr * reference_tokens / tokens
