"""The race: our base_train under each recipe against reference checkouts of karpathy/nanochat, side by side on
this machine, judged by one evaluator.

    python -m bench.race --steps 200 --reference ../refs/nanochat-48abd7d --reference ../refs/nanochat-92d63d4 \\
        --reference_python ../refs/venv/bin/python

Every system gets its own base dir under --out holding the same shards (--data; the last shard is val), trains its
own tokenizer there at --vocab_size, then pretrains the same shape (depth 4, width 256, heads of 128, T=512,
4096 tokens per step: 8 rows, no accumulation) for --steps steps with its own default recipe, evaluating its own
val bpb once at the end. Then `bench/race_eval.py`, run under each system's Python, scores every final checkpoint
on the same texts: the first 1500 characters of the first 300 val documents ("starts") and characters
3000-4500 of the first 300 val documents that long ("middles"). Prints tok/s (median step after 3 warm-up
steps), own val bpb and the common bpb per system, with ratios against the last --reference, and the load average
before and after. Each system's own val bpb uses its own val rows and is not comparable; the common one is.

`--ablate value_embeds smear ...` (or `all`) also races the frontier recipe with one switch at a time turned back to
its 2025 value (ABLATIONS), before the recipes: the ablation table of what each switch buys. `--seeds 1 2` races
each recipe and ablation under each of those seeds instead of the trainer's default one: the run-to-run spread a
difference must exceed. `--reference_seeds 1 2` does the same for the references, whose seed is written into their
code: bench/reseed.py adds each offset to every torch seed they set (0 = as written). Step-level agreement with a
reference (same weights, batches and LRs) is bench/fidelity.py's job.

A reference is karpathy/nanochat at any commit: its flag spelling (configurator `--x=1` before Feb 2026, argparse
`--x-y` after) and data directory (`base_data`, later `base_data_climbmix`) are read from the checkout. Its
dependencies go in a separate venv (--reference_python), e.g. `python -m venv ../refs/venv`, a .pth file pointing
at this venv's site-packages, then `../refs/venv/bin/pip install rustbpe psutil`.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import UserError
from nanochat.flags import flag, parse_flags, run_main

REPO = Path(__file__).resolve().parent.parent
SHARED_PRETRAIN = REPO.parent / "shared" / "data" / "pretrain"  # ../shared/data/pretrain beside the checkout
EVALUATOR = REPO / "bench" / "race_eval.py"
RESEED = REPO / "bench" / "reseed.py"
SHAPE = dict(depth=4, model_dim=256, head_dim=128, max_seq_len=512, device_batch_size=8)
TOKENS_PER_STEP = 4096
WARMUP_STEPS = 3
START_CHARS, MIDDLE = 1500, (3000, 4500)
# each frontier switch turned back to its 2025 value, for --ablate
ABLATIONS = {
    "value_embeds": ["--value_embeds=false"],
    "windows": ["--window_pattern=L"],
    "residual_scalars": ["--residual_scalars=false"],
    "smear": ["--smear=false"],
    "backout": ["--backout=false"],
    "qk_scale": ["--qk_scale=1.0"],
    "init": ["--init_scheme=2025"],
    "polar_express": ["--muon_orthogonalizer=newton_schulz"],
    "normuon": ["--muon_beta2=0"],
    "weight_decay": ["--matrix_weight_decay=0"],
    "schedule": ["--warmup_steps=-1", "--warmdown_ratio=0.2", "--final_lr_frac=0"],
    "lr_floor": ["--batch_lr_floor=0"],  # the public record's LR rule unfloored: its hyperparameters exactly
}


@dataclass
class RaceFlags:
    """Ours (each recipe) against karpathy/nanochat checkouts: tok/s, own val bpb and one common bpb."""
    steps: int = flag(200, "optimizer steps for every system")
    reference: list[str] = flag([], "path to a karpathy/nanochat checkout; repeat for several (the last is the "
                                    "baseline of the ratios)")
    reference_python: str = flag("", "python of the references' venv; empty = this python")
    recipes: list[str] = flag(["2025", "frontier"], "our recipes to race")
    ablate: list[str] = flag([], "frontier switches to turn off one at a time (ABLATIONS keys; all = every one)")
    seeds: list[int] = flag([], "--seed values to race each of our recipes and ablations under (the run-to-run "
                                "spread any difference must exceed); empty = base_train's default")
    reference_seeds: list[int] = flag([], "offsets added to each reference's torch seeds, one run each; empty = its "
                                          "seeds as written")
    vocab_size: int = flag(8192, "every system's tokenizer vocabulary")
    texts_per_set: int = flag(300, "val documents per common-bpb set (starts, middles); fewer only to try the "
                                   "harness out")
    eval_tokens: int = flag(65536, "tokens of each system's own val bpb evaluation at the end")
    data: str = flag(str(SHARED_PRETRAIN), "directory of parquet shards (text column); the last is val")
    out: str = flag("race_out", "working directory (one base dir per system); reused tokenizers are kept")


@dataclass
class System:
    name: str
    kind: str  # ours | nanochat
    python: str
    cwd: Path
    base_dir: Path
    tag: str
    train_args: list[str]
    tokenizer_args: list[str]
    data_subdir: str
    train_command: list[str] = field(default_factory=lambda: ["-m", "scripts.base_train"])
    env: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def race_texts(data: Path, count: int) -> dict[str, list[str]]:
    shards = sorted(data.glob("*.parquet"))
    if len(shards) < 2:
        raise UserError(f"--data {data} needs at least two parquet shards (the last is val)")
    docs = pq.read_table(shards[-1], columns=["text"]).column("text").to_pylist()
    long_docs = [d for d in docs if len(d) >= MIDDLE[1]]
    if len(docs) < count or len(long_docs) < count:
        raise UserError(f"the val shard {shards[-1]} has {len(docs)} documents, {len(long_docs)} of "
                        f">= {MIDDLE[1]} characters; the race needs {count} of each")
    return {"starts": [d[:START_CHARS] for d in docs[:count]],
            "middles": [d[MIDDLE[0]:MIDDLE[1]] for d in long_docs[:count]]}


def ours(recipe: str, flags: RaceFlags, out: Path, ablation: str = "", seed: int | None = None) -> System:
    suffix = (f"_no_{ablation}" if ablation else "") + (f"_seed{seed}" if seed is not None else "")
    tag = f"race_{recipe}{suffix}"
    args = [f"--recipe={recipe}", *(f"--{k}={v}" for k, v in SHAPE.items()), f"--total_batch_size={TOKENS_PER_STEP}",
            f"--num_iterations={flags.steps}", f"--eval_every={flags.steps}", f"--eval_tokens={flags.eval_tokens}",
            "--sample_every=-1", "--core_metric_every=-1", f"--model_tag={tag}", "--device_type=cpu",
            *ABLATIONS.get(ablation, []), *([f"--seed={seed}"] if seed is not None else [])]
    name = f"ours {recipe}" + (f" -{ablation}" if ablation else "") + (f" seed {seed}" if seed is not None else "")
    return System(name, "ours", sys.executable, REPO, out / "ours", tag, args, [f"--vocab_size={flags.vocab_size}"],
                  "base_data", env={"PYTHONPATH": str(REPO)})


def ablations(names: list[str]) -> list[str]:
    names = list(ABLATIONS) if names == ["all"] else names
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:
        raise UserError(f"--ablate {','.join(unknown)}: unknown; choose from {', '.join(ABLATIONS)} or all")
    return names


def reference(path: Path, flags: RaceFlags, out: Path, seed_offset: int | None = None) -> System:
    """The checkout as written, or (a non-zero `seed_offset`) with every torch seed it sets moved by the offset."""
    script = path / "scripts" / "base_train.py"
    if not script.is_file():
        raise UserError(f"{script} not found; --reference must be a checkout of karpathy/nanochat")
    dashed = "--device-batch-size" in script.read_text()
    settings = dict(depth=4, max_seq_len=512, device_batch_size=8, total_batch_size=TOKENS_PER_STEP,
                    num_iterations=flags.steps, eval_every=flags.steps, eval_tokens=flags.eval_tokens,
                    core_metric_every=-1, sample_every=-1,
                    model_tag=f"race_seed{seed_offset}" if seed_offset else "race")
    if dashed:  # argparse era: the shape flags exist (older checkouts derive width 64·depth and heads of 128)
        settings.update(aspect_ratio=64, head_dim=128)
    spell = (lambda k: k.replace("_", "-")) if dashed else (lambda k: k)
    dataset = (path / "nanochat" / "dataset.py").read_text()
    data_subdir = "base_data_climbmix" if "base_data_climbmix" in dataset else "base_data"
    commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or path.name
    python = flags.reference_python or sys.executable
    name, command = f"nanochat {commit}", ["-m", "scripts.base_train"]
    if seed_offset:
        name, command = f"{name} seed+{seed_offset}", [str(RESEED), str(seed_offset), "scripts.base_train"]
    return System(name, "nanochat", python, path, out / f"nanochat_{commit}", settings["model_tag"],
                  [f"--{spell(k)}={v}" for k, v in settings.items()], [f"--{spell('vocab_size')}={flags.vocab_size}"],
                  data_subdir, train_command=command, env={"PYTHONPATH": str(path)})


def run(system: System, module_or_script: list[str], log_name: str) -> str:
    env = {**os.environ, **system.env, "NANOCHAT_BASE_DIR": str(system.base_dir), "WANDB_MODE": "disabled"}
    result = subprocess.run([system.python, *module_or_script], cwd=system.cwd, env=env, capture_output=True,
                            text=True)
    log = system.base_dir / log_name
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise UserError(f"{system.name}: {' '.join(module_or_script[:2])} failed (exit {result.returncode}); "
                        f"its output is in {log}")
    return result.stdout + result.stderr


def prepare(system: System, data: Path) -> None:
    """Shards linked into the system's data dir, and its own tokenizer (trained once, kept between races)."""
    shard_dir = system.base_dir / system.data_subdir
    shard_dir.mkdir(parents=True, exist_ok=True)
    for shard in sorted(data.glob("*.parquet")):
        link = shard_dir / shard.name
        if not link.exists():
            link.symlink_to(shard.resolve())
    if not (system.base_dir / "tokenizer").is_dir():
        run(system, ["-m", "scripts.tok_train", *system.tokenizer_args], "tok_train.log")


def train(system: System) -> None:
    started = time.time()
    output = run(system, [*system.train_command, *system.train_args], f"base_train_{system.tag}.log")
    system.result["train_s"] = time.time() - started
    if system.kind == "ours":
        log = system.base_dir / "base_checkpoints" / system.tag / "train_log.jsonl"
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        dts = [e["dt_ms"] for e in entries if "dt_ms" in e and e["step"] > WARMUP_STEPS]
        system.result["tok_per_s"] = TOKENS_PER_STEP / (statistics.median(dts) / 1000)
        system.result["own_bpb"] = [e["val_bpb"] for e in entries if "val_bpb" in e][-1]
    else:
        rates = [float(r.replace(",", "")) for r in re.findall(r"tok/sec: ([\d,\.]+)", output)]
        system.result["tok_per_s"] = statistics.median(rates[WARMUP_STEPS:])
        system.result["own_bpb"] = float(re.findall(r"Validation bpb: ([\d\.]+)", output)[-1])


def evaluate(system: System, texts_path: Path) -> None:
    output = run(system, [str(EVALUATOR), "--system", system.kind, "--texts", str(texts_path), "--tag", system.tag],
                 f"race_eval_{system.tag}.log")
    system.result.update(json.loads(output.strip().splitlines()[-1]))


def report(systems: list[System], flags: RaceFlags, loads: tuple[str, str]) -> str:
    base = systems[-1].result
    lines = [f"race: {flags.steps} steps × {TOKENS_PER_STEP} tokens, d4/256/128, T=512, vocab {flags.vocab_size}; "
             f"common bpb on {flags.texts_per_set} document starts / {flags.texts_per_set} middles; ratios against "
             f"{systems[-1].name}; load average before {loads[0]}, after {loads[1]}",
             f"{'system':<32} {'tok/s':>8} {'×':>6} {'own bpb':>8} {'starts':>8} {'×':>6} {'middles':>8} {'×':>6} "
             f"{'train':>7}"]
    for s in systems:
        r = s.result
        lines.append(f"{s.name:<32} {r['tok_per_s']:>8.0f} {r['tok_per_s'] / base['tok_per_s']:>6.3f} "
                     f"{r['own_bpb']:>8.4f} {r['starts']:>8.4f} {r['starts'] / base['starts']:>6.3f} "
                     f"{r['middles']:>8.4f} {r['middles'] / base['middles']:>6.3f} {r['train_s'] / 60:>6.1f}m")
    return "\n".join(lines)


def lineup(flags: RaceFlags, out: Path) -> list[System]:
    """Every system in racing order; the last (the last reference's last seed) is the baseline of the ratios."""
    seeds, offsets = flags.seeds or [None], flags.reference_seeds or [None]
    systems = [ours("frontier", flags, out, ablation, seed) for ablation in ablations(flags.ablate) for seed in seeds]
    systems += [ours(recipe, flags, out, seed=seed) for recipe in flags.recipes for seed in seeds]
    return systems + [reference(Path(path).resolve(), flags, out, offset) for path in flags.reference
                      for offset in offsets]


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(RaceFlags, argv)
    if flags.steps <= WARMUP_STEPS:
        raise UserError(f"--steps must be > {WARMUP_STEPS} (the warm-up steps tok/s skips), got {flags.steps}")
    out, data = Path(flags.out).resolve(), Path(flags.data)
    out.mkdir(parents=True, exist_ok=True)
    texts_path = out / "texts.json"
    texts_path.write_text(json.dumps(race_texts(data, flags.texts_per_set)))
    systems = lineup(flags, out)
    before = load_average()
    for system in systems:
        prepare(system, data)
        print(f"{system.name}: training {flags.steps} steps in {system.base_dir}", flush=True)
        train(system)
        evaluate(system, texts_path)
        print(f"{system.name}: {json.dumps(system.result)}", flush=True)
    table = report(systems, flags, (before, load_average()))
    (out / "race.txt").write_text(f"python -m bench.race {' '.join(argv if argv is not None else sys.argv[1:])}\n"
                                  f"{table}\n")
    print(table)


if __name__ == "__main__":
    run_main(main)
