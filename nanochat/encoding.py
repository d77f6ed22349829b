"""The two encodings a `Tokenizer` can hold, each with its own files, save/load and token byte lengths.

    TiktokenEncoding   nanochat's own: rustbpe-learned ranks run by tiktoken
        tokenizer.tiktoken      tiktoken's rank format: one `base64(token bytes) rank` per line
        tokenizer.json          split pattern, special tokens with ids, vocab size, training stats
    HFEncoding         an imported model's: a Hugging Face `tokenizers` tokenizer with our special tokens
                       mapped onto it (`HFEncoding.with_our_specials`, called by nanochat.hf_import)
        hf_tokenizer.json       the checkpoint's tokenizer.json, our special tokens added
        hf_special_tokens.json  our special-token names -> ids

Both speak the same small interface: `special_tokens` (name -> id), `n_vocab`, `encode_ordinary`,
`encode_ordinary_batch`, `decode`, `token_bytes()`, `save(directory)` and `load(directory)`; `load_encoding`
picks the class by the files present. Never pickle. This module imports nothing of nanochat but `common`, so
the tokenizer, the import and the export can all use it.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer as HFTokenizerCore

from nanochat.common import UserError, atomic_write

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call the assistant writes
    "<|output_start|>", "<|output_end|>",  # the tool's output, written by the engine, not trained on
]

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
HF_TOKENIZER_FILE = "hf_tokenizer.json"
HF_SPECIALS_FILE = "hf_special_tokens.json"
TRAIN_HINT = "train one with `python -m scripts.tok_train`"


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are shifted
    to code points 256.. in order, so every byte sequence is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


# ---------------------------------------------------------------------------------------------------------
# nanochat's own: tiktoken over rustbpe's ranks

class TiktokenEncoding:
    """Ids 0..255 are bytes, then the merges, then the special tokens."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, stats: dict | None = None):
        num_ranks = len(mergeable_ranks)
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.stats = dict(stats or {})
        self.special_tokens = {name: num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.n_vocab = self.enc.n_vocab

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self) -> list[int]:
        lengths = [0] * self.n_vocab
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def save(self, directory: Path) -> None:
        ranks = self.mergeable_ranks
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
        atomic_write(directory / RANKS_FILE, "".join(lines))
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens, "vocab_size": self.n_vocab,
                "num_merges": len(ranks) - 256, "stats": self.stats}
        atomic_write(directory / META_FILE, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TiktokenEncoding:
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
        ranks = read_ranks(ranks_path)
        expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if special_tokens != expected:
            raise UserError(f"{meta_path} lists special tokens {special_tokens}, but this nanochat expects "
                            f"{expected}; {TRAIN_HINT} to rebuild it")
        try:
            return cls(ranks, pattern, stats)
        except ValueError as exc:
            raise UserError(f"{meta_path} is damaged ({exc}); {TRAIN_HINT} to rebuild it") from exc


def read_ranks(path: Path) -> dict[bytes, int]:
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


# ---------------------------------------------------------------------------------------------------------
# An imported model's: Hugging Face `tokenizers`

class HFEncoding:
    """A `tokenizers` Tokenizer plus the ids our special-token names map to (set by nanochat.hf_import)."""

    def __init__(self, core: HFTokenizerCore, special_tokens: dict[str, int]):
        self.core = core
        # special-token text typed by a user stays plain text, as with our own tokenizer
        self.core.encode_special_tokens = True
        self.special_tokens = dict(special_tokens)
        self.n_vocab = hf_vocab_size(core)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.core.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [e.ids for e in self.core.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.core.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length per token (byte-level vocabularies read exactly), 0 for special tokens."""
        lengths = [0] * self.n_vocab
        specials = {t.content for t in self.core.get_added_tokens_decoder().values() if t.special}
        for token, token_id in self.core.get_vocab(with_added_tokens=False).items():
            if token in specials:
                continue
            if all(char in CHAR_TO_BYTE for char in token):
                lengths[token_id] = len(token)
            else:
                lengths[token_id] = len(self.core.decode([token_id]).encode("utf-8"))
        return lengths

    def save(self, directory: Path) -> None:
        atomic_write(directory / HF_TOKENIZER_FILE, self.core.to_str())
        atomic_write(directory / HF_SPECIALS_FILE, json.dumps(self.special_tokens, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> HFEncoding:
        try:
            core = HFTokenizerCore.from_file(str(directory / HF_TOKENIZER_FILE))
            specials = json.loads((directory / HF_SPECIALS_FILE).read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file, json a ValueError
            raise UserError(f"the imported tokenizer in {directory} is damaged ({exc}); import the model again "
                            "(python -m scripts.import_hf)") from exc
        missing = [name for name in SPECIAL_TOKENS if name not in specials]
        if missing:
            raise UserError(f"{directory / HF_SPECIALS_FILE} lacks {', '.join(missing)}; import the model again")
        return cls(core, specials)


    @classmethod
    def with_our_specials(cls, tokenizer_json: str, bos_id: int | None, eos_id: int | None,
                          model_vocab: int) -> tuple[HFEncoding, list[str]]:
        """A checkpoint's tokenizer.json with our special tokens: <|bos|> is its BOS, <|assistant_end|> its EOS,
        the others its own tokens of that name, else appended at `model_vocab`, `model_vocab + 1`, ...
        Returns the encoding and the appended names (the model must grow rows for them)."""
        data = json.loads(tokenizer_json)
        core = HFTokenizerCore.from_str(tokenizer_json)
        specials: dict[str, int] = {}
        if bos_id is not None:
            specials["<|bos|>"] = bos_id
        if eos_id is not None:
            specials["<|assistant_end|>"] = eos_id
        if hf_vocab_size(core) > model_vocab:
            raise UserError(f"tokenizer.json has {hf_vocab_size(core)} tokens but the model's vocab_size is "
                            f"{model_vocab}; they do not belong together")
        added = []
        next_id = model_vocab
        for name in SPECIAL_TOKENS:
            if name in specials:
                continue
            existing = core.token_to_id(name)
            if existing is not None:
                specials[name] = existing
                continue
            data.setdefault("added_tokens", []).append({"id": next_id, "content": name, "single_word": False,
                                                        "lstrip": False, "rstrip": False, "normalized": False,
                                                        "special": True})
            specials[name] = next_id
            added.append(name)
            next_id += 1
        core = HFTokenizerCore.from_str(json.dumps(data, ensure_ascii=False))
        for name in added:
            if core.token_to_id(name) != specials[name]:
                raise UserError(f"could not add {name} to the imported tokenizer at id {specials[name]}")
        return cls(core, specials), added


def hf_vocab_size(core: HFTokenizerCore) -> int:
    return max(max(core.get_vocab(with_added_tokens=True).values()) + 1, core.get_vocab_size(with_added_tokens=True))


def is_hf_encoding_dir(directory: Path) -> bool:
    return (Path(directory) / HF_TOKENIZER_FILE).is_file()


def load_encoding(directory: Path) -> TiktokenEncoding | HFEncoding:
    """The encoding saved in `directory`: an imported one when its files are there, else nanochat's own."""
    directory = Path(directory)
    if is_hf_encoding_dir(directory):
        return HFEncoding.load(directory)
    return TiktokenEncoding.load(directory)
