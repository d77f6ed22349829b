"""Attention behind one function, and the inference cache that feeds it; gpt.py never picks a kernel.

    y = attend(q, k, v, window=None, doc_ids=None)   # q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D)

Queries are the last Tq of the Tk key positions (a KV cache holds the earlier ones). `window` is FA3's left
window: the query at position i sees keys j with i - window <= j <= i; None is the whole causal past. `doc_ids`
(B, T) keeps each query inside its own document (training rows only, Tq == Tk).

Which kernel runs:
- plain causal attention, and decode steps (a window just drops the keys it cannot see): SDPA, whose flash
  kernels run on CUDA and on CPU.
- Flash-Attention 3 (`flash_attn_interface`) when importable, on CUDA in bf16/fp16, plain or windowed, Tq == Tk.
- a window or documents when training on CUDA: FlexAttention, compiled, with a block mask built once per shape
  (windows) or once per doc_ids tensor (shared by every layer of one forward), so no dense T×T mask exists.
- a window or documents elsewhere: SDPA with a boolean mask. FlexAttention has no backward on CPU (torch 2.13),
  and SDPA's CPU flash kernel takes the mask without materialising the B·H·T² scores; at inference every new
  prompt length would recompile FlexAttention, while SDPA's memory-efficient CUDA kernel takes the mask as is.
GQA: SDPA gets `enable_gqa` where its fused kernels accept it (CPU; CUDA in half precision without a mask);
otherwise k/v are expanded to every query head so SDPA does not fall back to its B·H·T² math kernel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import flash_attn_interface as fa3  # Flash-Attention 3 (Hopper); optional, never required
except ImportError:
    fa3 = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
           doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    q_len, k_len = q.size(2), k.size(2)
    if window is not None and window >= k_len - 1:
        window = None  # the window covers every key there is
    if doc_ids is not None and q_len != k_len:
        raise ValueError("doc_ids cannot be combined with a KV cache")
    if doc_ids is None and q_len == 1:
        if window is not None:
            k, v = k[:, :, -(window + 1):], v[:, :, -(window + 1):]
        return sdpa(q, k, v, None)
    if doc_ids is None and q_len == k_len and fa3_usable(q):
        return flash3(q, k, v, window)
    if window is None and doc_ids is None:
        return sdpa(q, k, v, None if q_len == k_len else causal_mask(q_len, k_len, None, None, q.device))
    if q.is_cuda and q_len == k_len and torch.is_grad_enabled():
        return flex(q, k, v, window, doc_ids)
    return sdpa(q, k, v, causal_mask(q_len, k_len, window, doc_ids, q.device))


def sdpa(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Causal when `mask` is None and Tq == Tk > 1; otherwise `mask` (True = may attend) or no mask at all."""
    causal = mask is None and q.size(2) == k.size(2) and q.size(2) > 1
    gqa = k.size(1) != q.size(1)
    if gqa and q.is_cuda and (mask is not None or q.dtype == torch.float32):
        k, v, gqa = expand_kv(k, q.size(1)), expand_kv(v, q.size(1)), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, H, T, D): query head h reads kv head h // (H / Hkv), as enable_gqa does."""
    B, kv_heads, T, D = x.shape
    return x[:, :, None].expand(B, kv_heads, num_heads // kv_heads, T, D).reshape(B, num_heads, T, D)


def causal_mask(q_len: int, k_len: int, window: int | None, doc_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean (Tq, Tk), or (B, 1, T, T) with documents; True = may attend."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=device)[None, :]
    mask = cols <= rows
    if window is not None:
        mask = mask & (rows - cols <= window)
    if doc_ids is None:
        return mask
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (mask[None] & same_doc)[:, None]


def fa3_usable(q: torch.Tensor) -> bool:
    return fa3 is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def flash3(q, k, v, window: int | None) -> torch.Tensor:
    """FA3 takes (B, T, H, D) and GQA natively."""
    out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                              window_size=(-1 if window is None else window, 0))
    out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp
    return out.transpose(1, 2)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, window: int | None, doc_ids: torch.Tensor | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    gqa = k.size(1) != q.size(1)
    if torch.compiler.is_compiling():  # inside a compiled model: the mask and the kernel are traced with it
        mask = build_block_mask(q.size(2), window, doc_ids, q.device)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    mask = block_mask(q.size(2), window, doc_ids, q.device)
    return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)


# The doc_ids tensor of the current forward and its block masks by window: every layer reuses them.
_doc_masks: dict = {"doc_ids": None, "masks": {}}


def block_mask(seq_len: int, window: int | None, doc_ids: torch.Tensor | None, device):
    if doc_ids is None:
        return window_block_mask(seq_len, window, str(device))
    if _doc_masks["doc_ids"] is not doc_ids:
        _doc_masks.update(doc_ids=doc_ids, masks={})
    masks = _doc_masks["masks"]
    if window not in masks:
        masks[window] = build_block_mask(seq_len, window, doc_ids, device)
    return masks[window]


@functools.lru_cache(maxsize=32)
def window_block_mask(seq_len: int, window: int | None, device: str):
    return build_block_mask(seq_len, window, None, torch.device(device))


def build_block_mask(seq_len: int, window: int | None, doc_ids: torch.Tensor | None, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def keep(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx <= window)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return allowed

    batch = None if doc_ids is None else doc_ids.size(0)
    # uncompiled, create_block_mask materialises the dense (B, 1, T, T) mask it is meant to avoid (CUDA training
    # is where FlexAttention runs; CPU only checks its forward); inside a compiled model it is traced instead
    compile_mask = torch.device(device).type == "cuda" and not torch.compiler.is_compiling()
    return create_block_mask(keep, batch, None, seq_len, seq_len, device=device, _compile=compile_mask)


class KVCache:
    """What a model keeps between decode steps: keys and values per layer, preallocated for `capacity`
    positions (only the kv heads are stored), plus `state`, per-row tensors a model switch needs (e.g. the
    previous token's embedding for smear). Made by `GPT.new_cache`; the engine only copies it generically.

    The model asks `get_pos()` for its rotary offset and calls `insert_kv(layer, k, v)` per layer; the position
    advances after the last layer. Storage is allocated on the first insert so it takes the dtype the model
    actually computes in (autocast included).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int):
        self.num_layers, self.batch_size, self.capacity = num_layers, batch_size, capacity
        self.keys: torch.Tensor | None = None  # (layers, B, kv_heads, capacity, head_dim)
        self.values: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}  # each (B, ...)
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def allocate(self, like: torch.Tensor) -> None:
        _, num_kv_heads, _, head_dim = like.shape
        shape = (self.num_layers, self.batch_size, num_kv_heads, self.capacity, head_dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.values = torch.empty_like(self.keys)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.allocate(k)
        end = self.pos + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked to write up to {end}")
        self.keys[layer_idx, :, :, self.pos:end] = k
        self.values[layer_idx, :, :, self.pos:end] = v
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def fill_from(self, prefill: KVCache) -> None:
        """Copy a batch-1 prefill into every row, so N samples share one prompt forward pass."""
        self.allocate(prefill.keys[0])
        self.keys[:, :, :, :prefill.pos] = prefill.keys[:, :, :, :prefill.pos]  # broadcasts batch 1 -> B
        self.values[:, :, :, :prefill.pos] = prefill.values[:, :, :, :prefill.pos]
        self.state = {name: value.expand(self.batch_size, *value.shape[1:]).clone()
                      for name, value in prefill.state.items()}
        self.pos = prefill.pos
