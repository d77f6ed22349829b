"""Interop hot paths on CPU: the imported-tokenizer adapter and the Llama-switch model, each against ours.

    python -m bench.interop [--docs 400] [--vocab_size 8192] [--steps 5]

1. Encoding: a tokenizer trained here on shard text, exported to HF `tokenizers` (hf_export) and held as an
   `HFEncoding` by our Tokenizer (what an imported model uses), encodes `--docs` real documents in one batch
   call; the reference is our tiktoken-backed Tokenizer on the same documents. Prints docs/s for both and the
   ratio, and checks the ids are identical.
2. Model: forward + backward of a d4/dim256 model with the Llama switches (SwiGLU at the same parameter count,
   learnable norms, no QK-norm) against the default architecture at the same size. Prints tokens/s and ratio.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_export import build_hf_tokenizer
from nanochat.encoding import HFEncoding
from nanochat.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_encoding(docs: int, vocab_size: int) -> None:
    train = pq.read_table(SHARED / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:1500]
    texts = pq.read_table(SHARED / "pretrain" / "shard_00001.parquet").column("text").to_pylist()[:docs]
    ours = Tokenizer.train_from_iterator(train, vocab_size)
    adapter = Tokenizer(HFEncoding(build_hf_tokenizer(ours), ours.special_tokens))
    if adapter.encode(texts) != ours.encode(texts):
        raise SystemExit("the adapter's ids differ from ours")
    reference = best_of(3, lambda: ours.encode(texts))
    measured = best_of(3, lambda: adapter.encode(texts))
    print(f"encode {docs} docs: tiktoken Tokenizer {docs / reference:,.0f} docs/s, HFEncoding "
          f"{docs / measured:,.0f} docs/s, ratio HF/ours {reference / measured:.2f}x")


def bench_model(steps: int) -> None:
    shape = dict(depth=4, model_dim=256, num_heads=4, num_kv_heads=4, head_dim=64, max_seq_len=256,
                 vocab_size=8192)
    # SwiGLU's hidden size 2/3 · 4 · dim keeps the MLP's parameter count equal to ReLU²'s 4 · dim
    llama = dict(mlp="swiglu", mlp_hidden_dim=683, norm_weight=True, qk_norm=False, embed_norm=False, softcap=0.0)
    idx = torch.randint(0, shape["vocab_size"], (8, 256))
    rates = {}
    for name, extra in (("default", {}), ("llama", llama)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape, **extra))
        model.init_weights()

        def step():
            model(idx[:, :-1], idx[:, 1:]).backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up
        rates[name] = steps * idx[:, :-1].numel() / best_of(1, lambda: [step() for _ in range(steps)])
    print(f"fwd+bwd d4/dim256 T=255 B=8: default {rates['default']:,.0f} tok/s, llama switches "
          f"{rates['llama']:,.0f} tok/s, ratio llama/default {rates['llama'] / rates['default']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    bench_encoding(args.docs, args.vocab_size)
    bench_model(args.steps)


if __name__ == "__main__":
    main()
