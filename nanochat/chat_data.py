"""Conversations -> training batches for mid-training and SFT, resumable, split across ranks.

Both loaders walk a task in order: rank r of w takes conversation `(p·w + r) mod len(task)` at its position p,
wrapping into further epochs. A conversation is rendered with the chat template; targets keep the loss mask
(-1 on BOS, user text, tool output and padding), so only what the assistant writes is trained on.

- `PackedChatBatches` (mid): rows of `seq_len + 1` tokens filled with whole conversations (BOS-aligned) by
  best fit from a small buffer; when nothing in the buffer fits the rest of a row, the shortest conversation is
  cropped to fill it. One epoch is about `estimate_packed_rows` rows.
- `PaddedChatBatches` (SFT): one conversation per row, padded to the longest row of the batch.

Conversations longer than a row are cropped to fit and counted (`overlong` in the state), never allowed to fill
several rows. The state (`state_dict()`) is a few integers plus the positions still in the buffer, so resuming
re-renders them and continues bit for bit.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from nanochat.common import UserError, accumulator_dtype, sum_across_ranks
from tasks.common import Task

IGNORE = -1


def render(tokenizer, conversation: dict, max_tokens: int) -> tuple[list[int], list[int], bool]:
    """(ids, mask, was_cropped) for a conversation cut to at most `max_tokens` tokens."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_tokens + 1)
    return ids[:max_tokens], mask[:max_tokens], len(ids) > max_tokens


def row_tensors(rows: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs/targets (B, length - 1) from rows of (ids, mask); a target is IGNORE where its mask is 0 or padding."""
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    targets = np.full((len(rows), length), IGNORE, dtype=np.int64)
    for i, (row_ids, row_mask) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n] = row_ids
        targets[i, :n] = np.where(np.asarray(row_mask, dtype=bool), ids[i, :n], IGNORE)
    return torch.from_numpy(np.ascontiguousarray(ids[:, :-1])), torch.from_numpy(np.ascontiguousarray(targets[:, 1:]))


class ChatBatches:
    """Shared walk over the task: rank-strided positions, epochs, overlong counting, device transfer."""

    def __init__(self, tokenizer, task: Task, batch_size: int, seq_len: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        if len(task) == 0:
            raise UserError("the conversation mixture is empty; check the data and the task sizes")
        self.tokenizer, self.task = tokenizer, task
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.position = 0  # conversations this rank has taken (rendered) so far
        self.overlong = 0

    def task_index(self, position: int) -> int:
        return (position * self.world_size + self.rank) % len(self.task)

    @property
    def epoch(self) -> float:
        """Fraction of passes over the task consumed so far (all ranks together)."""
        return self.position * self.world_size / len(self.task)

    def render_position(self, position: int) -> tuple[list[int], list[int], bool]:
        return render(self.tokenizer, self.task[self.task_index(position)], self.seq_len + 1)

    def take(self) -> tuple[int, list[int], list[int]]:
        """Render this rank's next conversation, counting it as overlong when it had to be cropped."""
        position = self.position
        ids, mask, cropped = self.render_position(position)
        self.position += 1
        self.overlong += int(cropped)
        return position, ids, mask

    def to_device(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self.device.type == "cuda"
        if pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=pin), targets.to(self.device, non_blocking=pin)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"position": self.position, "overlong": self.overlong}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.overlong = state["position"], state["overlong"]


class PaddedChatBatches(ChatBatches):
    """SFT: one conversation per row, padded to the batch's longest row (at most seq_len + 1 tokens)."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.take()[1:] for _ in range(self.batch_size)]
        length = max(len(ids) for ids, _ in rows)
        inputs, targets = row_tensors(rows, length, self.tokenizer.bos_token_id)
        return self.to_device(inputs, targets)


class PackedChatBatches(ChatBatches):
    """Mid-training: rows of exactly seq_len + 1 tokens, each starting at a conversation's BOS."""

    def __init__(self, *args, buffer_size: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer_size = buffer_size
        self.buffer: dict[int, tuple[list[int], list[int]]] = {}  # position -> rendered, in take order

    def fill_buffer(self) -> None:
        while len(self.buffer) < self.buffer_size:
            position, ids, mask = self.take()
            self.buffer[position] = (ids, mask)

    def next_row(self) -> tuple[list[int], list[int]]:
        row_ids: list[int] = []
        row_mask: list[int] = []
        room = self.seq_len + 1
        while room > 0:
            self.fill_buffer()
            fitting = [p for p, (ids, _) in self.buffer.items() if len(ids) <= room]
            if fitting:
                position = max(fitting, key=lambda p: len(self.buffer[p][0]))  # best fit: the largest that fits
            else:
                position = min(self.buffer, key=lambda p: len(self.buffer[p][0]))  # crop the shortest
            ids, mask = self.buffer.pop(position)
            row_ids += ids[:room]
            row_mask += mask[:room]
            room = self.seq_len + 1 - len(row_ids)
        return row_ids, row_mask

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.next_row() for _ in range(self.batch_size)]
        inputs, targets = row_tensors(rows, self.seq_len + 1, self.tokenizer.bos_token_id)
        return self.to_device(inputs, targets)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer = {p: self.render_position(p)[:2] for p in state["buffer"]}


def estimate_packed_rows(tokenizer, task: Task, seq_len: int, sample_size: int = 2000, seed: int = 0) -> int:
    """Rows of seq_len + 1 tokens that one epoch of `task` fills, from a sample of its conversations."""
    indices = list(range(len(task)))
    if len(indices) > sample_size:
        indices = random.Random(seed).sample(indices, sample_size)
    tokens = sum(len(render(tokenizer, task[i], seq_len + 1)[0]) for i in indices)
    return max(1, math.ceil(tokens * len(task) / len(indices) / (seq_len + 1)))


def loader_totals(batches: ChatBatches) -> dict[str, int]:
    """Conversations taken and cropped so far, summed over ranks (each rank counts only its own)."""
    counts = sum_across_ranks([batches.position, batches.overlong], batches.device)
    return {"conversations": int(counts[0].item()), "overlong": int(counts[1].item())}


@torch.no_grad()
def evaluate_chat_loss(model, batches, num_batches: int) -> float:
    """Mean loss per trained token over `num_batches` batches, summed over every rank."""
    total = torch.zeros(2, dtype=accumulator_dtype(batches.device), device=batches.device)
    for _ in range(num_batches):
        inputs, targets = next(batches)
        total[0] += model(inputs, targets, loss_reduction="sum").to(total.dtype)
        total[1] += (targets != IGNORE).sum()
    total = sum_across_ranks(total, batches.device)
    return (total[0] / total[1].clamp(min=1)).item()
