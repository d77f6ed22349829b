"""CORE scoring speed on CPU for the demo model: batched forward passes vs one sequence at a time.

    python -m bench.eval [--bundle DIR] [--items 20] [--batch_size 32]

The demo config (d4, dim 192, head_dim 64, T=256, vocab 4096; random weights: speed does not depend on them)
scores `--items` items of four CORE tasks from the shared bundle, one per task type plus a 10-shot task whose
prompts get cropped to the context. The reference is the same code with batch_size=1. Prints examples/s for
both and their ratio, and checks that both give the same accuracy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat.core_eval import evaluate_task, load_bundle
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("hellaswag_zeroshot", "winogrande", "lambada_openai", "arc_easy")


def train_tokenizer(max_chars: int = 1_000_000) -> Tokenizer:
    texts, total = [], 0
    for text in pq.read_table(SHARED / "pretrain" / "shard_00000.parquet").column("text").to_pylist():
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return Tokenizer.train_from_iterator(texts, vocab_size=4096)


def timed(model, tokenizer, tasks, batch_size: int, items: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    accuracies = [evaluate_task(model, tokenizer, task, "cpu", model.config.max_seq_len, items, batch_size)
                  for task in tasks]
    return len(tasks) * items / (time.perf_counter() - start), accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(SHARED / "core"))
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=4, model_dim=192, num_heads=3, num_kv_heads=3, head_dim=64, max_seq_len=256,
                          vocab_size=tokenizer.vocab_size))
    model.init_weights()
    model.eval()
    tasks = [t for t in load_bundle(Path(args.bundle)) if t.label in TASKS]
    timed(model, tokenizer, tasks[:1], args.batch_size, 4)  # warm-up
    one_rate, one_acc = timed(model, tokenizer, tasks, 1, args.items)
    batched_rate, batched_acc = timed(model, tokenizer, tasks, args.batch_size, args.items)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tasks {', '.join(t.label for t in tasks)}")
    print(f"one-by-one: {one_rate:.1f} examples/s")
    print(f"batched ({args.batch_size} sequences): {batched_rate:.1f} examples/s")
    print(f"ratio batched / one-by-one: {batched_rate / one_rate:.2f}x")
    print(f"same accuracies: {all(abs(a - b) < 1e-9 for a, b in zip(one_acc, batched_acc))}")


if __name__ == "__main__":
    main()
