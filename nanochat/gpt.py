"""The GPT model: config, flags, blocks, init and forward, in reading order.

Architecture choices:
- rotary position embeddings (Llama's half-split convention), no learned positions
- QK-norm: queries and keys are RMS-normalised per head before attention (stabilises training)
- RMSNorm without learnable weights, applied before attention, before the MLP, after the embedding and at the end
- ReLU² MLP with a 4× hidden layer; no biases anywhere
- grouped-query attention: `num_kv_heads` divides `num_heads`
- untied input embedding and lm_head by default (`tie_embeddings` optional)
- logits soft-capped with `softcap · tanh(logits / softcap)` (Gemma 2), 15 by default
- vocab padded to a multiple of 64 for matmul efficiency; padded ids are never predicted or returned
- switches for imported Llama-family weights (nanochat/interop.py), all off by default: SwiGLU MLP, learnable
  RMSNorm weights, no QK-norm, no embedding norm; the default path does no extra work
- the loss is computed in row chunks, recomputing each chunk's logits in backward, so a large vocab never
  materialises the whole (B, T, vocab) float32 logits tensor
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.common import UserError
from nanochat.flags import flag

VOCAB_MULTIPLE = 64
# Logits elements (rows × padded vocab) per loss chunk: 2**26 float32 = 256 MiB at most at a time.
LOSS_CHUNK_ELEMENTS = 2**26


@dataclass
class GPTConfig:
    depth: int = 12
    model_dim: int = 768
    num_heads: int = 6
    num_kv_heads: int = 6
    head_dim: int = 128
    max_seq_len: int = 2048
    vocab_size: int = 65536
    tie_embeddings: bool = False
    softcap: float = 15.0  # 0 = no soft-cap
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    mlp: str = "relu2"  # relu2 | swiglu
    mlp_hidden_dim: int = -1  # -1 = 4 × model_dim
    norm_weight: bool = False  # learnable RMSNorm gains (Llama); False = parameter-free
    qk_norm: bool = True
    embed_norm: bool = True  # RMS-normalise the token embedding before the first block

    def __post_init__(self):
        if self.mlp not in ("relu2", "swiglu"):
            raise UserError(f"model config mlp must be relu2 or swiglu, got {self.mlp!r}")

    @property
    def hidden_dim(self) -> int:
        return 4 * self.model_dim if self.mlp_hidden_dim == -1 else self.mlp_hidden_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass
class ModelFlags:
    depth: int = flag(20, "number of transformer blocks")
    model_dim: int = flag(-1, "width of the residual stream; -1 = 64 × depth")
    head_dim: int = flag(128, "width of each attention head (must be even)")
    num_heads: int = flag(-1, "query heads; -1 = model_dim / head_dim")
    num_kv_heads: int = flag(-1, "key/value heads (GQA when fewer than num_heads); -1 = num_heads")
    max_seq_len: int = flag(2048, "context length in tokens")
    tie_embeddings: bool = flag(False, "share the input embedding with the lm_head")


def model_config(flags: ModelFlags, vocab_size: int) -> GPTConfig:
    """Resolve derived model flags (explicit values win) and check they fit together."""
    if flags.depth < 1:
        raise UserError(f"--depth must be >= 1, got {flags.depth}")
    if flags.max_seq_len < 1:
        raise UserError(f"--max_seq_len must be >= 1, got {flags.max_seq_len}")
    if flags.head_dim < 2 or flags.head_dim % 2:
        raise UserError(f"--head_dim must be an even number >= 2 (rotary pairs dimensions), got {flags.head_dim}")
    model_dim = flags.model_dim if flags.model_dim != -1 else 64 * flags.depth
    if model_dim < 1:
        raise UserError(f"--model_dim must be >= 1 or -1 (64 × depth), got {flags.model_dim}")
    if flags.num_heads == -1:
        if model_dim % flags.head_dim:
            divisors = [d for d in (256, 192, 128, 96, 64, 32, 16) if model_dim % d == 0]
            hint = f"; try --head_dim {divisors[0]}" if divisors else ""
            raise UserError(f"--model_dim {model_dim} is not a multiple of --head_dim {flags.head_dim}{hint}")
        num_heads = model_dim // flags.head_dim
    else:
        num_heads = flags.num_heads
        if num_heads < 1:
            raise UserError(f"--num_heads must be >= 1 or -1 (derive), got {num_heads}")
        if num_heads * flags.head_dim != model_dim:
            raise UserError(f"--model_dim {model_dim} is not num_heads × head_dim "
                            f"({num_heads} × {flags.head_dim} = {num_heads * flags.head_dim})")
    num_kv_heads = flags.num_kv_heads if flags.num_kv_heads != -1 else num_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise UserError(f"--num_kv_heads {num_kv_heads} must divide --num_heads {num_heads}")
    if vocab_size < 1:
        raise UserError(f"vocab size must be >= 1, got {vocab_size}")
    return GPTConfig(depth=flags.depth, model_dim=model_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=flags.head_dim, max_seq_len=flags.max_seq_len, vocab_size=vocab_size,
                     tie_embeddings=flags.tie_embeddings)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain when `learnable`, else parameter-free (and no state-dict entry)."""

    def __init__(self, dim: int, eps: float, learnable: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim): each frequency repeated over both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (T, D). Rotates pairs (i, i + D/2)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return x * cos + rotated * sin


def attention_mask(q_len: int, k_len: int, doc_ids: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for the cases SDPA's is_causal cannot express, else None."""
    if doc_ids is None and (q_len == k_len or q_len == 1):
        return None
    offset = k_len - q_len  # queries are the last q_len positions of the k_len keys
    rows = torch.arange(q_len, device=device)[:, None] + offset
    mask = torch.arange(k_len, device=device)[None, :] <= rows  # (Tq, Tk)
    if doc_ids is None:
        return mask
    if q_len != k_len:
        raise ValueError("doc_ids cannot be combined with a KV cache")
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (mask[None] & same_doc)[:, None]  # (B, 1, T, T)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.eps = config.norm_eps
        self.qk_norm = config.qk_norm
        dim = config.model_dim
        self.c_q = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.c_k = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.qk_norm:
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        mask = attention_mask(T, k.size(2), doc_ids, x.device)
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T == k.size(2) and T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """ReLU²: c_proj(relu(c_fc x)²). SwiGLU (Llama): c_proj(silu(c_fc x) · c_up x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(config.model_dim, config.hidden_dim, bias=False)
        if self.swiglu:
            self.c_up = nn.Linear(config.model_dim, config.hidden_dim, bias=False)
        self.c_proj = nn.Linear(config.hidden_dim, config.model_dim, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.c_proj(F.silu(self.c_fc(x)) * self.c_up(x))
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.norm_attn = RMSNorm(config.model_dim, config.norm_eps, config.norm_weight)
        self.attn = Attention(config, layer_idx)
        self.norm_mlp = RMSNorm(config.model_dim, config.norm_eps, config.norm_weight)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        x = x + self.attn(self.norm_attn(x), cos, sin, doc_ids, kv_cache)
        return x + self.mlp(self.norm_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        vocab = config.padded_vocab_size
        self.wte = nn.Embedding(vocab, config.model_dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.norm_f = RMSNorm(config.model_dim, config.norm_eps, config.norm_weight)
        self.lm_head = nn.Linear(config.model_dim, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings N(0, 1) (RMS-normed right away), lm_head near zero so early logits are flat,
        block inputs uniform with std 1/sqrt(fan_in), output projections zero so each block starts as identity."""
        dim = self.config.model_dim
        if self.config.tie_embeddings:
            nn.init.normal_(self.wte.weight, std=dim**-0.5)
        else:
            nn.init.normal_(self.wte.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0) * dim**-0.5
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            if block.mlp.swiglu:
                nn.init.uniform_(block.mlp.c_up.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for norm in self.modules():
            if isinstance(norm, RMSNorm) and norm.weight is not None:
                nn.init.ones_(norm.weight)
        self.init_rotary()

    @torch.no_grad()
    def init_rotary(self) -> None:
        """Fill the (non-persistent) rotary tables; needed after building on the meta device and loading weights."""
        cos, sin = rotary_tables(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self) -> dict[str, int]:
        embedding = self.wte.weight.numel()
        blocks = sum(p.numel() for p in self.blocks.parameters()) + sum(p.numel() for p in self.norm_f.parameters())
        lm_head = 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
        return {"embedding": embedding, "blocks": blocks, "lm_head": lm_head,
                "total": embedding + blocks + lm_head}

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus causal-free attention scores."""
        c = self.config
        seq_len = seq_len or c.max_seq_len
        matmul_params = sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()
        return 6 * matmul_params + 12 * c.depth * c.num_heads * c.head_dim * seq_len

    def hidden_states(self, idx, doc_ids=None, kv_cache=None) -> torch.Tensor:
        B, T = idx.shape
        start = kv_cache.get_pos() if kv_cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        x = self.wte(idx)
        if self.config.embed_norm:
            x = rms_norm(x, self.config.norm_eps)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, doc_ids, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids, kv_cache)
        return self.norm_f(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def token_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), targets, ignore_index=-1, reduction="none")

    def forward(self, idx, targets=None, *, doc_ids=None, kv_cache=None, loss_reduction: str = "mean"):
        x = self.hidden_states(idx, doc_ids, kv_cache)
        if targets is None:
            return self.logits(x)
        B, T = targets.shape
        flat_x, flat_targets = x.reshape(B * T, -1), targets.reshape(B * T)
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // self.config.padded_vocab_size)
        if flat_x.size(0) <= chunk_rows:
            losses = self.token_losses(flat_x, flat_targets)
        else:
            recompute = torch.is_grad_enabled()
            pieces = []
            for i in range(0, flat_x.size(0), chunk_rows):
                xs, ts = flat_x[i:i + chunk_rows], flat_targets[i:i + chunk_rows]
                pieces.append(checkpoint(self.token_losses, xs, ts, use_reentrant=False) if recompute
                              else self.token_losses(xs, ts))
            losses = torch.cat(pieces)
        if loss_reduction == "none":
            return losses.view(B, T)
        total = losses.sum()
        if loss_reduction == "sum":
            return total
        # clamp: a micro-batch with every target ignored contributes 0, not NaN
        return total / (flat_targets != -1).sum().clamp(min=1)
