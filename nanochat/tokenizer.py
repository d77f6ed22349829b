"""The tokenizer: trained with rustbpe, run with tiktoken, plus special tokens and chat rendering.

Training learns byte-level BPE merges in Rust (`rustbpe`); encoding and decoding go through a
`tiktoken.Encoding` built from the learned ranks, which is fast and battle-tested. On disk a tokenizer is
two files in one directory (never pickle):

    tokenizer.tiktoken   tiktoken's own rank format: one `base64(token bytes) rank` per line
    tokenizer.json       split pattern, special tokens with ids, vocab size, training stats

Ids 0..255 are bytes, then the merges, then the special tokens. Text is always encoded as ordinary text:
special-token text typed by a user stays plain bytes; special ids only enter through `encode_special`,
`prepend`/`append` and the chat renderers.
"""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path

import rustbpe
import tiktoken
import torch

from nanochat.common import UserError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call the assistant writes
    "<|output_start|>", "<|output_end|>",  # the tool's output, written by the engine, not trained on
]

SPLIT_PATTERN = rustbpe.DEFAULT_PATTERN
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TRAIN_HINT = "train one with `python -m scripts.tok_train`"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    # rename last: a crash mid-write must leave the old file intact
    os.replace(tmp, path)


class Tokenizer:
    """A tiktoken encoding with nanochat's special tokens and chat format."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, stats: dict | None = None):
        num_ranks = len(mergeable_ranks)
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.stats = dict(stats or {})
        self.special_tokens = {name: num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # -----------------------------------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, pattern: str | None = None,
                            buffer_size: int = 8192) -> Tokenizer:
        """Learn merges so that the vocabulary, special tokens included, has at most `vocab_size` tokens.

        Fewer merges are learned when the text runs out of pairs to merge; `vocab_size` then reports less.
        """
        smallest = 256 + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise UserError(f"vocab_size must be at least {smallest} (256 bytes + {len(SPECIAL_TOKENS)} special "
                            f"tokens), got {vocab_size}")
        pattern = pattern or SPLIT_PATTERN
        trainer = rustbpe.Tokenizer()
        try:
            trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), buffer_size=buffer_size,
                                        pattern=pattern)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        ranks = dict(trainer.get_mergeable_ranks())
        return cls(ranks, pattern, {"requested_vocab_size": vocab_size})

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.tiktoken + tokenizer.json into `directory` (created if needed), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = self.mergeable_ranks
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
        _atomic_write_text(directory / RANKS_FILE, "".join(lines))
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens, "vocab_size": self.vocab_size,
                "num_merges": len(ranks) - 256, "stats": self.stats}
        _atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save`; a missing or damaged file is a UserError that names it."""
        directory = Path(directory)
        ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
        for path in (ranks_path, meta_path):
            if not path.is_file():
                raise UserError(f"no tokenizer at {directory} ({path.name} is missing); {TRAIN_HINT}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            pattern = meta["pattern"]
            special_tokens = meta["special_tokens"]
            stats = meta.get("stats", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{meta_path} is damaged ({exc}); {TRAIN_HINT} to rebuild it") from exc
        ranks = _read_ranks(ranks_path)
        expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if special_tokens != expected:
            raise UserError(f"{meta_path} lists special tokens {special_tokens}, but this nanochat expects "
                            f"{expected}; {TRAIN_HINT} to rebuild it")
        try:
            return cls(ranks, pattern, stats)
        except ValueError as exc:
            raise UserError(f"{meta_path} is damaged ({exc}); {TRAIN_HINT} to rebuild it") from exc

    # -----------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_special(self, name: str) -> int:
        """The id of a special token such as "<|assistant_end|>"."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def token_bytes(self) -> torch.Tensor:
        """Byte length of every token (int64, length vocab_size); 0 for special tokens. For bits-per-byte."""
        lengths = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.long)

    # -----------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def _special_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ordinary encoding of one string (-> ids) or a list of strings (-> list of ids, threaded).

        `prepend` / `append` add one token (an id or a special token's name) to each sequence.
        """
        head = [] if prepend is None else [self._special_id(prepend)]
        tail = [] if append is None else [self._special_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        return [head + ids + tail for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids: list[int]) -> str:
        """Ids back to text; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self.enc.decode(list(ids))

    # -----------------------------------------------------------------------------------------------------
    # Chat rendering

    def render_conversation(self, conversation: dict,
                            max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = trained on: assistant text, python calls, <|assistant_end|>).

        A leading system message is folded into the first user turn; truncated to `max_tokens` (None: never).
        """
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], trained: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        special = self.special_tokens
        add(self.bos_token_id, 0)
        for i, message in enumerate(_normalized_messages(conversation)):
            if message["role"] == "user":
                add(special["<|user_start|>"], 0)
                add(self.enc.encode_ordinary(message["content"]), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            for part in _assistant_parts(message["content"], i):
                text_ids = self.enc.encode_ordinary(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":
                    add(special["<|python_start|>"], 1)
                    add(text_ids, 1)
                    add(special["<|python_end|>"], 1)
                else:
                    add(special["<|output_start|>"], 0)
                    add(text_ids, 0)
                    add(special["<|output_end|>"], 0)
            add(special["<|assistant_end|>"], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Ids that prompt the assistant's next reply: a trailing assistant message is dropped and the ids
        end with <|assistant_start|>."""
        messages = list(conversation.get("messages", []))
        if messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages or messages[-1].get("role") != "user":
            raise UserError("render_for_completion needs a conversation that ends with a user message")
        ids, _ = self.render_conversation({**conversation, "messages": messages}, max_tokens=None)
        return ids + [self.special_tokens["<|assistant_start|>"]]


def _read_ranks(path: Path) -> dict[bytes, int]:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); {TRAIN_HINT} to rebuild it") from exc
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(lines, start=1):
        try:
            token, rank = line.split(" ")
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise UserError(f"{path} is damaged at line {line_number} ({exc}); {TRAIN_HINT} to rebuild it") from exc
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise UserError(f"{path} is damaged (ranks are not 0..n-1 over at least 256 tokens); {TRAIN_HINT} "
                        f"to rebuild it")
    return ranks


def _normalized_messages(conversation: dict) -> list[dict]:
    """Messages alternating user, assistant, ...; a leading system message joins the first user turn."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages:
        raise UserError("a conversation is {'messages': [...]} with at least one message")
    messages = [dict(m) for m in messages]
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise UserError("a system message must be followed by a user message")
        system = messages.pop(0)
        messages[0]["content"] = f"{system['content']}\n\n{messages[0]['content']}"
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise UserError(f"message {i} has role {message.get('role')!r}, expected {expected!r} "
                            f"(messages alternate user/assistant, optionally after one system message)")
        if message["role"] == "user" and not isinstance(message.get("content"), str):
            raise UserError(f"message {i} (user) must have str content")
    return messages


def _assistant_parts(content, index: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise UserError(f"message {index} (assistant) content must be a str or a list of parts")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") \
                or not isinstance(part.get("text"), str):
            raise UserError(f"message {index} has a bad part {part!r}; parts are "
                            f"{{'type': 'text'|'python'|'python_output', 'text': str}}")
    return content


def get_tokenizer() -> Tokenizer:
    """The tokenizer in `$NANOCHAT_BASE_DIR/tokenizer`: ours, or an imported model's (nanochat.hf_import)."""
    directory = get_base_dir() / "tokenizer"
    from nanochat.hf_import import HFTokenizer, is_hf_tokenizer_dir  # lazy: hf_import imports this module

    if is_hf_tokenizer_dir(directory):
        return HFTokenizer.load(directory)
    return Tokenizer.load(directory)
