"""Architecture and memory calculator: what a model flag set costs before you train it.

    python -m scripts.model_info --depth=4 --model_dim=512 --head_dim=64 --vocab_size=24576
    python -m scripts.model_info --depth=20 --device_batch_size=32 --vram_gb=24        # what fits a 24 GB card
    python -m scripts.model_info --depth=20 --check_free_vram                          # exit 2 if it will not fit
    python -m scripts.model_info --recipe=frontier --depth=24 --target_param_data_ratio=8 --world_size=8 --gpu=H100

Prints the parameter split, FLOPs per token, the run's tokens and steps as base_train resolves them, its expected
training time on the GPUs named (at an assumed MFU), and the estimated peak memory per device (weights, grads,
optimizer state, activations) with and without activation checkpointing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanochat.checkpoint import meta_model
from nanochat.common import UserError, autodetect_device_type, get_base_dir, peak_flops
from nanochat.flags import flag, parse_flags, run_main
from nanochat.model_config import ModelFlags, model_config
from nanochat.recipes import DEFAULT_RECIPE, RECIPES
from nanochat.sizing import ALLOCATOR_MARGIN, CUDA_CONTEXT, estimate_memory, largest_batch, measure_peak_memory
from scripts.base_train import ratio_param_count, resolve_num_iterations, resolved_total_batch

DEFAULT_VOCAB = 65536
GIB = 2**30
# nanochat's time-to-GPT-2 record (dev/LEADERBOARD.md run 6, Mar 2026): d24, ratio 8, fp8, 1.65 h of training on
# 8×H100 = 0.59 of the bf16 peak, counted with our FLOPs per token at its vocab (32768)
RECORD_MFU = 0.59


@dataclass
class ModelInfoFlags(ModelFlags):
    """Parameters, FLOPs and peak training memory for a model flag set."""
    recipe: str = flag(DEFAULT_RECIPE, "base_train's named defaults (architecture and run length)", tuple(RECIPES))
    vocab_size: int = flag(-1, "vocabulary size; -1 = the saved tokenizer's, else 65536")
    device_batch_size: int = flag(32, "rows per device per micro-step")
    total_batch_size: int = flag(524288, "tokens per optimizer step; -1 = auto, as base_train derives it")
    num_iterations: int = flag(-1, "optimizer steps; -1 = from --target_flops, else --target_param_data_ratio")
    target_flops: float = flag(-1.0, "training FLOPs, sets the steps when --num_iterations is -1; -1 = off")
    target_param_data_ratio: float = flag(20.0, "training tokens per parameter (see --ratio_params)")
    ratio_params: str = flag("total", "parameters the ratio counts: total | matrices", ("total", "matrices"))
    world_size: int = flag(1, "GPUs (ranks) in the run: they split the optimizer state and the time")
    gpu: str = flag("auto", "GPU to time the run on, as torch names it (H100, A100, 'RTX 4090', ...); auto = this "
                            "machine's CUDA GPU, none without one")
    mfu: float = flag(RECORD_MFU, "model FLOPs utilisation the time estimate assumes; the default is what the "
                                  "public time-to-GPT-2 record (d24, fp8, 8×H100) achieved")
    dtype: str = flag("bfloat16", "compute dtype: bfloat16 (autocast, GPUs with native bf16) or float32 (older GPUs, "
                                   "with GQA's k/v counted expanded; CPU)",
                      choices=("bfloat16", "float32"))
    activation_checkpointing: bool = flag(False, "the setting --vram_gb and --check_free_vram judge")
    vram_gb: float = flag(-1.0, "memory per device in GiB: print the largest device batch that fits; -1 = off")
    check_free_vram: bool = flag(False, "exit 2 with what to lower when the estimate exceeds this GPU's free memory")
    measure: bool = flag(False, "also run two real training steps and print the measured peak")

    def __post_init__(self):
        for name in ("device_batch_size", "world_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.total_batch_size == 0 or self.total_batch_size < -1:
            raise UserError(f"--total_batch_size must be >= 1 or -1 (auto), got {self.total_batch_size}")
        if not 0 < self.mfu <= 1:
            raise UserError(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.vocab_size == 0 or self.vocab_size < -1:
            raise UserError(f"--vocab_size must be >= 1 or -1 (the tokenizer's), got {self.vocab_size}")
        if self.vram_gb == 0 or self.vram_gb < -1:
            raise UserError(f"--vram_gb must be > 0 or -1 (off), got {self.vram_gb}")


def resolve_vocab(flags: ModelInfoFlags) -> tuple[int, str]:
    if flags.vocab_size != -1:
        return flags.vocab_size, "--vocab_size"
    try:
        from nanochat.tokenizer import get_tokenizer

        return get_tokenizer().vocab_size, f"tokenizer in {get_base_dir() / 'tokenizer'}"
    except UserError:
        return DEFAULT_VOCAB, "default, no tokenizer found"


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(ModelInfoFlags, argv)
    vocab, vocab_from = resolve_vocab(flags)
    config = model_config(flags, vocab)
    model = meta_model(config)
    counts = model.num_params()
    flops = model.estimate_flops(config.max_seq_len)
    print(f"model: depth {config.depth}, model_dim {config.model_dim}, {config.num_heads} heads "
          f"({config.num_kv_heads} kv) × head_dim {config.head_dim}, max_seq_len {config.max_seq_len}, "
          f"vocab {config.vocab_size} ({vocab_from}; padded {config.padded_vocab_size})")
    parts = [part for part in ("embedding", "value_embeds", "blocks", "scalars", "lm_head")
             if counts[part] or part not in ("value_embeds", "scalars")]  # the switches' parts only when present
    print(f"parameters: {counts['total']:,} = " + " + ".join(f"{part} {counts[part]:,}" for part in parts))
    print(f"FLOPs per token (fwd+bwd): {flops:.4e}")
    print_run_plan(flags, model, vocab, flops)
    autocast = flags.dtype == "bfloat16"
    # a float32 run with GQA on CUDA expands k/v to every head (nanochat.attention); count it
    settings = dict(autocast=autocast, world_size=flags.world_size, expanded_kv=not autocast)
    print(f"peak memory per device at --device_batch_size {flags.device_batch_size} ({flags.dtype} compute, "
          f"{flags.world_size} rank(s)):")
    for checkpointing in (False, True):
        est = estimate_memory(config, flags.device_batch_size, activation_checkpointing=checkpointing, **settings)
        label = "with activation checkpointing" if checkpointing else "without activation checkpointing"
        print(f"  {label}: {gib(est.total)} = weights {gib(est.weights)} + grads {gib(est.grads)} + "
              f"optimizer {gib(est.optimizer)} + max(activations {gib(est.activations)}, optimizer step "
              f"{gib(est.optimizer_transient)})")
        print(f"    on a CUDA device: {gib(est.device_total)} = {gib(est.reserved)} reserved (+{ALLOCATOR_MARGIN:.0%} "
              f"allocator margin, cuBLAS workspace) + NCCL {gib(est.nccl)} + CUDA context {gib(CUDA_CONTEXT)}")
    settings["activation_checkpointing"] = flags.activation_checkpointing
    if flags.vram_gb != -1:
        fits = largest_batch(config, flags.vram_gb * GIB, **settings)
        print(f"largest --device_batch_size that fits {flags.vram_gb:g} GiB: {fits}"
              + ("" if fits else " (none: lower --depth/--model_dim/--max_seq_len or add --world_size)"))
    if flags.check_free_vram:
        check_free_vram(config, flags, settings)
    if flags.measure:
        device = torch.device(autodetect_device_type("auto"))
        measured = measure_peak_memory(config, flags.device_batch_size, device, flags.activation_checkpointing)
        estimate = estimate_memory(config, flags.device_batch_size,
                                   autocast=device.type == "cuda",
                                   activation_checkpointing=flags.activation_checkpointing).total
        print(f"measured peak on {device.type}: {gib(measured)} (estimate {gib(estimate)}, "
              f"ratio {estimate / measured:.2f})")
        if device.type == "cuda":
            print(f"measured peak reserved: {gib(torch.cuda.max_memory_reserved(device))}")


def print_run_plan(flags: ModelInfoFlags, model, vocab: int, flops_per_token: float) -> None:
    """Steps and tokens as base_train resolves them for these flags, and the expected time on --gpu."""
    total_batch = resolved_total_batch(flags, model, vocab)
    steps, why = resolve_num_iterations(flags, ratio_param_count(flags, model), flops_per_token, total_batch)
    tokens = steps * total_batch
    print(f"run ({why}, recipe {flags.recipe}): {steps:,} steps of {total_batch:,} tokens = {tokens:,} tokens, "
          f"{flops_per_token * tokens:.3e} FLOPs")
    gpu = flags.gpu
    if gpu == "auto":
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    if not gpu:
        return
    peak = peak_flops(gpu)
    if peak is None:
        print(f"expected time: unknown ({gpu!r} is not in the bf16 peak table of nanochat/common.py)")
        return
    hours = flops_per_token * tokens / (flags.world_size * peak * flags.mfu) / 3600
    print(f"expected training time: {hours:.2f} h on {flags.world_size} × {gpu} ({peak / 1e12:,.0f} TFLOP/s bf16 "
          f"peak) at MFU {flags.mfu:.2f}")


def check_free_vram(config, flags: ModelInfoFlags, settings: dict) -> None:
    if not torch.cuda.is_available():
        raise UserError("--check_free_vram needs a CUDA GPU; use --vram_gb to size for one")
    free, _ = torch.cuda.mem_get_info()
    # free memory is counted after this process's CUDA context exists
    need = estimate_memory(config, flags.device_batch_size, **settings).device_total - CUDA_CONTEXT
    if need > free:
        fits = largest_batch(config, free, **settings)
        hint = f"lower --device_batch_size to {fits}" if fits else "lower --depth or --max_seq_len"
        if not flags.activation_checkpointing:
            hint += " or add --activation_checkpointing"
        raise UserError(f"estimated peak {gib(need)} exceeds the {gib(free)} free on this GPU; {hint}")
    print(f"fits: estimated peak {gib(need)} of {gib(free)} free")


if __name__ == "__main__":
    run_main(main)
