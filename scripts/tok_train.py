"""Train the BPE tokenizer on the training shards and save it to `$NANOCHAT_BASE_DIR/tokenizer/`.

    python -m scripts.tok_train --vocab_size=65536 --max_chars=2000000000 --doc_cap=10000

Reads only the training shards (never the validation shard), caps each document at `--doc_cap` characters
and stops after `--max_chars`. Merges are learned in Rust (rustbpe) with the GIL released; the report section
records chars/s, wall time and peak memory.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nanochat import report
from nanochat.common import UserError, get_base_dir, print0
from nanochat.shards import DataSourceFlags, data_dir, iter_text_batches, split_shards
from nanochat.flags import flag, parse_flags, run_main
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


@dataclass
class TokTrainFlags(DataSourceFlags):
    vocab_size: int = flag(65536, "tokens in the vocabulary, the special tokens included")
    max_chars: int = flag(2_000_000_000, "stop after this many characters of training text; -1 = all shards")
    doc_cap: int = flag(10_000, "use at most this many characters of each document; -1 = whole documents")
    output_dir: str = flag("", "where to save; empty = $NANOCHAT_BASE_DIR/tokenizer (save others as "
                               "tokenizer_<name> beside it and tok_eval compares them)")

    def __post_init__(self):
        smallest = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < smallest:
            raise UserError(f"--vocab_size must be >= {smallest} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                            f"got {self.vocab_size}")
        for name in ("max_chars", "doc_cap"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise UserError(f"--{name} must be >= 1 or -1 (no limit), got {value}")


def training_texts(directory: Path, max_chars: int, doc_cap: int, progress: tqdm, counts: dict) -> Iterator[str]:
    """Documents from the training shards, each capped at doc_cap chars, until max_chars have been yielded."""
    for batch in iter_text_batches("train", directory=directory):
        for text in batch:
            if doc_cap != -1:
                text = text[:doc_cap]
            if max_chars != -1:
                text = text[:max_chars - counts["chars"]]
            counts["chars"] += len(text)
            counts["docs"] += 1
            progress.update(len(text))
            yield text
            if counts["chars"] == max_chars:
                return


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(TokTrainFlags, argv)
    output_dir = Path(flags.output_dir) if flags.output_dir else get_base_dir() / "tokenizer"
    directory = data_dir(flags.data_source)
    split_shards("train", directory)  # missing shards stop here with the fix, before the progress bar starts
    counts = {"chars": 0, "docs": 0}
    start = time.time()
    with tqdm(total=None if flags.max_chars == -1 else flags.max_chars, unit="char", unit_scale=True,
              desc="splitting and counting", file=sys.stdout) as progress:
        tok = Tokenizer.train_from_iterator(training_texts(directory, flags.max_chars, flags.doc_cap, progress, counts),
                                            flags.vocab_size)
    wall_time = time.time() - start
    if counts["chars"] == 0:
        raise UserError("the training shards hold no text; rebuild them (see `python -m nanochat.dataset --help`)")

    lengths = tok.token_bytes()[:tok.bos_token_id].float()
    stats = {
        "data": str(directory.relative_to(get_base_dir())),
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": flags.vocab_size,
        "train_docs": counts["docs"],
        "train_chars": counts["chars"],
        "doc_cap": flags.doc_cap,
        "wall_time_s": round(wall_time, 2),
        "chars_per_s": round(counts["chars"] / wall_time),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "token_bytes_mean": round(float(lengths.mean()), 3),
        "token_bytes_max": int(lengths.max()),
    }
    tok.encoding.stats.update(stats)
    tok.save(output_dir)
    for key, value in stats.items():
        print0(f"{key}: {value}")
    if tok.vocab_size < flags.vocab_size:
        print0(f"note: the text ran out of pairs to merge; the vocabulary has {tok.vocab_size} tokens, "
               f"not {flags.vocab_size}")
    print0(f"saved {output_dir}")
    report.log_section("Tokenizer training", [vars(flags), stats], wall_time_s=wall_time)


if __name__ == "__main__":
    run_main(main)
