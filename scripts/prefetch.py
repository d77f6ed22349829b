"""Fetch and check every file the stages after base_train read, before the first GPU-hour is spent.

    python -m scripts.prefetch              # SmolTalk, MMLU, GSM8K, ARC, HumanEval and the CORE bundle
    python -m scripts.prefetch --offline    # only check that all of it is here (names what is missing)

Each dataset is loaded through the same task class mid_train, chat_sft, chat_rl and chat_eval use, so a file
that is missing, cut off, or in an unexpected format (a changed Hub repo) fails here, with its name, instead of
hours into a paid run. Everything lands where those stages look (`chat_data/`, `eval_data/`, `eval_bundle/`),
so they run with --offline afterwards.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nanochat.common import UserError
from nanochat.core_eval import download_bundle, load_bundle
from nanochat.download import OfflineFlags
from nanochat.flags import parse_flags, run_main
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk

# what -> how many examples it holds; the stage that reads it is in the name
DATASETS: dict[str, Callable[[], int]] = {
    "SmolTalk train (mid, sft)": lambda: SmolTalk("train").num_examples(),
    "SmolTalk val (mid, sft)": lambda: SmolTalk("val").num_examples(),
    "MMLU auxiliary_train (mid)": lambda: MMLU("auxiliary_train").num_examples(),
    "MMLU test (chat_eval)": lambda: MMLU("test").num_examples(),
    "GSM8K train (mid, sft, rl)": lambda: GSM8K("train").num_examples(),
    "GSM8K test (chat_eval, rl)": lambda: GSM8K("test").num_examples(),
    "ARC-Easy train (sft)": lambda: ARC("ARC-Easy", "train").num_examples(),
    "ARC-Easy test (chat_eval)": lambda: ARC("ARC-Easy", "test").num_examples(),
    "ARC-Challenge train (sft)": lambda: ARC("ARC-Challenge", "train").num_examples(),
    "ARC-Challenge test (chat_eval)": lambda: ARC("ARC-Challenge", "test").num_examples(),
    "HumanEval (chat_eval)": lambda: HumanEval().num_examples(),
    "CORE bundle tasks (base_eval)": lambda: len(load_bundle(download_bundle())),
}


@dataclass
class PrefetchFlags(OfflineFlags):
    """Fetch and check the task data and CORE bundle the later stages read."""


def main(argv: list[str] | None = None) -> None:
    parse_flags(PrefetchFlags, argv)
    for name, load in DATASETS.items():
        count = load()
        if count == 0:
            raise UserError(f"{name} has no examples; delete its files under $NANOCHAT_BASE_DIR and fetch again")
        print(f"prefetch: {name}: {count:,}", flush=True)


if __name__ == "__main__":
    run_main(main)
