"""Pretrain a GPT from scratch on the base_data shards.

    python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 --total_batch_size=8192
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth=20 --run=d20
    python -m scripts.base_train --depth=20 --resume          # continue the newest complete checkpoint

Run length: --num_iterations, else --target_flops, else --target_param_data_ratio × parameters in tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from nanochat import report
from nanochat.checkpoint import checkpoint_dir, create_model
from nanochat.common import (UserError, autodetect_device_type, broadcast_parameters, cleanup_distributed,
                             init_distributed, print0, seed_everything)
from nanochat.dataloader import PACKINGS, PretrainLoader, describe_stats
from nanochat.engine import greedy_samples
from nanochat.flags import TrainFlags, flag, parse_flags, run_main
from nanochat.gpt import ModelFlags, model_config
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import OptimFlags, setup_optimizers
from nanochat.schedules import Schedule, warmup_warmdown
from nanochat.tokenizer import get_tokenizer
from nanochat.trainer import Eval, grad_accum_steps, train

@dataclass
class BaseTrainFlags(ModelFlags, OptimFlags, TrainFlags):
    """Pretrain a GPT from scratch on the base_data shards."""
    # Run length (first one set wins)
    target_flops: float = flag(-1.0, "training FLOPs to spend, sets the steps when --num_iterations is -1; -1 = off")
    target_param_data_ratio: float = flag(20.0, "tokens per parameter (Chinchilla ~20), used when --num_iterations "
                                                "and --target_flops are -1")
    # Optimization
    warmup_ratio: float = flag(0.0, "fraction of steps with a linear LR warm-up")
    warmdown_ratio: float = flag(0.2, "fraction of steps at the end with a linear LR decay")
    final_lr_frac: float = flag(0.0, "LR at the end of the warm-down, as a fraction of the peak")
    # Data
    packing: str = flag("continue", "how rows are filled: continue (a long document's rest opens a later row; "
                                    "drops nothing) | crop (drops the rest; runs saved before this choice)", PACKINGS)
    # Model extras
    doc_mask: bool = flag(False, "attention stays inside each document of a packed row")
    activation_checkpointing: bool = flag(False, "recompute each block in backward: less memory, ~30% more compute")
    # Evaluation
    eval_tokens: int = flag(20 * 524288, "val tokens per bits-per-byte evaluation")
    sample_every: int = flag(2000, "steps between greedy samples; -1 = off")
    core_metric_every: int = flag(-1, "steps between CORE evaluations (needs eval_bundle/); -1 = off")
    core_metric_max_per_task: int = flag(500, "CORE items per task during training; -1 = all")

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_every", "core_metric_every"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise UserError(f"--{name} must be >= 1 or -1 (off), got {getattr(self, name)}")
        if self.eval_tokens < 1:
            raise UserError(f"--eval_tokens must be >= 1, got {self.eval_tokens}")
        if not 0 <= self.warmup_ratio + self.warmdown_ratio <= 1:
            raise UserError(f"--warmup_ratio + --warmdown_ratio must be in [0, 1], got "
                            f"{self.warmup_ratio} + {self.warmdown_ratio}")


def resolve_num_iterations(flags: BaseTrainFlags, num_params: int, flops_per_token: float) -> tuple[int, str]:
    if flags.num_iterations != -1:
        steps, why = flags.num_iterations, "--num_iterations"
    elif flags.target_flops != -1:
        steps, why = round(flags.target_flops / (flops_per_token * flags.total_batch_size)), "--target_flops"
    elif flags.target_param_data_ratio != -1:
        steps = round(flags.target_param_data_ratio * num_params / flags.total_batch_size)
        why = f"--target_param_data_ratio {flags.target_param_data_ratio:g}"
    else:
        raise UserError("set one of --num_iterations, --target_flops or --target_param_data_ratio")
    if steps < 1:
        raise UserError(f"{why} gives {steps} steps; raise it or lower --total_batch_size")
    return steps, why


def val_bpb(model, tokenizer, flags: BaseTrainFlags, dist, seq_len: int) -> float:
    """Bits per byte on the first --eval_tokens of the val split (the same tokens at every evaluation)."""
    steps = max(1, flags.eval_tokens // (flags.device_batch_size * seq_len * dist.world_size))
    loader = PretrainLoader(tokenizer, flags.device_batch_size, seq_len, "val", dist.device, dist.rank,
                            dist.world_size)
    try:
        return evaluate_bpb(model, loader, steps, tokenizer.token_bytes())
    finally:
        loader.close()


def print_samples(model, tokenizer, is_master: bool) -> None:
    if not is_master:
        return
    for sample in greedy_samples(model, tokenizer):
        print0(f"sample: {sample!r}")


def build_evals(flags: BaseTrainFlags, tokenizer, dist, seq_len: int) -> list[Eval]:
    evals = [Eval("val_bpb", flags.eval_every,
                  lambda model, step: {"val_bpb": val_bpb(model, tokenizer, flags, dist, seq_len)}),
             Eval("sample", flags.sample_every,
                  lambda model, step: print_samples(model, tokenizer, dist.is_master))]
    if flags.core_metric_every != -1:
        from nanochat.core_eval import evaluate_core, load_bundle

        tasks = load_bundle()  # now, so a missing bundle stops the run before training, not hours into it

        def core(model, step):
            result = evaluate_core(model, tokenizer, tasks, dist.device, seq_len, flags.core_metric_max_per_task,
                                   flags.device_batch_size, dist.rank, dist.world_size, progress=False)
            return {"core": result["core"]}
        evals.append(Eval("core", flags.core_metric_every, core))
    return evals


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(BaseTrainFlags, argv)
    dist = init_distributed(autodetect_device_type(flags.device_type))
    tokenizer = get_tokenizer()
    config = model_config(flags, tokenizer.vocab_size)
    seq_len = config.max_seq_len
    accum = grad_accum_steps(flags.total_batch_size, flags.device_batch_size, seq_len, dist.world_size)
    seed_everything(flags.seed)  # the same seed on every rank: identical initial weights everywhere
    model = create_model(config, dist.device)
    broadcast_parameters(model)
    model.activation_checkpointing = flags.activation_checkpointing
    flops_per_token = model.estimate_flops(seq_len)
    counts = model.num_params()
    num_iterations, why = resolve_num_iterations(flags, counts["total"], flops_per_token)
    tag = flags.model_tag or f"d{config.depth}"
    out_dir = checkpoint_dir("base", tag)
    print0(f"model: {asdict(config)}")
    print0(f"parameters: {counts['total']:,} (embedding {counts['embedding']:,}, blocks {counts['blocks']:,}, "
           f"lm_head {counts['lm_head']:,}); {flops_per_token:.3e} FLOPs/token")
    print0(f"{num_iterations} steps ({why}) × {flags.total_batch_size:,} tokens = "
           f"{num_iterations * flags.total_batch_size:,} tokens; grad accumulation {accum} × {dist.world_size} "
           f"rank(s) × {flags.device_batch_size} rows × {seq_len}; checkpoints in {out_dir}")

    optimizers = setup_optimizers(model, flags)
    batches = PretrainLoader(tokenizer, flags.device_batch_size, seq_len, "train", dist.device, dist.rank,
                             dist.world_size, doc_mask=flags.doc_mask, packing=flags.packing)
    schedule = Schedule(lr=warmup_warmdown(num_iterations, round(flags.warmup_ratio * num_iterations),
                                           flags.warmdown_ratio, flags.final_lr_frac))
    start = time.time()
    result = train(model, optimizers, batches, schedule=schedule, flags=flags, checkpoint_dir=out_dir, dist=dist,
                   num_iterations=num_iterations, grad_accum_steps=accum,
                   evals=build_evals(flags, tokenizer, dist, seq_len), flops_per_token=flops_per_token,
                   meta={"source": "base", "num_iterations": num_iterations})
    data = describe_stats(batches.stats_all_ranks())
    print0(f"data: {data}")
    batches.close()
    wall = time.time() - start
    metrics = {"CORE": result.metrics["core"]} if "core" in result.metrics else {}
    summary = {"parameters": counts["total"], "depth": config.depth, "model_dim": config.model_dim,
               "steps": result.step, "tokens": result.step * flags.total_batch_size,
               "final_loss": result.losses.get(result.step), **result.metrics, "data": data,
               "checkpoint": str(result.checkpoint)}
    report.log_section("Base model training", summary, source="base", metrics=metrics, wall_time_s=wall)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
