"""Pretrain a GPT from scratch on the base_data shards.

    python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 --total_batch_size=8192
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth=20 --run=d20
    python -m scripts.base_train --depth=20 --resume          # continue the newest complete checkpoint

Run length: --num_iterations, else --target_flops, else --target_param_data_ratio × parameters in tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from nanochat import report
from nanochat.checkpoint import checkpoint_dir, create_model, meta_model
from nanochat.common import (UserError, autodetect_device_type, broadcast_parameters, cleanup_distributed,
                             init_distributed, print0, seed_everything)
from nanochat.dataloader import PACKINGS, PretrainLoader, describe_stats, measure_shard_yield, repeat_warning
from nanochat.engine import greedy_samples
from nanochat.flags import TrainFlags, flag, parse_flags, run_main
from nanochat.model_config import ModelFlags, model_config
from nanochat.loss_eval import evaluate_bpb
from nanochat.fp8 import enable_fp8, fp8_refusal
from nanochat.optim import OptimFlags, setup_optimizers, training_schedule
from nanochat.recipes import DEFAULT_RECIPE, RECIPES
from nanochat.schedules import auto_batch_size, batch_scaling, warmup_warmdown
from nanochat.shards import DataSourceFlags, data_dir, split_shards
from nanochat.tokenizer import get_tokenizer
from nanochat.trainer import Eval, grad_accum_steps, train

@dataclass
class BaseTrainFlags(DataSourceFlags, ModelFlags, OptimFlags, TrainFlags):
    """Pretrain a GPT from scratch on the base_data shards."""
    recipe: str = flag(DEFAULT_RECIPE, "named defaults for the flags below (nanochat/recipes.py); explicit flags win",
                       tuple(RECIPES))
    total_batch_size: int = flag(524288, "tokens per optimizer step across all ranks (grad accumulation fills it); "
                                         "-1 = auto: 2^19 × (tokens / d12's tokens)^0.383, a power of two")
    # Run length (first one set wins)
    target_flops: float = flag(-1.0, "training FLOPs to spend, sets the steps when --num_iterations is -1; -1 = off")
    target_param_data_ratio: float = flag(20.0, "tokens per parameter (see --ratio_params), used when "
                                                "--num_iterations and --target_flops are -1")
    ratio_params: str = flag("total", "parameters --target_param_data_ratio counts: total | matrices (block "
                                      "matrices + lm_head, nanochat 2026's scaling-law count)", ("total", "matrices"))
    # Optimization
    batch_lr_scaling: bool = flag(False, "scale LRs by sqrt(batch / 2^19) and --matrix_weight_decay to keep "
                                         "B/(LR·decay·tokens) at d12's value")
    batch_lr_floor: int = flag(0, "with --batch_lr_scaling, a batch below this many tokens gets this batch's LR "
                                  "factor, not a smaller one (the public record's batches go down to 2^18 only); the "
                                  "decay still keeps B/(LR·decay·tokens); 0 = no floor")
    warmup_steps: int = flag(-1, "steps of linear LR warm-up; -1 = round(--warmup_ratio × steps)")
    warmup_ratio: float = flag(0.0, "fraction of steps with a linear LR warm-up (when --warmup_steps is -1)")
    warmdown_ratio: float = flag(0.2, "fraction of steps at the end with a linear LR decay")
    final_lr_frac: float = flag(0.0, "LR at the end of the warm-down, as a fraction of the peak")
    # Data
    packing: str = flag("crop", "how rows are filled: crop (best fit, the rest of a cropped document is dropped; "
                                "15 % better val bpb at d4, docs/benchmarks.md) | continue (the rest opens a later "
                                "row; drops nothing)", PACKINGS)
    # Model extras
    doc_mask: bool = flag(False, "attention stays inside each document of a packed row")
    activation_checkpointing: bool = flag(False, "recompute each block in backward: less memory, ~30% more compute")
    fp8: bool | None = flag(False, "fp8 matmuls via torchao float8 training (H100-class GPU); evals stay in bf16; "
                                   "none = on where that GPU and torchao are present")
    # Evaluation
    eval_tokens: int = flag(20 * 524288, "val tokens per bits-per-byte evaluation")
    sample_every: int = flag(2000, "steps between greedy samples; -1 = off")
    core_metric_every: int = flag(-1, "steps between CORE evaluations (needs eval_bundle/); -1 = off")
    core_metric_max_per_task: int = flag(500, "CORE items per task during training; -1 = all")
    auto_total_batch: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_every", "core_metric_every"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise UserError(f"--{name} must be >= 1 or -1 (off), got {getattr(self, name)}")
        if self.batch_lr_floor < 0:
            raise UserError(f"--batch_lr_floor must be >= 0 tokens (0 = no floor), got {self.batch_lr_floor}")
        if self.eval_tokens < 1:
            raise UserError(f"--eval_tokens must be >= 1, got {self.eval_tokens}")
        if not 0 <= self.warmup_ratio + self.warmdown_ratio <= 1:
            raise UserError(f"--warmup_ratio + --warmdown_ratio must be in [0, 1], got "
                            f"{self.warmup_ratio} + {self.warmdown_ratio}")


def ratio_param_count(flags: BaseTrainFlags, model) -> int:
    counts = model.num_params()
    return counts["total"] if flags.ratio_params == "total" else counts["blocks"] + counts["lm_head"]


def token_horizon(flags: BaseTrainFlags, model, vocab_size: int) -> tuple[float, float]:
    """Training tokens by --target_param_data_ratio for this model, and for the same architecture at depth 12 (where
    2^19 tokens per step was measured best): the horizon the auto batch size and the batch scaling work from."""
    if flags.target_param_data_ratio == -1:
        raise UserError("--total_batch_size -1 and --batch_lr_scaling need --target_param_data_ratio (the token "
                        "horizon they scale with); set it or an explicit --total_batch_size without scaling")
    d12 = meta_model(model_config(replace(flags, depth=12, model_dim=-1, num_heads=-1, num_kv_heads=-1), vocab_size))
    return (flags.target_param_data_ratio * ratio_param_count(flags, model),
            flags.target_param_data_ratio * ratio_param_count(flags, d12))


def resolved_total_batch(flags: BaseTrainFlags, model, vocab_size: int) -> int:
    """--total_batch_size, or -1 = a power of two derived from the run's token horizon."""
    if flags.total_batch_size != -1:
        return flags.total_batch_size
    return auto_batch_size(*token_horizon(flags, model, vocab_size))


def batch_plan(flags: BaseTrainFlags, model, vocab_size: int) -> tuple[int, float, float]:
    """(total batch in tokens, LR factor, Muon weight decay), the last two scaled with --batch_lr_scaling."""
    total, lr_scale, decay = resolved_total_batch(flags, model, vocab_size), 1.0, flags.matrix_weight_decay
    if flags.batch_lr_scaling:
        lr_scale, decay_scale = batch_scaling(total, *token_horizon(flags, model, vocab_size), flags.batch_lr_floor)
        decay *= decay_scale
    return total, lr_scale, decay


def resolve_num_iterations(flags: BaseTrainFlags, num_params: int, flops_per_token: float,
                           total_batch_size: int | None = None) -> tuple[int, str]:
    """Steps from the first run-length flag set; `num_params` is the count --ratio_params names."""
    total_batch_size = total_batch_size or flags.total_batch_size
    if flags.num_iterations != -1:
        steps, why = flags.num_iterations, "--num_iterations"
    elif flags.target_flops != -1:
        steps, why = round(flags.target_flops / (flops_per_token * total_batch_size)), "--target_flops"
    elif flags.target_param_data_ratio != -1:
        steps = round(flags.target_param_data_ratio * num_params / total_batch_size)
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
                            dist.world_size, directory=data_dir(flags.data_source))
    try:
        return evaluate_bpb(model, loader, steps, tokenizer.token_bytes())
    finally:
        loader.close()


def warn_if_data_repeats(tokenizer, flags: BaseTrainFlags, tokens: int, seq_len: int, is_master: bool) -> None:
    if not is_master:
        return
    directory = data_dir(flags.data_source)
    shard_yield = measure_shard_yield(tokenizer, directory, seq_len, flags.packing)
    warning = repeat_warning(tokens, shard_yield, len(split_shards("train", directory)))
    print0(warning or f"data: {directory} yields ~{shard_yield:,.0f} tokens per train shard; {tokens:,} fit once")


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
    seed_everything(flags.seed)  # the same seed on every rank: identical initial weights everywhere
    model = create_model(config, dist.device)
    broadcast_parameters(model)
    model.activation_checkpointing = flags.activation_checkpointing
    total_batch, lr_scale, matrix_decay = batch_plan(flags, model, tokenizer.vocab_size)
    accum = grad_accum_steps(total_batch, flags.device_batch_size, seq_len, dist.world_size)
    flops_per_token = model.estimate_flops(seq_len)
    counts = model.num_params()
    num_iterations, why = resolve_num_iterations(flags, ratio_param_count(flags, model), flops_per_token, total_batch)
    tag = flags.model_tag or f"d{config.depth}"
    out_dir = checkpoint_dir("base", tag)
    print0(f"model: {asdict(config)}")
    print0(f"parameters: {counts['total']:,} (embedding {counts['embedding']:,}, blocks {counts['blocks']:,}, "
           f"lm_head {counts['lm_head']:,}); {flops_per_token:.3e} FLOPs/token")
    print0(f"recipe {flags.recipe}: {num_iterations} steps ({why}) × {total_batch:,} tokens = "
           f"{num_iterations * total_batch:,} tokens; grad accumulation {accum} × {dist.world_size} "
           f"rank(s) × {flags.device_batch_size} rows × {seq_len}; LRs × {lr_scale:.4g}, Muon weight decay "
           f"{matrix_decay:.4g}; checkpoints in {out_dir}")
    if flags.fp8 or (flags.fp8 is None and fp8_refusal(dist.device) is None):
        print0(f"fp8: {enable_fp8(model, dist.device)} linear layers in float8")
    warn_if_data_repeats(tokenizer, flags, num_iterations * total_batch, seq_len, dist.is_master)

    optimizers = setup_optimizers(model, flags, lr_scale, matrix_decay, gate_lr_scale=1.0)
    batches = PretrainLoader(tokenizer, flags.device_batch_size, seq_len, "train", dist.device, dist.rank,
                             dist.world_size, doc_mask=flags.doc_mask, directory=data_dir(flags.data_source),
                             packing=flags.packing)
    warmup = flags.warmup_steps if flags.warmup_steps != -1 else round(flags.warmup_ratio * num_iterations)
    lr = warmup_warmdown(num_iterations, warmup, flags.warmdown_ratio, flags.final_lr_frac)
    schedule = training_schedule(flags, num_iterations, lr, flags.warmdown_ratio)
    start = time.time()
    result = train(model, optimizers, batches, schedule=schedule, flags=flags, checkpoint_dir=out_dir, dist=dist,
                   num_iterations=num_iterations, grad_accum_steps=accum,
                   evals=build_evals(flags, tokenizer, dist, seq_len), flops_per_token=flops_per_token,
                   meta={"source": "base", "num_iterations": num_iterations, "total_batch_size": total_batch})
    data = describe_stats(batches.stats_all_ranks())
    print0(f"data: {data}")
    batches.close()
    wall = time.time() - start
    metrics = {"CORE": result.metrics["core"]} if "core" in result.metrics else {}
    summary = {"parameters": counts["total"], "depth": config.depth, "model_dim": config.model_dim,
               "steps": result.step, "tokens": result.step * total_batch,
               "final_loss": result.losses.get(result.step), **result.metrics, "data": data,
               "checkpoint": str(result.checkpoint)}
    report.log_section("Base model training", summary, source="base", metrics=metrics, wall_time_s=wall)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
