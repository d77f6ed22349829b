"""Fidelity of the frontier recipe's mechanics against karpathy/nanochat: the same initial weights, the same batches
and the same LRs through our model and optimizer and through the reference's, step for step.

    python -m bench.fidelity --reference ../refs/nanochat-92d63d4 --reference_python ../refs/venv/bin/python

At the race's shape (d4, width 256, heads of 128, T=512, 8 rows, vocab 8192) it builds our model under
`--recipe frontier` (output projections given weights, see `give_output_projections_weights`) with base_train's
own flags and batch plan (LRs and Muon weight decay scaled for the race's
4096-token batch), writes the initial weights and --steps batches of random tokens, runs --steps updates here, and
runs `bench/fidelity_ref.py` under the reference's Python on the same files. Momentum and weight decay are held at
one value and the LR multiplier at 1, so the schedules (compared by reading) are out of the picture. It prints
the largest logit difference at the start and, per parameter, how far our update is from the reference's
(|Δours - Δref| / |Δref|). float32 round-off through Polar Express grows to ~1e-3 in a few steps; a wrong
hyperparameter or a missing term shows as a difference of order 1.

The reference must hold the frontier model (value embeddings, smear, backout: nanochat from Feb 2026 on).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.race import REPO, SHAPE, TOKENS_PER_STEP, RaceFlags
from nanochat.checkpoint import create_model
from nanochat.common import UserError
from nanochat.flags import flag, parse_flags, run_main
from nanochat.model_config import model_config
from nanochat.optim import setup_optimizers
from scripts.base_train import BaseTrainFlags, batch_plan

VOCAB_SIZE = RaceFlags.vocab_size
# the race's shape and batch; 1000 steps only sets the token horizon the Muon weight decay is scaled by
SHAPE_ARGS = ["--recipe=frontier", "--batch_lr_floor=0", *(f"--{k}={v}" for k, v in SHAPE.items()),
              f"--total_batch_size={TOKENS_PER_STEP}", "--num_iterations=1000"]
MOMENTUM = 0.95


@dataclass
class FidelityFlags:
    """Our frontier step against karpathy/nanochat's on the same weights, batches and LRs."""
    reference: str = flag("", "path to a karpathy/nanochat checkout with the frontier model")
    reference_python: str = flag("", "python of the reference's venv; empty = this python")
    steps: int = flag(3, "optimizer steps on each side")
    seed: int = flag(0, "seed of the initial weights and the random batches")

    def __post_init__(self):
        if not self.reference:
            raise UserError("--reference PATH is required (a karpathy/nanochat checkout)")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")


@torch.no_grad()
def give_output_projections_weights(model) -> None:
    """Uniform weights (std 1/sqrt(fan_in)) for the zero-initialised output projections: with every block an
    identity, the residual scalars' gradients are float round-off (~1e-10, AdamW's eps), which the two
    implementations round differently; with real gradients everywhere the comparison measures the mechanics."""
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            bound = 3 ** 0.5 * param.size(1) ** -0.5
            param.uniform_(-bound, bound)


def reference_settings(flags: BaseTrainFlags, lr_scale: float, weight_decay: float, config) -> dict:
    """The reference's GPTConfig and setup_optimizer arguments for our flags: its LRs arrive batch-scaled, as its
    base_train passes them."""
    return {
        "reference_config": dict(sequence_len=config.max_seq_len, vocab_size=config.vocab_size,
                                 n_layer=config.depth, n_head=config.num_heads, n_kv_head=config.num_kv_heads,
                                 n_embd=config.model_dim, window_pattern=config.window_pattern),
        "reference_lrs": dict(unembedding_lr=flags.unembedding_lr * lr_scale,
                              embedding_lr=flags.embedding_lr * lr_scale, matrix_lr=flags.matrix_lr * lr_scale,
                              scalar_lr=flags.scalar_lr * lr_scale, weight_decay=weight_decay),
        "momentum": MOMENTUM, "weight_decay": weight_decay,
    }


def our_run(model, flags: BaseTrainFlags, lr_scale: float, weight_decay: float,
            batches: torch.Tensor) -> torch.Tensor:
    """Our logits on the first batch, then --steps updates (base_train's optimizer set-up, schedules held)."""
    optimizers = setup_optimizers(model, flags, lr_scale, weight_decay, gate_lr_scale=1.0)
    for group in optimizers[1].param_groups:
        group["momentum"] = MOMENTUM
    model.eval()
    with torch.no_grad():
        logits = model(batches[0, :, :-1]).float()
    model.train()
    for batch in batches:
        model(batch[:, :-1], batch[:, 1:]).backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return logits


def update_differences(initial: dict, ours: dict, reference: dict) -> list[tuple[str, float, float]]:
    """(name, |Δref|, |Δours - Δref| / |Δref|) per parameter."""
    rows = []
    for name, start in initial.items():
        ours_step, reference_step = ours[name].float() - start.float(), reference[name].float() - start.float()
        size = reference_step.norm().item()
        rows.append((name, size, (ours_step - reference_step).norm().item() / max(size, 1e-12)))
    return rows


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(FidelityFlags, argv)
    reference = Path(flags.reference).resolve()
    if not (reference / "nanochat" / "gpt.py").is_file():
        raise UserError(f"{reference} is not a karpathy/nanochat checkout (no nanochat/gpt.py)")
    train_flags = parse_flags(BaseTrainFlags, [*SHAPE_ARGS, f"--seed={flags.seed}"])
    config = model_config(train_flags, VOCAB_SIZE)
    torch.manual_seed(flags.seed)
    model = create_model(config, "cpu")
    give_output_projections_weights(model)
    _, lr_scale, weight_decay = batch_plan(train_flags, model, VOCAB_SIZE)
    generator = torch.Generator().manual_seed(flags.seed)
    batches = torch.randint(0, VOCAB_SIZE, (flags.steps, train_flags.device_batch_size, config.max_seq_len + 1),
                            generator=generator)
    initial = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        save_file(initial, directory / "init.safetensors")
        save_file({"batches": batches}, directory / "batches.safetensors")
        settings = reference_settings(train_flags, lr_scale, weight_decay, config)
        (directory / "settings.json").write_text(json.dumps(settings))
        result = subprocess.run([flags.reference_python or sys.executable, str(REPO / "bench" / "fidelity_ref.py"),
                                 "--dir", str(directory)], cwd=reference, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(reference)})
        if result.returncode != 0:
            raise UserError(f"the reference's half failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        reference_logits = load_file(directory / "reference_logits.safetensors")["logits"]
        reference_final = load_file(directory / "reference_final.safetensors")
    logits = our_run(model, train_flags, lr_scale, weight_decay, batches)
    ours_final = {name: p.detach().float() for name, p in model.named_parameters()}
    print(f"fidelity: frontier at d4/256/128, T=512, vocab {VOCAB_SIZE}, LRs × {lr_scale:.4g}, Muon weight decay "
          f"{weight_decay:.4g}, momentum {MOMENTUM}; reference {reference.name}")
    print(f"logits at the start: max |ours - reference| = {(logits - reference_logits).abs().max().item():.2e}")
    print(f"after {flags.steps} steps, per parameter:")
    print(f"{'parameter':<36} {'|Δref|':>10} {'rel. diff':>10}")
    rows = update_differences(initial, ours_final, reference_final)
    for name, size, difference in rows:
        print(f"{name:<36} {size:>10.3e} {difference:>10.2e}")
    worst = max(rows, key=lambda row: row[2])
    print(f"largest relative difference: {worst[2]:.2e} ({worst[0]})")


if __name__ == "__main__":
    run_main(main)
