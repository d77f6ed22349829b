"""THE training loop that base, mid and sft training share (API in docs/internals.md, `## nanochat.trainer`).

A stage builds its model, optimizers, batch iterator and LR schedule and hands them to `train()`, which owns
gradient accumulation, the cross-rank loss, logging (smoothed loss, LR multiplier, ms/step, tok/s, MFU or
GFLOP/s, ETA), wandb, eval cadence, the non-finite-loss stop, checkpoints and exact resume.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as torch_dist

from nanochat.checkpoint import (capture_rng_state, complete_steps, find_damage, load_checkpoint, load_model_state,
                                 remove_partial, restore_rng_state, save_checkpoint, step_dir)
from nanochat.common import (DistInfo, UserError, atomic_write, autocast_context, device_peak_flops, init_wandb,
                             print0, resolve_dtype)
from nanochat.flags import TrainFlags

LOSS_EMA_BETA = 0.9
LOG_FILE = "train_log.jsonl"


class TrainingDiverged(UserError):
    """The loss went non-finite; the run stops before the optimizer can spoil the weights."""


@dataclass
class Eval:
    """`fn(model, step) -> {metric: value}` runs on every rank every `every` steps (-1 = off)."""
    name: str
    every: int
    fn: Callable[[torch.nn.Module, int], dict]


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


@dataclass
class LoopState:
    """What the loop itself carries across a resume, besides model, optimizers, RNG and loader."""
    step: int = 0
    tokens_seen: int = 0
    loss_ema: float = 0.0
    metrics: dict = field(default_factory=dict)


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that every step sees exactly `total_batch_size` tokens."""
    per_micro = device_batch_size * seq_len * world_size
    if total_batch_size % per_micro == 0:
        return total_batch_size // per_micro
    lower = total_batch_size // per_micro * per_micro
    nearest_total = lower if lower and total_batch_size - lower <= lower + per_micro - total_batch_size \
        else lower + per_micro
    fits = [b for b in range(device_batch_size, 0, -1) if total_batch_size % (b * seq_len * world_size) == 0]
    hint = f"--total_batch_size {nearest_total}"
    if fits:
        hint += f" or --device_batch_size {fits[0]}"
    raise UserError(f"--total_batch_size {total_batch_size} is not a multiple of {per_micro} tokens per micro-step "
                    f"(device_batch_size {device_batch_size} × seq_len {seq_len} × {world_size} ranks); try {hint}")


class TrainLog:
    """Rank 0's per-step jsonl next to the checkpoints: raw losses for plots and for resume tests."""

    def __init__(self, directory: Path, enabled: bool):
        self.path = Path(directory) / LOG_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop entries the resumed run is about to write again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, entry: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def set_lr(optimizers: list, lr_mult: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult


def resume_step(flags: TrainFlags, checkpoint_dir: Path) -> int | None:
    if flags.resume_from_step != -1:
        return flags.resume_from_step
    if not flags.resume:
        return None
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise UserError(f"--resume found no complete checkpoint in {checkpoint_dir}; drop --resume to start fresh "
                        "or check --model_tag")
    # every rank checks every rank's files (the directory is shared), so all ranks pick the same step
    for step in reversed(steps):
        damage = find_damage(checkpoint_dir, step)
        if damage is None:
            return step
        print0(f"skipping {step_dir(checkpoint_dir, step)}: {damage}")
    raise UserError(f"--resume found every checkpoint in {checkpoint_dir} damaged (steps {steps}); drop --resume "
                    "to start fresh")


def restore(model, optimizers, batches, checkpoint_dir: Path, step: int, dist: DistInfo) -> LoopState:
    if dist.is_master:
        remove_partial(checkpoint_dir)
    ckpt = load_checkpoint(checkpoint_dir, step, dist.device, rank=dist.rank)
    load_model_state(model, ckpt.model_state)
    if len(ckpt.optimizer_states) != len(optimizers):
        raise UserError(f"checkpoint has {len(ckpt.optimizer_states)} optimizers, this stage builds {len(optimizers)}")
    for opt, state in zip(optimizers, ckpt.optimizer_states):
        opt.load_state_dict(state)
    restore_rng_state(ckpt.rank_state["rng"])
    batches.load_state_dict(ckpt.rank_state["loader"])
    loop = ckpt.meta.get("loop", {})
    print0(f"resumed from {step_dir(checkpoint_dir, step)}")
    return LoopState(step=step, tokens_seen=loop.get("tokens_seen", 0), loss_ema=loop.get("loss_ema", 0.0),
                     metrics=loop.get("metrics", {}))


def run_evals(evals, model, state: LoopState, log: TrainLog, wandb_run) -> None:
    due = [e for e in evals if e.every != -1]
    if not due:
        return
    rng = capture_rng_state()  # evals must not shift the training RNG, or resume would diverge
    model.eval()
    with torch.no_grad():
        for ev in due:
            metrics = ev.fn(model, state.step) or {}
            if metrics:
                state.metrics.update(metrics)
                print0(f"step {state.step} | " + " | ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
                log.write({"step": state.step, **metrics})
                wandb_run.log({"step": state.step, **metrics})
    model.train()
    restore_rng_state(rng)


def format_rate(flops_per_token, tok_per_s: float, peak: float | None, world: int) -> str:
    if flops_per_token is None:
        return ""
    achieved = flops_per_token * tok_per_s
    if peak:
        return f" | mfu {100 * achieved / (peak * world):.2f}%"
    return f" | {achieved / 1e9:.2f} GFLOP/s"


def accumulate_gradients(train_model, batches: Iterator, grad_accum_steps: int, autocast, loss_fn,
                         device) -> tuple[torch.Tensor, int]:
    """Forward and backward over one step's micro-batches; returns this rank's mean loss and its token count."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    tokens = 0
    for _ in range(grad_accum_steps):
        batch = next(batches)
        inputs, targets, *rest = batch
        with autocast():
            if loss_fn is None:
                loss = train_model(inputs, targets, doc_ids=rest[0] if rest else None)
            else:
                loss = loss_fn(train_model, batch)
        (loss / grad_accum_steps).backward()
        loss_sum += loss.detach().float()
        tokens += inputs.numel()
    return loss_sum / grad_accum_steps, tokens


def train(model, optimizers: list, batches: Iterator, *, lr_schedule: Callable[[int], float], flags: TrainFlags,
          checkpoint_dir: Path, dist: DistInfo, num_iterations: int, grad_accum_steps: int,
          evals: list[Eval] | tuple = (), meta: dict | None = None, flops_per_token: float | None = None,
          wandb_project: str = "nanochat", loss_fn: Callable | None = None) -> TrainResult:
    """Train `model` from step 0 (or the resumed step) to `num_iterations`; see docs/internals.md for every argument.
    `loss_fn(model, batch) -> loss` replaces the default `model(inputs, targets, doc_ids=...)` (chat_rl's
    policy-gradient loss uses it); the batch's first element is still the (B, T) inputs."""
    checkpoint_dir = Path(checkpoint_dir)
    device = dist.device
    dtype = resolve_dtype(device.type, flags.dtype)

    def autocast():
        return autocast_context(device, dtype)

    meta = {"flags": asdict(flags), **(meta or {})}
    log = TrainLog(checkpoint_dir, dist.is_master)

    state = LoopState()
    start = resume_step(flags, checkpoint_dir)
    if start is not None:
        state = restore(model, optimizers, batches, checkpoint_dir, start, dist)
        log.truncate_after(start)
    start_step = state.step
    if start_step > num_iterations:
        raise UserError(f"the checkpoint is at step {start_step}, past --num_iterations {num_iterations}; "
                        "raise --num_iterations")

    compile_model = flags.compile if flags.compile is not None else device.type == "cuda"
    # dynamic=None: a second row length (SFT, RL) compiles once for any length instead of once per length,
    # which with dynamic=False would hit the recompile limit and silently fall back to eager
    train_model = torch.compile(model, dynamic=None) if compile_model else model
    wandb_run = init_wandb(flags.run, wandb_project, meta, dist.is_master)
    peak = device_peak_flops(device, dtype)
    result = TrainResult(step=start_step)
    model.train()
    timed_steps, timed_seconds = 0, 0.0

    def save() -> None:
        rank_state = {"rng": capture_rng_state(), "loader": batches.state_dict()}
        loop = {"tokens_seen": state.tokens_seen, "loss_ema": state.loss_ema, "metrics": state.metrics}
        result.checkpoint = save_checkpoint(checkpoint_dir, state.step, model, optimizers,
                                            {**meta, **state.metrics, "loop": loop}, rank_state,
                                            keep_last=flags.keep_last)

    while True:
        last = state.step == num_iterations
        if state.step > start_step or start is None:
            try:
                with autocast():
                    run_evals([e for e in evals if last or (e.every != -1 and state.step % e.every == 0)],
                              model, state, log, wandb_run)
            except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; MPS raises a plain one
                # An eval that runs out of memory (on a laptop, say) must not lose the steps trained since the
                # last save. Single process only: a collective save would hang if just this rank failed.
                if "out of memory" in str(exc).lower() and not dist.is_distributed and state.step > start_step:
                    save()
                    print0(f"the eval ran out of memory; saved step {state.step} first, continue with --resume")
                raise
        if state.step > start_step and (last or (flags.save_every != -1 and state.step % flags.save_every == 0)):
            save()
        if last:
            break

        lr_mult = lr_schedule(state.step)
        set_lr(optimizers, lr_mult)
        t0 = time.perf_counter()
        try:
            loss_avg, step_tokens = accumulate_gradients(train_model, batches, grad_accum_steps, autocast, loss_fn,
                                                         device)
        except torch.OutOfMemoryError:
            smaller = max(1, flags.device_batch_size // 2)
            raise UserError(f"out of memory at step {state.step + 1} with --device_batch_size "
                            f"{flags.device_batch_size}; try --device_batch_size {smaller} (grad accumulation keeps "
                            "--total_batch_size) or --activation_checkpointing") from None
        if dist.world_size > 1:
            torch_dist.all_reduce(loss_avg)
            loss_avg /= dist.world_size
        loss_value = loss_avg.item()  # every rank holds the same value, so every rank stops together
        if not math.isfinite(loss_value):
            steps = complete_steps(checkpoint_dir)
            good = step_dir(checkpoint_dir, steps[-1]) if steps else "none yet"
            raise TrainingDiverged(f"loss is {loss_value} at step {state.step + 1}; stopped before the update. "
                                   f"Last good checkpoint: {good}; lower the learning rates and --resume")
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0

        state.step += 1
        step_tokens *= dist.world_size
        state.tokens_seen += step_tokens
        state.loss_ema = LOSS_EMA_BETA * state.loss_ema + (1 - LOSS_EMA_BETA) * loss_value
        smoothed = state.loss_ema / (1 - LOSS_EMA_BETA ** state.step)
        result.losses[state.step] = loss_value
        if state.step > start_step + 1:  # the first step pays for compilation and warm-up
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
        tok_per_s = step_tokens / dt
        eta = (num_iterations - state.step) * (timed_seconds / timed_steps if timed_steps else dt)
        print0(f"step {state.step:05d}/{num_iterations:05d} ({100 * state.step / num_iterations:.1f}%) | "
               f"loss {smoothed:.6f} | lrm {lr_mult:.3f} | {dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s"
               f"{format_rate(flops_per_token, tok_per_s, peak, dist.world_size)} | eta {eta / 60:.1f}m")
        log.write({"step": state.step, "loss": loss_value, "lr_mult": lr_mult, "dt_ms": dt * 1000,
                   "tokens": state.tokens_seen})
        wandb_run.log({"step": state.step, "train/loss": smoothed, "train/raw_loss": loss_value,
                       "train/lr_mult": lr_mult, "train/tok_per_s": tok_per_s, "train/tokens": state.tokens_seen})

    wandb_run.finish()
    result.step, result.metrics = state.step, dict(state.metrics)
    return result
