"""Training-step throughput: our loop (nanochat.trainer.train, Muon + AdamW) against a reference measured in
the same run.

    python -m bench.train_step                                   # demo and ittybitty shapes, short sequences
    python -m bench.train_step --shapes demo --steps 20
    python -m bench.train_step --reference ~/src/nanochat --depth 4 --max_seq_len 256 --device_batch_size 8

Without --reference the in-run reference is a plain PyTorch step on the same model and batch (forward,
backward, torch.optim.AdamW on every parameter): the ratio shows what Muon and the loop cost on top.
With --reference PATH, PATH is a checkout of the original nanochat; its `scripts/base_train.py` runs on the
same depth, sequence length and device batch (one micro-step per step) and its tok/sec lines are compared
with ours at its architecture (model_dim = 64·depth, head_dim 128, --reference_vocab). It needs its own
tokenizer and data under its base dir, as its README sets up.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.checkpoint import create_model, meta_model
from nanochat.common import DistInfo, UserError
from nanochat.flags import TrainFlags, flag, parse_flags, run_main
from nanochat.model_config import GPTConfig, ModelFlags, model_config
from nanochat.optim import setup_optimizers
from nanochat.schedules import Schedule, constant
from nanochat.trainer import train

SHAPES = {  # (depth, model_dim, head_dim, vocab, seq_len, device_batch): demo.sh and ittybitty.sh, short rows
    "demo": (4, 192, 64, 4096, 256, 8),
    "ittybitty": (4, 512, 64, 24576, 128, 4),
}
WARMUP_STEPS = 2


@dataclass
class BenchFlags:
    """Training-step tok/s and FLOP/s, with a ratio against a reference measured in the same run."""
    shapes: list[str] = flag(["demo", "ittybitty"], "which shapes to run (demo, ittybitty)")
    steps: int = flag(10, "timed steps per measurement (after 2 warm-up steps)")
    rounds: int = flag(3, "alternating rounds of (reference, ours); the median round counts")
    threads: int = flag(-1, "torch threads; -1 = torch's default")
    reference: str = flag("", "path to a checkout of the original nanochat to compare against; empty = plain step")
    reference_vocab: int = flag(65536, "vocab size of the reference checkout's tokenizer (our side uses the same)")
    depth: int = flag(4, "depth for the --reference comparison")
    max_seq_len: int = flag(256, "sequence length for the --reference comparison")
    device_batch_size: int = flag(8, "rows per step for the --reference comparison")


class RandomRows:
    """Fixed random rows, so both sides see identical work; resumable like a real loader."""

    def __init__(self, vocab: int, batch: int, seq_len: int):
        gen = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)

    def __iter__(self):
        return self

    def __next__(self):
        return self.rows[:, :-1], self.rows[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def ours_tok_per_s(config: GPTConfig, batch: int, steps: int) -> float:
    """Median tok/s of the real loop over `steps` steps (from its train_log.jsonl)."""
    torch.manual_seed(0)
    model = create_model(config, "cpu")
    flags = TrainFlags(device_type="cpu", device_batch_size=batch, total_batch_size=batch * config.max_seq_len,
                       num_iterations=WARMUP_STEPS + steps, eval_every=-1, save_every=-1, compile=False)
    with tempfile.TemporaryDirectory() as out:
        train(model, setup_optimizers(model), RandomRows(config.vocab_size, batch, config.max_seq_len),
              schedule=Schedule(lr=constant()), flags=flags, checkpoint_dir=Path(out) / "ckpt",
              dist=DistInfo(False, 0, 0, 1, torch.device("cpu")), num_iterations=WARMUP_STEPS + steps,
              grad_accum_steps=1)
        lines = [json.loads(line) for line in (Path(out) / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    dt_ms = statistics.median(e["dt_ms"] for e in lines if "dt_ms" in e and e["step"] > WARMUP_STEPS)
    return batch * config.max_seq_len / (dt_ms / 1000)


def plain_tok_per_s(config: GPTConfig, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(config, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-10)
    rows = RandomRows(config.vocab_size, batch, config.max_seq_len)
    times = []
    for step in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        inputs, targets = next(rows)
        model(inputs, targets).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return batch * config.max_seq_len / statistics.median(times)


def reference_tok_per_s(path: Path, flags: BenchFlags) -> float:
    script = path / "scripts" / "base_train.py"
    if not script.is_file():
        raise UserError(f"{script} not found; --reference must be a checkout of the original nanochat")
    tokens = flags.device_batch_size * flags.max_seq_len
    cmd = [sys.executable, "-m", "scripts.base_train", f"--depth={flags.depth}", f"--max_seq_len={flags.max_seq_len}",
           f"--device_batch_size={flags.device_batch_size}", f"--total_batch_size={tokens}",
           f"--num_iterations={WARMUP_STEPS + flags.steps}", "--run=dummy"]
    result = subprocess.run(cmd, cwd=path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(path)})
    rates = [float(m.replace(",", "")) for m in re.findall(r"tok/sec:\s*([\d,\.]+)", result.stdout + result.stderr)]
    if result.returncode != 0 or len(rates) <= WARMUP_STEPS:
        log = Path(tempfile.gettempdir()) / "bench_train_step_reference.log"
        log.write_text(result.stdout + result.stderr)
        raise UserError(f"the reference run (exit {result.returncode}) printed {len(rates)} tok/sec lines; "
                        f"its output is in {log}")
    return statistics.median(rates[WARMUP_STEPS:])


def report(name: str, config: GPTConfig, batch: int, ours: float, other: float, other_name: str) -> None:
    flops = meta_model(config).estimate_flops(config.max_seq_len)
    print(f"{name}: d{config.depth} dim {config.model_dim} T={config.max_seq_len} B={batch} vocab {config.vocab_size}"
          f" | ours {ours:,.0f} tok/s ({ours * flops / 1e9:.1f} GFLOP/s) | {other_name} {other:,.0f} tok/s"
          f" | ratio {ours / other:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(BenchFlags, argv)
    if flags.threads != -1:
        torch.set_num_threads(flags.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {flags.steps} timed steps", flush=True)
    if flags.reference:
        # the original's shape rule: width 64·depth, ceil(width / 128) heads sharing the width evenly
        dim = 64 * flags.depth
        heads = -(-dim // 128)
        config = model_config(ModelFlags(depth=flags.depth, model_dim=dim, head_dim=dim // heads,
                                         max_seq_len=flags.max_seq_len), flags.reference_vocab)
        reference = reference_tok_per_s(Path(flags.reference).expanduser(), flags)
        ours = ours_tok_per_s(config, flags.device_batch_size, flags.steps)
        report("vs reference", config, flags.device_batch_size, ours, reference, "reference nanochat")
        return
    for name in flags.shapes:
        if name not in SHAPES:
            raise UserError(f"--shapes takes {', '.join(SHAPES)}, got {name!r}")
        depth, dim, head_dim, vocab, seq_len, batch = SHAPES[name]
        config = GPTConfig(depth=depth, model_dim=dim, num_heads=dim // head_dim, num_kv_heads=dim // head_dim,
                           head_dim=head_dim, max_seq_len=seq_len, vocab_size=vocab)
        # alternate the two in rounds: the machine's load drifts, and both sides should see the same drift
        plain, ours = [], []
        for _ in range(flags.rounds):
            plain.append(plain_tok_per_s(config, batch, flags.steps))
            ours.append(ours_tok_per_s(config, batch, flags.steps))
        report(name, config, batch, statistics.median(ours), statistics.median(plain), "plain AdamW step")


if __name__ == "__main__":
    run_main(main)
