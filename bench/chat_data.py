"""Benchmark the chat batch loaders against the cost of rendering the same conversations alone.

    python -m bench.chat_data [--chat_dir ../shared/data/chat] [--seq_len 2048] [--batch_size 8] [--batches 40]

Rendering (tokenize + loss mask) is work any chat loader must do; the ratio shows what packing or padding,
tensor building and resumable bookkeeping add on top. Prints tokens/s for each and the ratio to the reference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.chat_data import PackedChatBatches, PaddedChatBatches, render
from nanochat.flags import flag, parse_flags, run_main
from nanochat.tokenizer import Tokenizer
from tasks.smoltalk import SmolTalk

SHARED_CHAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat"


@dataclass
class BenchFlags:
    """Chat batch loaders vs rendering alone."""
    chat_dir: str = flag(str(SHARED_CHAT), "directory with train.jsonl(.gz) conversations")
    vocab_size: int = flag(4096, "tokenizer trained on the first conversations")
    seq_len: int = flag(2048, "row length in tokens")
    batch_size: int = flag(8, "rows per batch")
    batches: int = flag(40, "batches timed per loader")


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(BenchFlags, argv)
    task = SmolTalk("train", data=flags.chat_dir)
    texts = [m["content"] for i in range(500) for m in task[i]["messages"] if isinstance(m["content"], str)]
    tokenizer = Tokenizer.train_from_iterator(texts, flags.vocab_size)

    results = {}
    for name, loader_class in (("packed (mid)", PackedChatBatches), ("padded (sft)", PaddedChatBatches)):
        loader = loader_class(tokenizer, task, flags.batch_size, flags.seq_len)
        next(loader)  # warm-up: fills the packing buffer
        start_position = loader.position
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(flags.batches):
            inputs, _ = next(loader)
            tokens += inputs.numel()
        loader_s = time.perf_counter() - t0
        # Reference: render exactly the conversations this loader consumed, nothing else.
        t0 = time.perf_counter()
        for position in range(start_position, loader.position):
            render(tokenizer, task[loader.task_index(position)], flags.seq_len + 1)
        render_s = time.perf_counter() - t0
        results[name] = (tokens / loader_s, loader.position - start_position, render_s / loader_s)
    for name, (tok_per_s, conversations, ratio) in results.items():
        print(f"{name}: {tok_per_s:,.0f} tok/s over {conversations} conversations; "
              f"render-only time / loader time = {ratio:.2f}")


if __name__ == "__main__":
    run_main(main)
