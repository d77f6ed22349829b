"""How much of what it reads does the pretraining loader train on, and is it ever the bottleneck?

    python -m bench.dataloader [--shards DIR] [--tokens 4000000] [--what all|packing|speed]

Packing: at T=512 and T=2048, tokens read / tokens trained / % dropped for the crop rule (the original) and the
continue rule (the default), each over --packing_tokens trained tokens, in the same run.

For the demo config (d4, dim 192, T=256, B=16) and the ittybitty config (d4, dim 512, T=2048) it measures, on
this machine, in one run:
  - the loader alone with 1 and 2 tokenizer threads: tokens/s over --tokens tokens from a cold start (several
    row groups, so it is the tokenizing rate, not the buffer's),
  - a training step (forward + backward + AdamW) on a fixed batch: the reference consumption rate,
  - for the demo config, the same step fed by the loader, whose background thread competes for the cores.
It prints loader/consumption ratios (> 1 means the loader keeps up) and the step slowdown from feeding it.
Uses ../shared/data/pretrain by default and a 4096-token tokenizer trained here on 3M characters.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat.dataloader import PACKINGS, PretrainLoader, dropped_percent
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

CONFIGS = {  # name: (depth, model_dim, head_dim, seq_len, batch_size, vocab_size, training steps timed)
    "demo": (4, 192, 64, 256, 16, 4096, 3),
    "ittybitty": (4, 512, 64, 2048, 1, 24576, 2),  # batch 1 on CPU: tokens/s barely depends on it
}
DEFAULT_SHARDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain"


def train_tokenizer(shards: Path, max_chars: int = 3_000_000) -> Tokenizer:
    texts, total = [], 0
    for text in pq.read_table(sorted(shards.glob("shard_*.parquet"))[0]).column("text").to_pylist():
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return Tokenizer.train_from_iterator(texts, vocab_size=4096)


def loader_tokens_per_s(tokenizer, shards: Path, batch_size: int, seq_len: int, threads: int, tokens: int) -> float:
    loader = PretrainLoader(tokenizer, batch_size, seq_len, directory=shards, tokenizer_threads=threads)
    batches = max(1, tokens // (batch_size * seq_len))
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch_size * seq_len / elapsed


def packing_table(tokenizer, shards: Path, tokens: int) -> None:
    print("packing: T, rule, tokens read, tokens trained, % dropped (of the tokens read minus those still buffered)")
    for seq_len in (512, 2048):
        for packing in reversed(PACKINGS):  # the old rule first: it is the reference
            loader = PretrainLoader(tokenizer, 8, seq_len, directory=shards, packing=packing)
            for _ in range(max(1, tokens // (8 * seq_len))):
                next(loader)
            stats = loader.stats()
            loader.close()
            print(f"packing: T={seq_len} {packing:8} read {stats['tokens_read']:>12,} trained "
                  f"{stats['tokens_trained']:>12,} dropped {dropped_percent(stats):5.1f} %")


def train_tokens_per_s(config: GPTConfig, batch_size: int, steps: int, loader: PretrainLoader | None) -> float:
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fixed = torch.randint(0, config.vocab_size, (batch_size, config.max_seq_len + 1))

    def step() -> None:
        inputs, targets = next(loader) if loader else (fixed[:, :-1], fixed[:, 1:])
        model(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, loader's first row groups
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size * config.max_seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, default=DEFAULT_SHARDS, help="directory with shard_*.parquet")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="tokens per loader speed measurement")
    parser.add_argument("--packing_tokens", type=int, default=8_000_000, help="tokens trained per packing case")
    parser.add_argument("--what", choices=("all", "packing", "speed"), default="all")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; shards: {args.shards}; "
          f"load average before {os.getloadavg()[0]:.2f}")
    tokenizer = train_tokenizer(args.shards)
    if args.what in ("all", "packing"):
        packing_table(tokenizer, args.shards, args.packing_tokens)
    if args.what in ("all", "speed"):
        speed(tokenizer, args)
    print(f"load average after {os.getloadavg()[0]:.2f}")


def speed(tokenizer, args) -> None:
    for name, (depth, dim, head_dim, seq_len, batch_size, vocab, steps) in CONFIGS.items():
        config = GPTConfig(depth=depth, model_dim=dim, num_heads=dim // head_dim, num_kv_heads=dim // head_dim,
                           head_dim=head_dim, max_seq_len=seq_len, vocab_size=vocab)
        consume = train_tokens_per_s(config, batch_size, steps, None)
        print(f"{name}: training step consumes {consume:,.0f} tok/s (fixed batch)")
        if name == "demo":  # the fastest consumer, so the hardest case for the loader
            loader = PretrainLoader(tokenizer, batch_size, seq_len, directory=args.shards)
            fed = train_tokens_per_s(config, batch_size, steps, loader)
            loader.close()
            print(f"{name}: {fed:,.0f} tok/s fed by the loader (slowdown {consume / fed:.2f}x)")
        for threads in (1, 2):
            rate = loader_tokens_per_s(tokenizer, args.shards, batch_size, seq_len, threads, args.tokens)
            print(f"{name}: loader with {threads} tokenizer thread(s) delivers {rate:,.0f} tok/s = "
                  f"{rate / consume:.1f}x what training consumes")


if __name__ == "__main__":
    main()
