"""Generation speed: the engine's KV-cache decoding against recomputing the whole sequence for every token.

    python -m bench.generate [--device_type auto] [--new_tokens 256 1024] [--batch_sizes 1 8]

For each (new tokens, batch) it measures, in one run on one model:
  - cached: `Engine.generate` end to end (sampling, stop checks, Python per step), decode steps only
  - naive:  a full forward over prompt + tokens so far for every new token (the reference); its cost grows
            with length, so it is timed on `--naive_samples` evenly spaced steps, each standing for its stride
and prints decode tokens/s for both and the cached/naive ratio. Prefill tokens/s (one forward over a long
prompt) is printed with its ratio to cached batch-1 decoding. The model is random (speed does not depend on the
weights); special-token logits are zeroed and sampling uses top_k=1, so no row stops early.
Defaults: d4 dim 256 (4 heads, 2 kv heads) float32 on CPU; d20 dim 1280 bfloat16 on CUDA.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

SHARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "shard_00000.parquet"
MODELS = {  # device type: (depth, model_dim, num_heads, num_kv_heads, vocab_size, dtype)
    "cpu": (4, 256, 4, 2, 2048, torch.float32),
    "cuda": (20, 1280, 10, 10, 65536, torch.bfloat16),
}


def bench_tokenizer() -> Tokenizer:
    """The engine needs the special-token ids; a small tokenizer from real text (or a few lines) provides them."""
    texts = pq.read_table(SHARD).column("text").to_pylist()[:200] if SHARD.is_file() else ["hello world"] * 50
    return Tokenizer.train_from_iterator(texts, vocab_size=1024)


def bench_model(device_type: str, device: torch.device, tokenizer: Tokenizer, max_seq_len: int) -> GPT:
    depth, dim, heads, kv_heads, vocab, dtype = MODELS[device_type]
    config = GPTConfig(depth=depth, model_dim=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim // heads,
                       max_seq_len=max_seq_len, vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
        model.lm_head.weight.normal_(std=0.5)
        special = list(tokenizer.special_tokens.values())
        model.lm_head.weight[special] = 0.0  # top-1 sampling then never picks a stop or tool token
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_decode_rate(engine: Engine, prompt: list[int], batch: int, new_tokens: int) -> float:
    """Tokens/s over the decode steps of a real generation (the clock starts after the first step: prefill)."""
    generation = engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=1.0, top_k=1, seed=0)
    next(generation)
    start = time.perf_counter()
    steps = sum(1 for _ in generation)
    sync(engine.device)
    assert steps == new_tokens - 1, f"a row stopped early after {steps + 1} tokens"
    return batch * steps / (time.perf_counter() - start)


@torch.inference_mode()
def naive_decode_rate(model: GPT, prompt_len: int, batch: int, new_tokens: int, samples: int,
                      device: torch.device) -> float:
    """Tokens/s when every new token recomputes the whole sequence, from a stratified sample of the steps."""
    stride = max(1, (new_tokens - 1) // samples)
    total_s = 0.0
    for step in range(1, new_tokens, stride):
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len + step), device=device)
        sync(device)
        start = time.perf_counter()
        logits = model(ids)[:, -1]
        logits.argmax(dim=-1).tolist()  # the token has to reach Python, as in the engine
        total_s += (time.perf_counter() - start) * min(stride, new_tokens - step)
    return batch * (new_tokens - 1) / total_s


@torch.inference_mode()
def prefill_rate(engine: Engine, prompt: list[int], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(engine.device)
        start = time.perf_counter()
        engine.prefill(prompt, 1, len(prompt))
        sync(engine.device)
        best = min(best, time.perf_counter() - start)
    return len(prompt) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device_type", default="auto", help="auto|cuda|mps|cpu")
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens before decoding starts")
    parser.add_argument("--prefill_len", type=int, default=1024, help="prompt tokens for the prefill measurement")
    parser.add_argument("--naive_samples", type=int, default=24, help="naive steps timed per configuration")
    args = parser.parse_args()

    device_type = autodetect_device_type(args.device_type)
    device_type = "cpu" if device_type == "mps" else device_type
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    tokenizer = bench_tokenizer()
    max_seq_len = max(args.prompt_len + max(args.new_tokens), args.prefill_len)
    model = bench_model(device_type, device, tokenizer, max_seq_len)
    engine = Engine(model, tokenizer)
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    c = model.config
    print(f"device: {name} | torch {torch.__version__} | model d{c.depth} dim {c.model_dim} heads {c.num_heads}"
          f"/{c.num_kv_heads} kv, vocab {c.vocab_size}, {next(model.parameters()).dtype}, "
          f"{model.num_params()['total'] / 1e6:.1f}M params")

    prompt = torch.randint(0, tokenizer.vocab_size - len(tokenizer.special_tokens), (args.prompt_len,)).tolist()
    cached_decode_rate(engine, prompt, 1, 16)  # warm-up: allocator, kernels
    naive_decode_rate(model, args.prompt_len, 1, 16, 2, device)
    print(f"{'new tokens':>10} {'batch':>5} {'cached tok/s':>13} {'naive tok/s':>12} {'cached/naive':>13}")
    batch1_rate = None
    for new_tokens in args.new_tokens:
        for batch in args.batch_sizes:
            cached = cached_decode_rate(engine, prompt, batch, new_tokens)
            naive = naive_decode_rate(model, args.prompt_len, batch, new_tokens, args.naive_samples, device)
            batch1_rate = cached if batch == 1 and batch1_rate is None else batch1_rate
            print(f"{new_tokens:>10} {batch:>5} {cached:>13,.0f} {naive:>12,.0f} {cached / naive:>12.1f}x",
                  flush=True)
    long_prompt = (prompt * (args.prefill_len // len(prompt) + 1))[:args.prefill_len]
    prefill = prefill_rate(engine, long_prompt)
    ratio = f", {prefill / batch1_rate:.0f}x cached batch-1 decoding" if batch1_rate else ""
    print(f"prefill of {args.prefill_len} tokens: {prefill:,.0f} tok/s{ratio}")


if __name__ == "__main__":
    main()
