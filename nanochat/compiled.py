"""torch.compile for training when row lengths vary (SFT's padded conversations, RL's rollouts).

With `dynamic=False` every new row length is a new compile, and after dynamo's recompile limit (8) the model
silently runs uncompiled; `dynamic=None` does not help here: symbolic lengths break the graph at attention's
causal flag and it keeps recompiling. So lengths are padded up to a few power-of-two buckets (64, 128, ...,
max_seq_len: six at 2048), each compiled once. Padded targets are ignored (-1) and padded positions come after
every real one, so under causal attention the losses of the real tokens do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.chat_data import IGNORE

SMALLEST_BUCKET = 64


def bucket_length(length: int, max_len: int) -> int:
    """The smallest power-of-two multiple of 64 that holds `length`, capped at `max_len` (never below length)."""
    bucket = SMALLEST_BUCKET
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, max_len))


class BucketedCompile:
    """Called like the model: `(inputs, targets=None, *, doc_ids=None, loss_reduction="mean")`."""

    def __init__(self, model: torch.nn.Module):
        self.compiled = torch.compile(model, dynamic=False)
        self.max_len = model.config.max_seq_len

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, *, doc_ids=None,
                 loss_reduction: str = "mean"):
        length = inputs.size(1)
        pad = bucket_length(length, self.max_len) - length
        if pad:
            inputs = F.pad(inputs, (0, pad), value=0)
            targets = None if targets is None else F.pad(targets, (0, pad), value=IGNORE)
            # the last document runs on into the padding, so no position sees a new document start
            doc_ids = None if doc_ids is None else torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, pad)], dim=1)
        if targets is None:
            return self.compiled(inputs, doc_ids=doc_ids)[:, :length]
        out = self.compiled(inputs, targets, doc_ids=doc_ids, loss_reduction=loss_reduction)
        return out[:, :length] if loss_reduction == "none" else out
