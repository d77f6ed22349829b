"""Learning-rate schedules: step -> multiplier of each param group's `initial_lr`."""
from __future__ import annotations

from typing import Callable

from nanochat.common import UserError


def warmup_warmdown(num_iterations: int, warmup_steps: int = 0, warmdown_ratio: float = 0.2,
                    final_lr_frac: float = 0.0) -> Callable[[int], float]:
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
