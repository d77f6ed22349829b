"""Bits per byte of a base checkpoint on the train and val splits, plus greedy samples for fixed prompts.

    python -m scripts.base_loss --model_tag d20 --split_tokens 10485760
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat import report
from nanochat.checkpoint import load_model
from nanochat.common import UserError, autodetect_device_type, cleanup_distributed, init_distributed, print0, resolve_dtype
from nanochat.dataloader import PretrainLoader
from nanochat.engine import greedy_samples
from nanochat.flags import CheckpointFlags, RuntimeFlags, flag, parse_flags, run_main
from nanochat.loss_eval import evaluate_bpb
from nanochat.shards import DataSourceFlags, data_dir

@dataclass
class BaseLossFlags(DataSourceFlags, RuntimeFlags, CheckpointFlags):
    device_batch_size: int = flag(32, "rows per forward pass per rank; lower it if you run out of memory")
    split_tokens: int = flag(20 * 524288, "tokens to evaluate per split (train and val), all ranks together")
    sample_tokens: int = flag(16, "tokens to generate greedily per sample prompt; 0 = no samples")

    def __post_init__(self):
        super().__post_init__()
        for name in ("device_batch_size", "split_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_tokens < 0:
            raise UserError(f"--sample_tokens must be >= 0, got {self.sample_tokens}")


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(BaseLossFlags, argv)
    start = time.time()
    device_type = autodetect_device_type(flags.device_type)
    dist = init_distributed(device_type)
    model, tokenizer, meta = load_model("base", dist.device, *flags.checkpoint_choice(),
                                        resolve_dtype(device_type, flags.dtype))
    seq_len = model.config.max_seq_len
    tokens_per_step = flags.device_batch_size * seq_len * dist.world_size
    if flags.split_tokens < tokens_per_step:
        raise UserError(f"--split_tokens {flags.split_tokens} is less than one step of device_batch_size × "
                        f"max_seq_len × ranks = {tokens_per_step} tokens; use a multiple of {tokens_per_step}")
    num_steps = flags.split_tokens // tokens_per_step
    bpb = {}
    directory = data_dir(flags.data_source)
    for split in ("train", "val"):
        loader = PretrainLoader(tokenizer, flags.device_batch_size, seq_len, split, dist.device,
                                dist.rank, dist.world_size, directory=directory)
        try:
            bpb[split] = evaluate_bpb(model, loader, num_steps, tokenizer.token_bytes())
        finally:
            loader.close()
        print0(f"{split} bpb: {bpb[split]:.4f} ({num_steps * tokens_per_step:,} tokens)")

    samples = []
    if dist.is_master and flags.sample_tokens > 0:
        samples = greedy_samples(model, tokenizer, flags.sample_tokens)
        for sample in samples:
            print0(repr(sample))
    report.log_section("Base model loss", [
        {"checkpoint step": meta.get("step"), "split tokens": num_steps * tokens_per_step,
         "train bpb": bpb["train"], "val bpb": bpb["val"]},
        "Greedy samples:\n\n```\n" + "\n".join(samples) + "\n```" if samples else "",
    ], source="base", wall_time_s=time.time() - start)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
