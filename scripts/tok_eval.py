"""Compression of the trained tokenizer (bytes per token; higher packs more text into each token).

    python -m scripts.tok_eval

Measured on a slice of the train and val shards of every pretraining source in base_data/ (e.g. ClimbMix and
FineWeb-Edu side by side, so a user sees what changing the source does) and on built-in samples of prose, code, math and non-English
text, against GPT-2 and cl100k (when tiktoken can load them: they are downloaded once, so a machine without
internet leaves those columns out and says so) and against our tokenizers saved as
`$NANOCHAT_BASE_DIR/tokenizer_<name>/` (e.g. other vocab sizes, via `tok_train --output_dir`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tiktoken

from nanochat import download, report
from nanochat.common import UserError, get_base_dir, print0
from nanochat.download import OfflineFlags
from nanochat.encoding import META_FILE
from nanochat.flags import flag, parse_flags, run_main
from nanochat.shards import data_dir, iter_text_batches, sources_present
from nanochat.tokenizer import Tokenizer, get_tokenizer

SAMPLES = {
    "prose": (
        "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of habit "
        "rather than need. From the lamp room he could see the fishing boats turning for harbour, their wakes "
        "stitched white across the grey water, and beyond them the long dark line where the weather came from."
    ),
    "code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which is zero at x = 2, so the minimum is "
        "f(2) = 12 - 24 + 7 = -5. For the integral, \\int_0^3 f(x) dx = [x^3 - 6x^2 + 7x]_0^3 = 27 - 54 + 21 = -6. "
        "Check: 1234 * 5678 = 7006652 and 2^16 = 65536; 0.125 + 0.375 = 0.5."
    ),
    "non-English": (
        "Der schnelle Wind trug den Geruch von Regen über die Felder. "
        "La bibliothèque ouvre à neuf heures, mais les étudiants attendent déjà devant la porte. "
        "El mercado del sábado estaba lleno de naranjas, pan recién hecho y música. "
        "Вечером над рекой поднимается туман, и огни города становятся мягче. "
        "東京の朝は早く、駅にはもう多くの人が並んでいる。 "
        "오늘은 날씨가 맑아서 공원에 산책하러 가기 좋다. "
        "في الصباح الباكر يشرب الناس القهوة قبل الذهاب إلى العمل."
    ),
}
REFERENCE_ENCODINGS = ("gpt2", "cl100k_base")


@dataclass
class TokEvalFlags(OfflineFlags):
    max_chars: int = flag(1_000_000, "characters of each split (train, val) to measure; -1 = the whole split")

    def __post_init__(self):
        super().__post_init__()
        if self.max_chars == 0 or self.max_chars < -1:
            raise UserError(f"--max_chars must be >= 1 or -1 (all), got {self.max_chars}")


def split_sample(split: str, max_chars: int, source: str) -> str:
    """The first max_chars characters of a source's split, documents joined by newlines."""
    parts, total = [], 0
    for batch in iter_text_batches(split, directory=data_dir(source)):
        for text in batch:
            parts.append(text)
            total += len(text) + 1
            if max_chars != -1 and total >= max_chars:
                return "\n".join(parts)[:max_chars]
    return "\n".join(parts)


def load_encoders() -> tuple[dict[str, Callable[[str], list[int]]], list[str]]:
    """Ours first (named by vocab size), then other saved variants, then GPT-2 / cl100k when loadable."""
    ours = get_tokenizer()
    encoders = {f"ours ({ours.vocab_size})": ours.encode}
    notes = []
    for directory in sorted(get_base_dir().glob("tokenizer_*")):
        if (directory / META_FILE).is_file():
            variant = Tokenizer.load(directory)
            encoders[f"{directory.name} ({variant.vocab_size})"] = variant.encode
    for name in REFERENCE_ENCODINGS:
        if download.offline:
            notes.append(f"{name} left out: --offline (tiktoken downloads the encoding once)")
            continue
        try:
            encoders[name] = tiktoken.get_encoding(name).encode_ordinary
        except Exception as exc:  # whatever stops the download or cache read only drops this column
            notes.append(f"{name} left out: tiktoken could not load it ({type(exc).__name__}; it downloads the "
                         f"encoding once, so this machine needs internet or a filled TIKTOKEN_CACHE_DIR)")
    return encoders, notes


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(TokEvalFlags, argv)
    encoders, notes = load_encoders()
    texts = {f"{source or 'base_data'} {split}": split_sample(split, flags.max_chars, source)
             for source in sources_present() for split in ("train", "val")}
    texts.update(SAMPLES)
    header = ["text", "bytes"] + [f"{name} bytes/token" for name in encoders]
    rows = []
    for label, text in texts.items():
        num_bytes = len(text.encode("utf-8"))
        rows.append([label, num_bytes] + [round(num_bytes / max(1, len(encode(text))), 3)
                                          for encode in encoders.values()])
    table = report.markdown_table(header, rows)
    for note in notes:
        print0(f"note: {note}")
    print0(table)
    report.log_section("Tokenizer evaluation", [table] + [f"- {note}" for note in notes])


if __name__ == "__main__":
    run_main(main)
