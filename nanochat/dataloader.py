"""The pretraining loader: shards -> tokens -> packed (B, T) batches, per rank, resumable token for token.

    loader = PretrainLoader(tokenizer, batch_size=B, seq_len=T, split="train", device=device,
                            rank=r, world_size=w, doc_mask=False)
    inputs, targets = next(loader)            # (B, T) int64; with doc_mask=True also doc_ids (B, T)
    state = loader.state_dict()               # JSON-able; PretrainLoader(...).load_state_dict(state) resumes

Reading: rank r of w takes the split's row groups r, r+w, r+2w, ... (all shards but the last for train, the
last for val) and cycles through them forever, counting epochs. A split with fewer row groups than ranks (a
small val shard) is shared by documents instead: rank r keeps documents r, r+w, ... of every row group. A background thread reads and tokenizes row
groups ahead of the trainer (batch encode, BOS prepended to every document).

Packing (`packing=`) fills each row of T+1 tokens from a buffer of tokenized pieces, best fit first: it takes
the longest whole document that still fits the space left. When none fits:
- "continue" (default) fills the space with the head of the longest buffered document and puts the rest back
  as a *continuation* piece. A continuation only ever starts a row, so every row begins at a document start
  (BOS) or mid-document with nothing but that document before it, and nothing is dropped. The continuation
  repeats the head's last token as its first (an input only), so every token of a document is a target exactly
  once. It carries no BOS: BOS keeps meaning "a document starts here", as at inference; a BOS before
  mid-sentence text would teach the model that documents open mid-sentence, and position 0 serves as the
  attention sink whatever its token. A continuation longer than a row fills whole rows until it runs out.
- "crop" (the original rule, kept so runs saved with it resume exactly) crops the shortest document to the
  space and drops its remainder; long documents pile up in the buffer, so this drops ~30-75 % of the tokens
  read on real shards (bench/dataloader.py measures both).
doc_ids number the pieces of a row 0, 1, 2, ... (a continuation that opens a row is piece 0).
The loader counts tokens read, dropped and trained (`stats()`); trained = read - dropped - still buffered.

Exact resume: the state holds the reading cursor (epoch, shard, row group, document), the token counts and,
instead of the buffered tokens, a reference (shard, row group, document, first token) per buffered piece;
loading re-reads and re-tokenizes those few row groups, so the next batch is the one the saved run would have
produced. States saved before packing had a name (version 1) were "crop" states and still load.
"""
from __future__ import annotations

import bisect
import math
import queue
from collections import deque
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.common import UserError
from nanochat.shards import MAKE_SHARDS_HINT, data_dir, read_row_group, row_groups, split_shards

STATE_VERSION = 2
PACKINGS = ("continue", "crop")
PREFETCH_GROUPS = 2


class GroupTokenizer:
    """Reads one of this rank's row groups and returns its documents as int32 token arrays starting with BOS."""

    def __init__(self, tokenizer, groups: list[tuple[Path, int]], num_threads: int,
                 doc_slices: list[slice] | None = None):
        self.tokenizer, self.groups, self.num_threads = tokenizer, groups, num_threads
        self.doc_slices = doc_slices or [slice(None)] * len(groups)

    def __call__(self, position: int) -> list[np.ndarray]:
        path, group = self.groups[position]
        try:
            texts = read_row_group(path, group)
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"cannot read {path} row group {group} ({exc}); {MAKE_SHARDS_HINT}") from exc
        if not texts:
            raise UserError(f"{path} row group {group} is empty; {MAKE_SHARDS_HINT}")
        texts = texts[self.doc_slices[position]]
        token_lists = self.tokenizer.encode(texts, prepend=self.tokenizer.bos_token_id, num_threads=self.num_threads)
        return [np.asarray(tokens, dtype=np.int32) for tokens in token_lists]


class TokenizingReader(threading.Thread):
    """Tokenizes row groups from a cursor onwards and queues (position, epoch, first_doc, docs), at most
    PREFETCH_GROUPS groups ahead of the consumer (tokenized or in progress), so a short-lived loader (a val
    evaluation) wastes little work. It holds no reference to the loader, so a dropped loader is collected."""

    def __init__(self, tokenize: GroupTokenizer, position: int, epoch: int, first_doc: int):
        super().__init__(daemon=True, name="nanochat-tokenizer")
        self.tokenize, self.position, self.epoch, self.first_doc = tokenize, position, epoch, first_doc
        self.out: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(PREFETCH_GROUPS)  # released by the consumer as it takes a group
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            position, epoch, first_doc = self.position, self.epoch, self.first_doc
            while True:
                while not self.slots.acquire(timeout=0.1):
                    if self.stopped.is_set():
                        return
                if self.stopped.is_set():
                    return
                self.out.put((position, epoch, first_doc, self.tokenize(position)[first_doc:]))
                position, first_doc = position + 1, 0
                if position == len(self.tokenize.groups):
                    position, epoch = 0, epoch + 1
        except BaseException as exc:  # handed to the consumer, which re-raises it in the training thread
            self.out.put(exc)

    def get(self):
        item = self.out.get()
        self.slots.release()
        return item

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


def share_documents(groups: list[tuple[Path, int]], rank: int, world_size: int, split: str) -> list[slice]:
    """Per row group, the slice of documents rank r keeps: those whose index across the split is r mod w."""
    slices, offset = [], 0
    for path, group in groups:
        slices.append(slice((rank - offset) % world_size, None, world_size))
        offset += pq.ParquetFile(path).metadata.row_group(group).num_rows
    if offset < world_size:
        raise UserError(f"the {split} split has {offset} documents, fewer than {world_size} ranks; "
                        f"use fewer ranks or more data ({MAKE_SHARDS_HINT})")
    return slices


def dropped_percent(stats: dict[str, int]) -> float:
    """Share of the tokens packing has consumed (read minus still buffered) that it dropped."""
    consumed = stats["tokens_trained"] + stats["tokens_dropped"]
    return 100.0 * stats["tokens_dropped"] / consumed if consumed else 0.0


def describe_stats(stats: dict[str, int]) -> str:
    return (f"read {stats['tokens_read']:,} tokens, trained {stats['tokens_trained']:,} "
            f"({dropped_percent(stats):.1f} % dropped), epoch {stats['epoch']}")


class PretrainLoader:
    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train",
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, doc_mask: bool = False,
                 buffer_docs: int = 1000, directory: Path | None = None, tokenizer_threads: int = 4,
                 packing: str = "continue"):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, {world_size}), got {rank}")
        if packing not in PACKINGS:
            raise UserError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.split, self.device, self.doc_mask, self.packing = split, torch.device(device), doc_mask, packing
        self.rank, self.world_size = rank, world_size
        self.buffer_docs = max(1, buffer_docs)
        self.directory = directory or data_dir()
        all_groups = row_groups(split, self.directory)
        if len(all_groups) >= world_size:
            self.groups, doc_slices = all_groups[rank::world_size], None
        else:  # too few row groups (a small val shard): every rank reads them all, keeping every w-th document
            self.groups, doc_slices = all_groups, share_documents(all_groups, rank, world_size, split)
        self.shard_names = sorted({path.name for path, _ in self.groups})
        self.tokenize_group = GroupTokenizer(tokenizer, self.groups, tokenizer_threads, doc_slices)
        # Whole documents, sorted by length, with a (position, doc) reference for each ...
        self.lengths: list[int] = []
        self.docs: list[np.ndarray] = []
        self.refs: list[tuple[int, int]] = []
        # ... and continuation pieces, (tokens, (position, doc, first token)), oldest first; each opens a row.
        self.continued: deque[tuple[np.ndarray, tuple[int, int, int]]] = deque()
        self.tokens_read = self.tokens_dropped = 0
        # Cursor: the next document to pull is `pending[pending_index]`, from group `position` of `epoch`.
        self.epoch, self.position, self.pending_first, self.pending_index = 0, 0, 0, 0
        self.pending: list[np.ndarray] = []
        self.reader: TokenizingReader | None = None
        self.pin = self.device.type == "cuda"

    # -- reading --------------------------------------------------------------------------------------------

    def start_reader(self) -> None:
        cursor = self.pending_first + self.pending_index
        self.reader = TokenizingReader(self.tokenize_group, self.position, self.epoch, cursor)
        self.reader.start()
        self.pending, self.pending_first, self.pending_index = [], cursor, 0

    def next_document(self) -> tuple[np.ndarray, tuple[int, int]]:
        if self.reader is None:
            self.start_reader()
        while self.pending_index == len(self.pending):
            item = self.reader.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            self.position, self.epoch, self.pending_first, self.pending = item
            self.pending_index = 0
        doc = self.pending[self.pending_index]
        ref = (self.position, self.pending_first + self.pending_index)
        self.pending_index += 1
        self.tokens_read += len(doc)
        return doc, ref

    def add_to_buffer(self, doc: np.ndarray, ref: tuple[int, int]) -> None:
        at = bisect.bisect_right(self.lengths, len(doc))
        self.lengths.insert(at, len(doc))
        self.docs.insert(at, doc)
        self.refs.insert(at, ref)

    def take_from_buffer(self, at: int) -> tuple[np.ndarray, tuple[int, int, int]]:
        self.lengths.pop(at)
        position, doc = self.refs.pop(at)
        return self.docs.pop(at), (position, doc, 0)

    # -- packing --------------------------------------------------------------------------------------------

    def next_piece(self, space: int, row_start: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
        """The piece that goes next into a row with `space` tokens left (see the module docstring)."""
        if row_start and self.continued:
            return self.continued.popleft()
        while len(self.docs) < self.buffer_docs:
            self.add_to_buffer(*self.next_document())
        fits = bisect.bisect_right(self.lengths, space)
        if fits:
            return self.take_from_buffer(fits - 1)  # the longest that fits
        return self.take_from_buffer(-1 if self.packing == "continue" else 0)

    def pack_row(self, row: np.ndarray, doc_ids: np.ndarray) -> None:
        """Fill one row of T+1 tokens; doc_ids numbers the pieces in the row 0, 1, 2, ..."""
        filled, piece_number = 0, 0
        while filled < len(row):
            space = len(row) - filled
            piece, (position, doc, first) = self.next_piece(space, row_start=filled == 0)
            if len(piece) > space:
                if self.packing == "continue":  # the rest opens a later row, repeating the last token placed
                    self.continued.append((piece[space - 1:], (position, doc, first + space - 1)))
                else:
                    self.tokens_dropped += len(piece) - space
                piece = piece[:space]
            row[filled:filled + len(piece)] = piece
            doc_ids[filled:filled + len(piece)] = piece_number
            filled += len(piece)
            piece_number += 1

    def stats(self) -> dict[str, int]:
        """Tokens read from the shards, dropped by packing, and trained (placed in rows, each token once)."""
        buffered = sum(self.lengths) + sum(len(piece) - 1 for piece, _ in self.continued)
        return {"tokens_read": self.tokens_read, "tokens_dropped": self.tokens_dropped,
                "tokens_trained": self.tokens_read - self.tokens_dropped - buffered, "epoch": self.epoch}

    def stats_all_ranks(self) -> dict[str, int]:
        """stats() summed over the ranks (epoch: the furthest); a collective, so every rank must call it."""
        stats = self.stats()
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return stats
        keys = ("tokens_read", "tokens_dropped", "tokens_trained")
        totals = torch.tensor([stats[key] for key in keys], dtype=torch.int64, device=self.device)
        epoch = torch.tensor([stats["epoch"]], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(epoch, op=torch.distributed.ReduceOp.MAX)
        return {**dict(zip(keys, totals.tolist())), "epoch": int(epoch)}

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self):
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        doc_ids = np.empty_like(rows)
        for b in range(self.batch_size):
            self.pack_row(rows[b], doc_ids[b])
        rows = torch.from_numpy(rows)
        batch = [rows[:, :-1], rows[:, 1:]] + ([torch.from_numpy(doc_ids[:, :-1])] if self.doc_mask else [])
        return tuple(self.to_device(t.contiguous()) for t in batch)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.pin:
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The exact position, JSON-able: cursor, counts, and a reference to each buffered piece."""
        def where(position: int) -> list:
            path, group = self.groups[position]
            return [path.name, group]

        cursor_doc = self.pending_first + self.pending_index
        return {"version": STATE_VERSION, "packing": self.packing, "data": self.directory.name, "split": self.split,
                "rank": self.rank, "world_size": self.world_size, "epoch": self.epoch, "shard": where(self.position)[0],
                "row_group": where(self.position)[1], "doc": cursor_doc,
                "buffer": [where(pos) + [doc] for pos, doc in self.refs],
                "continued": [where(pos) + [doc, first] for _, (pos, doc, first) in self.continued],
                "tokens_read": self.tokens_read, "tokens_dropped": self.tokens_dropped}

    def load_state_dict(self, state: dict) -> None:
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise UserError(f"loader state version {version} is not {STATE_VERSION}; "
                            "it was saved by another nanochat version, so start without --resume")
        packing = state.get("packing", "crop")  # version 1 predates the choice and always cropped
        if packing != self.packing:
            raise UserError(f"loader state was saved with packing {packing}, this run packs with {self.packing}; "
                            f"resume with --packing {packing}")
        if state.get("data", self.directory.name) != self.directory.name:
            raise UserError(f"loader state was saved reading {state['data']}/, this run reads {self.directory}; "
                            f"resume with --data_source {state['data']}")
        if (state["world_size"], state["rank"], state["split"]) != (self.world_size, self.rank, self.split):
            raise UserError(f"loader state was saved by rank {state['rank']} of {state['world_size']} "
                            f"({state['split']}); resume with the same number of ranks")
        self.close()
        index = {(path.name, group): position for position, (path, group) in enumerate(self.groups)}
        try:
            self.position = index[(state["shard"], state["row_group"])]
            refs = [(index[(shard, group)], doc) for shard, group, doc in state["buffer"]]
            continued = [(index[(shard, group)], doc, first) for shard, group, doc, first in state.get("continued", [])]
        except KeyError as exc:
            raise UserError(f"loader state points at {exc.args[0]}, which is not among this rank's shards "
                            f"({', '.join(self.shard_names)}); resume with the same base_data") from exc
        self.epoch, self.pending_first, self.pending_index, self.pending = state["epoch"], state["doc"], 0, []
        self.tokens_read, self.tokens_dropped = state.get("tokens_read", 0), state.get("tokens_dropped", 0)
        tokenized: dict[int, list[np.ndarray]] = {}

        def tokens(position: int, doc: int) -> np.ndarray:
            if position not in tokenized:
                tokenized[position] = self.tokenize_group(position)
            return tokenized[position][doc]

        self.lengths, self.docs, self.refs = [], [], []
        for position, doc in refs:  # stored in buffer order, which is already sorted by length
            self.lengths.append(len(tokens(position, doc)))
            self.docs.append(tokens(position, doc))
            self.refs.append((position, doc))
        self.continued = deque((tokens(position, doc)[first:], (position, doc, first))
                               for position, doc, first in continued)

    def close(self) -> None:
        """Stop the background reader (also done on load_state_dict); the loader restarts it on next()."""
        if getattr(self, "reader", None) is not None:
            self.reader.stop()
            self.reader = None

    def __del__(self):
        self.close()


def measure_shard_yield(tokenizer, directory: Path | None, seq_len: int, packing: str,
                        sample_groups: int = 4, sample_tokens: int = 1_000_000) -> float:
    """Training tokens one train shard yields with this tokenizer and packing: tokens per document (BOS
    included) on the first `sample_groups` row groups × documents per train shard × the share packing keeps
    (all with "continue"; measured over ~sample_tokens with "crop")."""
    loader = PretrainLoader(tokenizer, batch_size=8, seq_len=seq_len, directory=directory, packing=packing)
    try:
        sample = [doc for position in range(min(sample_groups, len(loader.groups)))
                  for doc in loader.tokenize_group(position)]
        kept = 1.0
        if packing == "crop":
            for _ in range(max(1, sample_tokens // (8 * seq_len))):
                next(loader)
            kept -= dropped_percent(loader.stats()) / 100
    finally:
        loader.close()
    shards = split_shards("train", directory)
    docs_per_shard = sum(pq.ParquetFile(path).metadata.num_rows for path in shards) / len(shards)
    return sum(len(doc) for doc in sample) / len(sample) * docs_per_shard * kept


def train_shards_needed(tokens: int, shard_yield: float, margin: float = 0.1) -> int:
    """Train shards to hold `tokens` training tokens once, plus `margin` of spare."""
    return max(1, math.ceil(tokens * (1 + margin) / shard_yield))


def repeat_warning(tokens: int, shard_yield: float, num_shards: int) -> str | None:
    """A loud line when a run would read its train shards more than once; None when they suffice."""
    available = shard_yield * num_shards
    if tokens <= available:
        return None
    return (f"WARNING: this run trains on {tokens:,} tokens but the {num_shards} train shard(s) yield "
            f"~{available:,.0f} ({shard_yield:,.0f} per shard, measured): it will repeat data "
            f"~{tokens / available:.1f}x; download at least {train_shards_needed(tokens, shard_yield)} train shards "
            "(python -m nanochat.dataset --source NAME -n N) to see each token once")
