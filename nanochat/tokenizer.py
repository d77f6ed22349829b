"""The tokenizer: trained with rustbpe, run with tiktoken, plus special tokens and chat rendering.

Training learns byte-level BPE merges in Rust (`rustbpe`); encoding and decoding go through the encoding the
tokenizer holds (nanochat.encoding): tiktoken over the learned ranks, or an imported model's Hugging Face
tokenizer. On disk a tokenizer is its encoding's files in one directory (never pickle).

Ids 0..255 are bytes, then the merges, then the special tokens. Text is always encoded as ordinary text:
special-token text typed by a user stays plain bytes; special ids only enter through `encode_special`,
`prepend`/`append` and the chat renderers.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import rustbpe
import torch

from nanochat.common import UserError, get_base_dir
from nanochat.encoding import SPECIAL_TOKENS, HFEncoding, TiktokenEncoding, load_encoding

# GPT-4's split pattern with digits in ones and twos (`\p{N}{1,2}`; GPT-4 groups threes), which spends fewer tokens
# on numbers in a small vocabulary. Passed to rustbpe explicitly: its default is GPT-4's own, as in the reference.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class Tokenizer:
    """An encoding (nanochat's own or an imported one) with nanochat's special tokens and chat format."""

    def __init__(self, encoding: TiktokenEncoding | HFEncoding):
        self.encoding = encoding
        self.special_tokens = encoding.special_tokens
        self.bos_token_id = self.special_tokens["<|bos|>"]

    @property
    def mergeable_ranks(self) -> dict[bytes, int] | None:
        """tiktoken's ranks (bytes -> id); None for an imported tokenizer, which is not ours to export."""
        return self.encoding.mergeable_ranks if isinstance(self.encoding, TiktokenEncoding) else None

    @property
    def pattern(self) -> str | None:
        """The split pattern of a nanochat-trained tokenizer; None for an imported one."""
        return self.encoding.pattern if isinstance(self.encoding, TiktokenEncoding) else None

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
        return cls(TiktokenEncoding(ranks, pattern, {"requested_vocab_size": vocab_size}))

    def save(self, directory: str | Path) -> Path:
        """Write the encoding's files into `directory` (created if needed), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoding.save(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save`; a missing or damaged file is a UserError that names it."""
        return cls(load_encoding(Path(directory)))

    # -----------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode_special(self, name: str) -> int:
        """The id of a special token such as "<|assistant_end|>"."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def token_bytes(self) -> torch.Tensor:
        """Byte length of every token (int64, length vocab_size); 0 for special tokens. For bits-per-byte."""
        return torch.tensor(self.encoding.token_bytes(), dtype=torch.long)

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
            return head + self.encoding.encode_ordinary(text) + tail
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        return [head + ids + tail for ids in self.encoding.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids: list[int]) -> str:
        """Ids back to text; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self.encoding.decode(list(ids))

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
                add(self.encoding.encode_ordinary(message["content"]), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            for part in _assistant_parts(message["content"], i):
                text_ids = self.encoding.encode_ordinary(part["text"])
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
    return Tokenizer.load(get_base_dir() / "tokenizer")
