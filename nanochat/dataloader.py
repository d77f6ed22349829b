"""The pretraining loader: shards -> tokens -> packed (B, T) batches, per rank, resumable token for token.

    loader = PretrainLoader(tokenizer, batch_size=B, seq_len=T, split="train", device=device,
                            rank=r, world_size=w, doc_mask=False)
    inputs, targets = next(loader)            # (B, T) int64; with doc_mask=True also doc_ids (B, T)
    state = loader.state_dict()               # JSON-able; PretrainLoader(...).load_state_dict(state) resumes

Reading: rank r of w takes the split's row groups r, r+w, r+2w, ... (all shards but the last for train, the
last for val) and cycles through them forever, counting epochs. A split with fewer row groups than ranks (a
small val shard) is shared by documents instead: rank r keeps documents r, r+w, ... of every row group. A background thread reads and tokenizes row
groups ahead of the trainer (batch encode, BOS prepended to every document).

Packing is BOS-aligned best fit: each row of T+1 tokens is filled from a buffer of tokenized documents by
repeatedly taking the longest document that still fits; when none fits, the shortest one is cropped to fill the
row and its remainder dropped. So every row starts at a document start and only the leftover of a crop is lost.

Exact resume: the state holds the reading cursor (epoch, shard, row group, document) and, instead of the
buffered tokens, a reference (shard, row group, document) per buffered document; loading re-reads and
re-tokenizes those few row groups, so the next batch is the one the saved run would have produced.
"""
from __future__ import annotations

import bisect
import queue
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.common import UserError
from nanochat.dataset import MAKE_SHARDS_HINT, read_row_group, row_groups

STATE_VERSION = 1
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


class PretrainLoader:
    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train",
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, doc_mask: bool = False,
                 buffer_docs: int = 1000, directory: Path | None = None, tokenizer_threads: int = 4):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.split, self.device, self.doc_mask = split, torch.device(device), doc_mask
        self.rank, self.world_size = rank, world_size
        self.buffer_docs = max(1, buffer_docs)
        all_groups = row_groups(split, directory)
        if len(all_groups) >= world_size:
            self.groups, doc_slices = all_groups[rank::world_size], None
        else:  # too few row groups (a small val shard): every rank reads them all, keeping every w-th document
            self.groups, doc_slices = all_groups, share_documents(all_groups, rank, world_size, split)
        self.shard_names = sorted({path.name for path, _ in self.groups})
        self.tokenize_group = GroupTokenizer(tokenizer, self.groups, tokenizer_threads, doc_slices)
        # Buffer of tokenized documents, sorted by length, with a (position, doc) reference for each.
        self.lengths: list[int] = []
        self.docs: list[np.ndarray] = []
        self.refs: list[tuple[int, int]] = []
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
        return doc, ref

    def add_to_buffer(self, doc: np.ndarray, ref: tuple[int, int]) -> None:
        at = bisect.bisect_right(self.lengths, len(doc))
        self.lengths.insert(at, len(doc))
        self.docs.insert(at, doc)
        self.refs.insert(at, ref)

    def take_from_buffer(self, at: int) -> np.ndarray:
        self.lengths.pop(at)
        self.refs.pop(at)
        return self.docs.pop(at)

    # -- packing --------------------------------------------------------------------------------------------

    def pack_row(self, row: np.ndarray, doc_ids: np.ndarray) -> None:
        """Fill one row of T+1 tokens by best fit; doc_ids numbers the documents in the row 0, 1, 2, ..."""
        filled, doc_number = 0, 0
        while filled < len(row):
            while len(self.docs) < self.buffer_docs:
                self.add_to_buffer(*self.next_document())
            space = len(row) - filled
            fits = bisect.bisect_right(self.lengths, space)
            doc = self.take_from_buffer(fits - 1 if fits else 0)[:space]  # longest that fits, else crop shortest
            row[filled:filled + len(doc)] = doc
            doc_ids[filled:filled + len(doc)] = doc_number
            filled += len(doc)
            doc_number += 1

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
        """The exact position, JSON-able: cursor plus a reference to each buffered document."""
        def where(position: int) -> list:
            path, group = self.groups[position]
            return [path.name, group]

        cursor_doc = self.pending_first + self.pending_index
        return {"version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "epoch": self.epoch, "shard": where(self.position)[0], "row_group": where(self.position)[1],
                "doc": cursor_doc, "buffer": [where(pos) + [doc] for pos, doc in self.refs]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')} is not {STATE_VERSION}; "
                            "it was saved by another nanochat version, so start without --resume")
        if (state["world_size"], state["rank"], state["split"]) != (self.world_size, self.rank, self.split):
            raise UserError(f"loader state was saved by rank {state['rank']} of {state['world_size']} "
                            f"({state['split']}); resume with the same number of ranks")
        self.close()
        index = {(path.name, group): position for position, (path, group) in enumerate(self.groups)}
        try:
            self.position = index[(state["shard"], state["row_group"])]
            refs = [(index[(shard, group)], doc) for shard, group, doc in state["buffer"]]
        except KeyError as exc:
            raise UserError(f"loader state points at {exc.args[0]}, which is not among this rank's shards "
                            f"({', '.join(self.shard_names)}); resume with the same base_data") from exc
        self.epoch, self.pending_first, self.pending_index, self.pending = state["epoch"], state["doc"], 0, []
        tokenized: dict[int, list[np.ndarray]] = {}
        self.lengths, self.docs, self.refs = [], [], []
        for position, doc in refs:  # stored in buffer order, which is already sorted by length
            if position not in tokenized:
                tokenized[position] = self.tokenize_group(position)
            self.lengths.append(len(tokenized[position][doc]))
            self.docs.append(tokenized[position][doc])
            self.refs.append((position, doc))

    def close(self) -> None:
        """Stop the background reader (also done on load_state_dict); the loader restarts it on next()."""
        if getattr(self, "reader", None) is not None:
            self.reader.stop()
            self.reader = None

    def __del__(self):
        self.close()
