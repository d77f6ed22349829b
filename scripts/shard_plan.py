"""How many pretraining shards a base_train run needs, from its token budget; then it downloads them.

    python -m scripts.shard_plan --depth=20 --data_source=climbmix      # takes every base_train flag

Tokens = steps (resolved as base_train resolves them) × --total_batch_size. Shards = tokens × (1 + --margin)
÷ the loader's measured yield per train shard (the saved tokenizer, --packing and --max_seq_len, on the train
shards already there, e.g. those tok_train read). Train shards 0..N-1 and the validation shard are then
downloaded (valid ones are kept), so the run reads each token once.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.checkpoint import meta_model
from nanochat.common import UserError
from nanochat.dataloader import measure_shard_yield, train_shards_needed
from nanochat.download import PRETRAIN_SOURCES, OfflineFlags, download_shards
from nanochat.flags import flag, parse_flags, run_main
from nanochat.model_config import model_config
from nanochat.shards import data_dir
from nanochat.tokenizer import get_tokenizer
from scripts.base_train import BaseTrainFlags, batch_plan, ratio_param_count, resolve_num_iterations


@dataclass
class ShardPlanFlags(OfflineFlags, BaseTrainFlags):
    """Shards for a base_train run's token budget: base_train's flags plus the two below."""
    margin: float = flag(0.1, "spare share of shards beyond the budget (data yield varies by shard)")
    num_workers: int = flag(4, "parallel downloads", short="-w")

    def __post_init__(self):
        super().__post_init__()
        if self.data_source not in PRETRAIN_SOURCES:
            raise UserError(f"--data_source must name a source to download ({', '.join(PRETRAIN_SOURCES)}), "
                            f"got {self.data_source!r}")
        if self.margin < 0:
            raise UserError(f"--margin must be >= 0, got {self.margin}")


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(ShardPlanFlags, argv)
    tokenizer = get_tokenizer()
    config = model_config(flags, tokenizer.vocab_size)
    model = meta_model(config)
    total_batch = batch_plan(flags, model, tokenizer.vocab_size)[0]
    flops_per_token = model.estimate_flops(config.max_seq_len)
    steps, why = resolve_num_iterations(flags, ratio_param_count(flags, model), flops_per_token, total_batch)
    tokens = steps * total_batch
    shard_yield = measure_shard_yield(tokenizer, data_dir(flags.data_source), config.max_seq_len, flags.packing)
    needed = train_shards_needed(tokens, shard_yield, flags.margin)
    print(f"plan: {steps} steps ({why}) × {total_batch:,} = {tokens:,} tokens; {shard_yield:,.0f} "
          f"tokens per {flags.data_source} train shard (measured, --packing {flags.packing}) -> {needed} train "
          f"shards + the validation shard ({flags.margin:.0%} margin)", flush=True)
    paths = download_shards(needed, flags.data_source, num_workers=flags.num_workers)
    print(f"plan: {len(paths) - 1} train shards + {paths[-1].name} in {paths[-1].parent}")


if __name__ == "__main__":
    run_main(main)
