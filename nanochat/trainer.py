"""THE training loop that base, mid and sft training share (API in docs/internals.md, `## nanochat.trainer`).

A stage builds its model, optimizers, batch iterator and LR schedule and hands them to `train()`, which owns
gradient accumulation, the cross-rank loss, logging (smoothed loss, LR multiplier, ms/step, tok/s, MFU or
GFLOP/s, ETA), wandb, eval cadence, the non-finite-loss stop, checkpoints and exact resume.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as torch_dist

from nanochat.checkpoint import (Checkpoint, DamagedCheckpoint, capture_rng_state, complete_steps,
                                 first_error_on_any_rank, load_checkpoint, load_model_state, remove_partial,
                                 restore_rng_state, save_checkpoint, step_dir)
from nanochat.common import (DistInfo, UserError, atomic_write, autocast_context, device_peak_flops, init_wandb,
                             print0, resolve_dtype)
from nanochat.compiled import BucketedCompile
from nanochat.flags import TrainFlags
from nanochat.fp8 import fp8_disabled
from nanochat.recipes import recipe_mismatch
from nanochat.schedules import Schedule

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
    timed_steps: int = 0  # steps after the first of this process (it pays for compilation), for the ETA; not saved
    timed_seconds: float = 0.0


def grad_accum_steps(target: int, device_batch_size: int, seq_len: int | None, world_size: int,
                     flag_name: str = "total_batch_size") -> int:
    """Micro-steps per optimizer step so that every step sees exactly `target` tokens (rows of `seq_len`), or
    `target` conversations when `seq_len` is None. The one home of this arithmetic: every stage calls it."""
    row = seq_len or 1
    per_micro = device_batch_size * row * world_size
    if target > 0 and target % per_micro == 0:
        return target // per_micro
    nearest = max(per_micro, round(target / per_micro) * per_micro)
    fits = [b for b in range(device_batch_size, 0, -1) if target % (b * row * world_size) == 0]
    hint = f"--{flag_name} {nearest}" + (f" or --device_batch_size {fits[0]}" if fits else "")
    unit, rows = ("tokens", f" × seq_len {seq_len}") if seq_len else ("conversations", "")
    raise UserError(f"--{flag_name} {target} is not a multiple of {per_micro} {unit} per micro-step "
                    f"(device_batch_size {device_batch_size}{rows} × {world_size} ranks); try {hint}")


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


def resume_checkpoint(flags: TrainFlags, checkpoint_dir: Path, dist: DistInfo) -> Checkpoint | None:
    """The checkpoint to resume from: --resume_from_step's, or with --resume the newest step whose files every rank
    read intact (loading is the check: each file is read once and verified against meta.json)."""
    if flags.resume_from_step != -1:
        return load_checkpoint(checkpoint_dir, flags.resume_from_step, dist.device, rank=dist.rank)
    if not flags.resume:
        return None
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise UserError(f"--resume found no complete checkpoint in {checkpoint_dir}; drop --resume to start fresh "
                        "or check --model_tag")
    for step in reversed(steps):
        try:
            ckpt, damage = load_checkpoint(checkpoint_dir, step, dist.device, rank=dist.rank), None
        except DamagedCheckpoint as exc:
            ckpt, damage = None, str(exc)
        # each rank reads only its own optimizer/RNG files, so all ranks agree before any uses a step
        damage = first_error_on_any_rank(damage)
        if damage is None:
            return ckpt
        print0(f"skipping {step_dir(checkpoint_dir, step)}: {damage}")
    raise UserError(f"--resume found every checkpoint in {checkpoint_dir} damaged (steps {steps}); drop --resume "
                    "to start fresh")


@dataclass
class Run:
    """What stays fixed for a whole run: `train()`'s arguments plus what is derived from them once."""
    model: torch.nn.Module
    optimizers: list
    batches: Iterator
    schedule: Schedule
    flags: TrainFlags
    checkpoint_dir: Path
    dist: DistInfo
    num_iterations: int
    grad_accum_steps: int
    evals: list
    meta: dict
    flops_per_token: float | None
    loss_fn: Callable | None
    wandb_project: str
    dtype: torch.dtype = torch.float32
    train_model: torch.nn.Module | None = None
    log: TrainLog | None = None
    wandb_run: object = None
    peak_flops: float | None = None
    start_step: int = 0
    resumed: bool = False

    def autocast(self):
        return autocast_context(self.dist.device, self.dtype)


CPU_COMPILE_MIN_STEPS = 500


def auto_compile(device: torch.device, num_iterations: int) -> bool:
    """--compile's default: always on CUDA; on CPU for runs long enough to earn the compile back (measured at the
    race shape, d4/256, T=512: ~20 s of compiling, then 21 % less time per step) when inductor's C++ compiler is
    installed. Tiny test runs and MPS stay eager."""
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and num_iterations >= CPU_COMPILE_MIN_STEPS
            and shutil.which(os.environ.get("CXX") or "g++") is not None)


def start_run(run: Run) -> LoopState:
    """Resume (model, optimizers, RNG, loader, loop state) if asked, then compile, open wandb and the step log."""
    device = run.dist.device
    run.dtype = resolve_dtype(device.type, run.flags.dtype)
    run.model.store_embeddings_in(run.dtype)  # before restore, so a resumed table loads straight into its dtype
    run.meta = {"flags": asdict(run.flags), **run.meta}
    run.log = TrainLog(run.checkpoint_dir, run.dist.is_master)
    state = LoopState()
    resumed = resume_checkpoint(run.flags, run.checkpoint_dir, run.dist)
    if resumed is not None:
        state = restore(run, resumed)
        run.log.truncate_after(state.step)
        run.resumed = True
    run.start_step = state.step
    if run.start_step > run.num_iterations:
        raise UserError(f"the checkpoint is at step {run.start_step}, past --num_iterations {run.num_iterations}; "
                        "raise --num_iterations")
    compile_model = run.flags.compile if run.flags.compile is not None else auto_compile(device, run.num_iterations)
    run.train_model = BucketedCompile(run.model) if compile_model else run.model
    run.wandb_run = init_wandb(run.flags.run, run.wandb_project, run.meta, run.dist.is_master)
    run.peak_flops = device_peak_flops(device, run.dtype)
    run.model.train()
    return state


def restore(run: Run, ckpt: Checkpoint) -> LoopState:
    """Model, optimizers, RNG, loader and loop state from a loaded checkpoint, refusing one trained under other
    recipe-controlled flags (it would silently continue as a different run)."""
    model, optimizers, batches, checkpoint_dir, dist = run.model, run.optimizers, run.batches, run.checkpoint_dir, \
        run.dist
    if dist.is_master:
        remove_partial(checkpoint_dir)
    mismatch = recipe_mismatch(ckpt.meta.get("flags", {}), run.meta["flags"])
    if mismatch:
        raise UserError(mismatch)
    load_model_state(model, ckpt.model_state)
    if len(ckpt.optimizer_states) != len(optimizers):
        raise UserError(f"checkpoint has {len(ckpt.optimizer_states)} optimizers, this stage builds {len(optimizers)}")
    for opt, state in zip(optimizers, ckpt.optimizer_states):
        opt.load_state_dict(state)
    restore_rng_state(ckpt.rank_state["rng"])
    batches.load_state_dict(ckpt.rank_state["loader"])
    loop = ckpt.meta.get("loop", {})
    step = ckpt.meta["step"]
    print0(f"resumed from {step_dir(checkpoint_dir, step)}")
    return LoopState(step=step, tokens_seen=loop.get("tokens_seen", 0), loss_ema=loop.get("loss_ema", 0.0),
                     metrics=loop.get("metrics", {}))


def save(run: Run, state: LoopState) -> Path:
    rank_state = {"rng": capture_rng_state(), "loader": run.batches.state_dict()}
    loop = {"tokens_seen": state.tokens_seen, "loss_ema": state.loss_ema, "metrics": state.metrics}
    return save_checkpoint(run.checkpoint_dir, state.step, run.model, run.optimizers,
                           {**run.meta, **state.metrics, "loop": loop}, rank_state, keep_last=run.flags.keep_last)


@contextmanager
def eval_context(run: Run):
    """How every eval runs: eval mode, no grad, the training RNG untouched (or resume would diverge), the run's
    autocast dtype, and fp8 off (evals measure in bf16, comparable across runs)."""
    rng = capture_rng_state()
    run.model.eval()
    try:
        with torch.no_grad(), run.autocast(), fp8_disabled(run.model):
            yield
    finally:
        run.model.train()
        restore_rng_state(rng)


def run_evals(run: Run, state: LoopState, evals: list[Eval]) -> None:
    if not evals:
        return
    with eval_context(run):
        for ev in evals:
            metrics = ev.fn(run.model, state.step) or {}
            if metrics:
                state.metrics.update(metrics)
                print0(f"step {state.step} | " + " | ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
                run.log.write({"step": state.step, **metrics})
                run.wandb_run.log({"step": state.step, **metrics})


def evaluate_and_save(run: Run, state: LoopState, last: bool) -> Path | None:
    """The evals due at this step (all of them after the last), then a checkpoint when one is due."""
    saved = None
    if state.step > run.start_step or not run.resumed:
        due = [e for e in run.evals if e.every != -1 and (last or state.step % e.every == 0)]
        try:
            run_evals(run, state, due)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; MPS raises a plain one
            # An eval that runs out of memory (on a laptop, say) must not lose the steps trained since the
            # last save. Single process only: a collective save would hang if just this rank failed.
            if "out of memory" in str(exc).lower() and not run.dist.is_distributed and state.step > run.start_step:
                save(run, state)
                print0(f"the eval ran out of memory; saved step {state.step} first, continue with --resume")
            raise
    save_every = run.flags.save_every
    if state.step > run.start_step and (last or (save_every != -1 and state.step % save_every == 0)):
        saved = save(run, state)
    return saved


def set_hyperparameters(run: Run, step: int) -> float:
    """The schedules' values for this step, written into every param group; returns the LR multiplier."""
    lr_mult = run.schedule.lr(step)
    momentum, wd_mult = run.schedule.muon_momentum(step), run.schedule.weight_decay(step)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if "momentum" in group:
                group["momentum"] = momentum
            if "initial_weight_decay" in group:
                group["weight_decay"] = group["initial_weight_decay"] * wd_mult
    return lr_mult


def accumulate(run: Run, state: LoopState) -> tuple[torch.Tensor, int]:
    """Forward and backward over one step's micro-batches (each loss scaled by 1/micro-steps, so the gradients
    sum to the step's mean); returns the mean loss over micro-steps and ranks, and the step's token count."""
    loss_sum = torch.zeros((), device=run.dist.device, dtype=torch.float32)
    tokens = 0
    try:
        for _ in range(run.grad_accum_steps):
            batch = next(run.batches)
            inputs, targets, *rest = batch
            with run.autocast():
                if run.loss_fn is None:
                    loss = run.train_model(inputs, targets, doc_ids=rest[0] if rest else None)
                else:
                    loss = run.loss_fn(run.train_model, batch)
            (loss / run.grad_accum_steps).backward()
            loss_sum += loss.detach().float()
            tokens += inputs.numel()
    except torch.OutOfMemoryError:
        batch_size = run.flags.device_batch_size
        raise UserError(f"out of memory at step {state.step + 1} with --device_batch_size {batch_size}; try "
                        f"--device_batch_size {max(1, batch_size // 2)} (grad accumulation keeps "
                        "--total_batch_size) or --activation_checkpointing") from None
    loss_avg = loss_sum / run.grad_accum_steps
    if run.dist.world_size > 1:
        torch_dist.all_reduce(loss_avg)
        loss_avg /= run.dist.world_size
    return loss_avg, tokens * run.dist.world_size


def clip_gradients(run: Run) -> None:
    """Scale all gradients so their global norm is at most --grad_clip. Gradients are still per rank here (the
    optimizers average them), so under torchrun the norm is the RMS over ranks of each rank's norm: an upper
    bound of the averaged gradient's norm, so clipping is never weaker, and every rank applies the same scale."""
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    norm_sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    if run.dist.world_size > 1:
        torch_dist.all_reduce(norm_sq)
        norm_sq /= run.dist.world_size
    scale = (run.flags.grad_clip / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)


def optimizer_step(run: Run, state: LoopState, loss: float) -> None:
    """Stop on a non-finite loss before it can spoil the weights, else clip (if asked) and update."""
    if not math.isfinite(loss):
        steps = complete_steps(run.checkpoint_dir)
        good = step_dir(run.checkpoint_dir, steps[-1]) if steps else "none yet"
        raise TrainingDiverged(f"loss is {loss} at step {state.step + 1}; stopped before the update. "
                               f"Last good checkpoint: {good}; lower the learning rates and --resume")
    if run.flags.grad_clip > 0:
        clip_gradients(run)
    for opt in run.optimizers:
        opt.step()
    run.model.zero_grad(set_to_none=True)
    if run.dist.device.type == "cuda":
        torch.cuda.synchronize(run.dist.device)


def format_rate(flops_per_token, tok_per_s: float, peak: float | None, world: int) -> str:
    if flops_per_token is None:
        return ""
    achieved = flops_per_token * tok_per_s
    if peak:
        return f" | mfu {100 * achieved / (peak * world):.2f}%"
    return f" | {achieved / 1e9:.2f} GFLOP/s"


def log_step(run: Run, state: LoopState, result: TrainResult, loss: float, tokens: int, lr_mult: float,
             dt: float) -> None:
    """Advance the loop state by one finished step and report it (stdout, train_log.jsonl, wandb)."""
    state.step += 1
    state.tokens_seen += tokens
    state.loss_ema = LOSS_EMA_BETA * state.loss_ema + (1 - LOSS_EMA_BETA) * loss
    smoothed = state.loss_ema / (1 - LOSS_EMA_BETA ** state.step)
    result.losses[state.step] = loss
    if state.step > run.start_step + 1:  # the first step pays for compilation and warm-up
        state.timed_steps, state.timed_seconds = state.timed_steps + 1, state.timed_seconds + dt
    tok_per_s = tokens / dt
    eta = (run.num_iterations - state.step) * (state.timed_seconds / state.timed_steps if state.timed_steps else dt)
    print0(f"step {state.step:05d}/{run.num_iterations:05d} ({100 * state.step / run.num_iterations:.1f}%) | "
           f"loss {smoothed:.6f} | lrm {lr_mult:.3f} | {dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s"
           f"{format_rate(run.flops_per_token, tok_per_s, run.peak_flops, run.dist.world_size)} | "
           f"eta {eta / 60:.1f}m")
    run.log.write({"step": state.step, "loss": loss, "lr_mult": lr_mult, "dt_ms": dt * 1000,
                   "tokens": state.tokens_seen})
    run.wandb_run.log({"step": state.step, "train/loss": smoothed, "train/raw_loss": loss, "train/lr_mult": lr_mult,
                       "train/tok_per_s": tok_per_s, "train/tokens": state.tokens_seen})


def train(model, optimizers: list, batches: Iterator, *, schedule: Schedule, flags: TrainFlags, checkpoint_dir: Path,
          dist: DistInfo, num_iterations: int, grad_accum_steps: int, evals: list[Eval] | tuple = (),
          meta: dict | None = None, flops_per_token: float | None = None, wandb_project: str = "nanochat",
          loss_fn: Callable | None = None) -> TrainResult:
    """Train `model` from step 0 (or the resumed step) to `num_iterations`; see docs/internals.md for every argument.
    `loss_fn(model, batch) -> loss` replaces the default `model(inputs, targets, doc_ids=...)` (chat_rl's
    policy-gradient loss uses it); the batch's first element is still the (B, T) inputs."""
    run = Run(model, optimizers, batches, schedule, flags, Path(checkpoint_dir), dist, num_iterations,
              grad_accum_steps, list(evals), dict(meta or {}), flops_per_token, loss_fn, wandb_project)
    state = start_run(run)
    result = TrainResult(step=state.step)
    while True:
        last = state.step == num_iterations
        result.checkpoint = evaluate_and_save(run, state, last) or result.checkpoint
        if last:
            break
        lr_mult = set_hyperparameters(run, state.step)
        t0 = time.perf_counter()
        loss, tokens = accumulate(run, state)
        loss_value = loss.item()  # every rank holds the same value, so every rank stops together
        optimizer_step(run, state, loss_value)
        log_step(run, state, result, loss_value, tokens, lr_mult, time.perf_counter() - t0)
    run.wandb_run.finish()
    result.step, result.metrics = state.step, dict(state.metrics)
    return result
