"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary, so runs with different tokenizers
compare. bpb = Σ nats over target tokens / (ln 2 · Σ UTF-8 bytes of those tokens), where special tokens (0 bytes)
and ignored targets (-1) count in neither sum; both sums are added up over ranks before the division.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nanochat.common import accumulator_dtype, model_device


@torch.no_grad()
def evaluate_bpb(model, batches: Iterator, num_steps: int, token_bytes: torch.Tensor) -> float:
    """bpb over `num_steps` batches of `(inputs, targets, ...)`; `token_bytes[id]` is each token's byte length."""
    # on the model's device even when no step runs: NCCL reduces only device tensors
    device = model_device(model)
    total_nats = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    for _ in range(num_steps):
        inputs, targets = next(batches)[:2]  # already on the model's device (the loader puts them there)
        losses = model(inputs, targets, loss_reduction="none").reshape(-1)
        flat = targets.reshape(-1)
        num_bytes = torch.where(flat >= 0, token_bytes[flat.clamp(min=0)], torch.zeros_like(flat))
        total_nats += (losses.to(total_nats.dtype) * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("nan")
    return (total_nats / (math.log(2) * total_bytes)).item()
