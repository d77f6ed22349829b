"""Synthetic spelling tasks: SimpleSpelling (spell a word out) and SpellingBee (count a letter in a word).

Tokens hide letters from the model, so it learns to spell a word out letter by letter and to count over the
spelled-out form, sometimes checking the count with the calculator (`'word'.count('r')`). Examples are made
from the index with a seeded RNG, so a task is reproducible and needs no storage. Words are split once into
train (9 of 10) and val (every 10th word, sorted order), so val asks about words training never showed.

The word list comes from real offline text, first found of: an explicit file, the cache
`$NANOCHAT_BASE_DIR/chat_data/words.txt`, a Debian wordlist (`/usr/share/dict/words`, package `wamerican`),
or the most frequent plain words of the pretraining shards (then cached).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nanochat.common import UserError, atomic_write, get_base_dir
from tasks.common import Task
from tasks.tooluse import extract_answer

SYSTEM_WORDLIST = Path("/usr/share/dict/words")
WORD = re.compile(r"[a-z]{3,12}")
MAX_WORDS = 20000
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLIT_SEEDS = {"train": 1_000_003, "val": 2_000_003}

SPELL_PROMPTS = ["Spell the word: {word}", "How do you spell {word}?", "Spell out '{word}' letter by letter.",
                 "spell {word}", "Can you spell the word {word} for me?"]
COUNT_PROMPTS = ["How many times does the letter '{letter}' appear in '{word}'?",
                 "How many {letter}s are in the word {word}?", "Count the letter {letter} in {word}.",
                 "how many '{letter}' in {word}", "In the word '{word}', how many times do you see '{letter}'?"]


def words_from_texts(texts: Iterable[str], min_count: int = 3, max_words: int = MAX_WORDS) -> list[str]:
    """The `max_words` most frequent lowercase alphabetic words (3-12 letters) seen at least `min_count` times."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(WORD.findall(text))
    frequent = [w for w, c in counts.most_common(max_words) if c >= min_count]
    return sorted(frequent)


def read_word_file(path: Path) -> list[str]:
    words = {line.strip() for line in path.read_text(encoding="utf-8", errors="ignore").splitlines()}
    return sorted(w for w in words if WORD.fullmatch(w))


def load_words(path: Path | str | None = None) -> list[str]:
    """The word list, from the first source that exists (see module doc)."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"word list {path} not found")
        words = read_word_file(Path(path))
    else:
        cache = get_base_dir() / "chat_data" / "words.txt"
        if cache.is_file():
            words = read_word_file(cache)
        elif SYSTEM_WORDLIST.is_file():
            words = read_word_file(SYSTEM_WORDLIST)
        else:
            from nanochat.shards import iter_text_batches, sources_present  # only this fallback needs shards

            # any source's text gives word frequencies: take the first by name, so several sources never stop
            # mid/SFT (which have no --data_source) and every rank picks the same one
            sources = sources_present()
            if not sources:
                raise UserError("no spelling word list: install Debian's wamerican, make pretraining shards, "
                                "or pass a word file")
            directory = get_base_dir() / "base_data" / sources[0]
            words = words_from_texts(text for batch in iter_text_batches("train", directory=directory)
                                     for text in batch)
            if words:
                atomic_write(cache, "\n".join(words) + "\n")
    if len(words) < 10:
        raise UserError(f"the spelling word list has {len(words)} words; need at least 10 "
                        "(install Debian's wamerican, make pretraining shards, or pass a word file)")
    return words


def split_words(words: list[str], split: str) -> list[str]:
    if split not in SPLIT_SEEDS:
        raise UserError(f"spelling split must be train or val, got {split!r}")
    ordered = sorted(set(words))
    return [w for i, w in enumerate(ordered) if (i % 10 == 9) == (split == "val")]


class WordTask(Task):
    """Shared machinery: a split's words and a per-index seeded RNG, `size` examples long."""

    def __init__(self, size: int, split: str = "train", words: list[str] | None = None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.size, self.split = size, split
        self.words = split_words(words if words is not None else load_words(), split)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(SPLIT_SEEDS[self.split] * 7919 + index)


class SimpleSpelling(WordTask):
    """Spell a word out: `apple` -> `a,p,p,l,e`; correct when the completion is exactly that."""

    def get_example(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        word = rng.choice(self.words)
        prompt = rng.choice(SPELL_PROMPTS).format(word=word)
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": ",".join(word)}]}

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


class SpellingBee(WordTask):
    """Count a letter in a word: spell it out, mark the matches, optionally check with the calculator.

    The answer ends with `#### N`; a completion is correct when its last `#### N` is the true count.
    """

    def __init__(self, size: int, split: str = "train", words: list[str] | None = None,
                 tool_fraction: float = 0.5, **slice_kwargs):
        super().__init__(size, split, words, **slice_kwargs)
        self.tool_fraction = tool_fraction

    def get_example(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # Mostly letters of the word; some absent ones so that 0 is a possible answer.
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
        count = word.count(letter)
        prompt = rng.choice(COUNT_PROMPTS).format(word=word, letter=letter)
        marks = ",".join(c.upper() if c == letter else c for c in word)
        reasoning = (f"Spelling out {word}: {','.join(word)}\n"
                     f"Marking each {letter}: {marks}\n"
                     f"That is {count} {letter}.\n")
        if rng.random() < self.tool_fraction:
            parts = [{"type": "text", "text": reasoning + "Checking with python: "},
                     {"type": "python", "text": f"'{word}'.count('{letter}')"},
                     {"type": "python_output", "text": str(count)},
                     {"type": "text", "text": f"\n#### {count}"}]
        else:
            parts = [{"type": "text", "text": reasoning + f"#### {count}"}]
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}],
                "answer": count}

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == str(conversation["answer"])
