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
- switches for imported Llama-family weights (nanochat/hf_import.py), all off by default: SwiGLU MLP, learnable
  RMSNorm weights, no QK-norm, no embedding norm; the default path does no extra work
- frontier switches (karpathy/nanochat's 2026 record, many ideas from KellerJordan/modded-nanogpt), all off by
  default: value embeddings (ResFormer, arXiv 2410.17897) gated per head into V on alternating layers, the last
  included; sliding-window attention tiled over layers by a pattern like "SSSL" (the last layer always full);
  per-layer learnable residual scale and x0 blend (the normed input embedding mixed back in before each block);
  token smear (a gated share of the previous token's embedding); backout (a learned share of the mid-network
  residual subtracted before the final norm); a QK scale after QK-norm; the newer initialisation; embeddings
  stored in the compute dtype. Attention kernels live in nanochat/attention.py.
- the loss is computed in row chunks, recomputing each chunk's logits in backward, so a large vocab never
  materialises the whole (B, T, vocab) float32 logits tensor; compiled training on CPU fuses the lm_head into
  the loss instead (nanochat/fused_loss.py)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.attention import KVCache, attend
from nanochat.fused_loss import fused_linear_cross_entropy
from nanochat.model_config import GPTConfig

# Logits elements (rows × padded vocab) per loss chunk: 2**26 float32 = 256 MiB at most at a time.
LOSS_CHUNK_ELEMENTS = 2**26
# Gates read only the first channels of their input: enough to be input-dependent, negligible in cost.
VALUE_GATE_CHANNELS = 12
SMEAR_GATE_CHANNELS = 24
PARAM_GROUPS = ("matrices", "embeddings", "value_embeds", "lm_head", "norm_gains", "resid_lambdas", "x0_lambdas",
                "gates")


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


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.eps = config.norm_eps
        self.qk_norm, self.qk_scale = config.qk_norm, config.qk_scale
        self.window = config.windows[layer_idx]
        dim = config.model_dim
        self.c_q = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.c_k = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        # value embeddings enter V through a per-kv-head gate in (0, 3) computed from the block input
        self.value_gate = (nn.Linear(min(VALUE_GATE_CHANNELS, dim), self.num_kv_heads, bias=False)
                           if layer_idx in config.value_embed_layers else None)

    def forward(self, x, cos, sin, value_embed=None, doc_ids=None, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        if value_embed is not None:
            gate = 3 * torch.sigmoid(self.value_gate(x[..., :self.value_gate.in_features]))  # (B, T, kv_heads)
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.num_kv_heads, self.head_dim).to(v.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.qk_norm:
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attend(q, k, v, window=self.window, doc_ids=doc_ids)
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

    def forward(self, x, cos, sin, value_embed=None, doc_ids=None, kv_cache=None):
        x = x + self.attn(self.norm_attn(x), cos, sin, value_embed, doc_ids, kv_cache)
        return x + self.mlp(self.norm_mlp(x))


def param_group(name: str, param: nn.Parameter, tied: bool) -> str:
    """The PARAM_GROUPS entry of one named parameter."""
    if name == "wte.weight":
        return "lm_head" if tied else "embeddings"
    if name.startswith("value_embeds."):
        return "value_embeds"
    if name.endswith("value_gate.weight") or name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
        return "gates"
    if name in ("lm_head.weight", "resid_lambdas", "x0_lambdas"):
        return name.split(".")[0]
    if name.startswith("blocks.") and param.ndim == 2:
        return "matrices"
    if name.endswith("norm_attn.weight") or name.endswith("norm_mlp.weight") or name == "norm_f.weight":
        return "norm_gains"
    raise AssertionError(f"parameter {name} has no optimizer group; add it to GPT.param_groups")


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
        kv_dim = config.num_kv_heads * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in config.value_embed_layers})
        if config.residual_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.depth))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        if config.smear:
            self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.model_dim), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings N(0, 1) (RMS-normed right away), lm_head near zero so early logits are flat,
        block inputs uniform with std 1/sqrt(fan_in), output projections zero so each block starts as identity.
        The frontier scheme (nanochat's 2026 record): embeddings N(0, 0.8²), c_fc at 0.4× that bound, and
        residual scalars that keep more of the residual and of x0 in early layers than in late ones."""
        config, dim = self.config, self.config.model_dim
        frontier = config.init_scheme == "frontier"
        if config.tie_embeddings:
            nn.init.normal_(self.wte.weight, std=dim**-0.5)
        else:
            nn.init.normal_(self.wte.weight, std=0.8 if frontier else 1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0) * dim**-0.5
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            fc_bound = 0.4 * bound if frontier else bound
            nn.init.uniform_(block.mlp.c_fc.weight, -fc_bound, fc_bound)
            if block.mlp.swiglu:
                nn.init.uniform_(block.mlp.c_up.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for norm in self.modules():
            if isinstance(norm, RMSNorm) and norm.weight is not None:
                nn.init.ones_(norm.weight)
        self.init_switches(bound)
        self.init_rotary()

    def init_switches(self, bound: float) -> None:
        """Value embeddings like c_v; gates slightly above neutral; smear off and backout at 0.2 to start."""
        config = self.config
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        for block in self.blocks:
            if block.attn.value_gate is not None:
                nn.init.uniform_(block.attn.value_gate.weight, 0.0, 0.02)
        if config.residual_scalars:
            depth_frac = torch.arange(config.depth, dtype=torch.float32) / max(config.depth - 1, 1)
            frontier = config.init_scheme == "frontier"
            self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac if frontier else torch.ones(config.depth))
            self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac if frontier else torch.zeros(config.depth))
        if config.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)
        if config.backout:
            nn.init.constant_(self.backout_lambda, 0.2)

    def store_embeddings_in(self, dtype: torch.dtype) -> None:
        """With compute_dtype_embeddings, keep the embedding tables in the compute dtype (bf16 on GPU halves
        their memory; the lookups feed bf16 matmuls anyway). Parameters keep their identity, so optimizers
        built before this still hold them."""
        if self.config.compute_dtype_embeddings:
            self.wte.to(dtype=dtype)
            self.value_embeds.to(dtype=dtype)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """The inference state for `batch_size` rows and up to `capacity` positions (see nanochat.attention)."""
        return KVCache(self.config.depth, batch_size, capacity)

    @torch.no_grad()
    def init_rotary(self) -> None:
        """Fill the (non-persistent) rotary tables; needed after building on the meta device and loading weights."""
        cos, sin = rotary_tables(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter in exactly one named group (each key always present, lists in parameter order):
        matrices (2-D block weights), embeddings (wte; when tied it is the output layer and sits in lm_head),
        value_embeds, lm_head, norm_gains (learnable RMSNorm gains), resid_lambdas, x0_lambdas, and gates (value
        gates, smear gate and lambda, backout lambda). The optimizer maps names to settings."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in PARAM_GROUPS}
        for name, param in self.named_parameters():  # a tied lm_head.weight is listed once, as wte.weight
            groups[param_group(name, param, self.config.tie_embeddings)].append(param)
        assert sum(map(len, groups.values())) == len({id(p) for p in self.parameters()})
        return groups

    def num_params(self) -> dict[str, int]:
        """Parameter counts: embedding (wte), value_embeds, blocks (+ final norm), scalars (the switches'
        lambdas and gates outside the blocks), lm_head (0 when tied), total."""
        groups = self.param_groups()
        embedding = self.wte.weight.numel()
        value_embeds = sum(p.numel() for p in groups["value_embeds"])
        blocks = sum(p.numel() for p in self.blocks.parameters()) + sum(p.numel() for p in self.norm_f.parameters())
        lm_head = 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": embedding, "value_embeds": value_embeds, "blocks": blocks,
                "scalars": total - embedding - value_embeds - blocks - lm_head, "lm_head": lm_head, "total": total}

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd; embedding lookups are free) plus
        causal-free attention scores over the keys each layer's window lets a query see."""
        c = self.config
        seq_len = seq_len or c.max_seq_len
        matmul_params = sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()
        if c.smear:
            matmul_params += self.smear_gate.weight.numel()
        keys = sum(seq_len if window is None else min(window, seq_len) for window in c.windows)
        return 6 * matmul_params + 12 * c.num_heads * c.head_dim * keys

    def hidden_states(self, idx, doc_ids=None, kv_cache=None) -> torch.Tensor:
        B, T = idx.shape
        start = kv_cache.get_pos() if kv_cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        # the residual stream keeps the dtype of the weights even when the tables are stored narrower
        x = self.wte(idx).to(self.lm_head.weight.dtype)
        if self.config.embed_norm:
            x = rms_norm(x, self.config.norm_eps)
        if self.config.smear:
            x = self.smear_previous(x, doc_ids, kv_cache)
        x0, mid = x, None
        for i, block in enumerate(self.blocks):
            if self.config.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, value_embed, doc_ids, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, value_embed, doc_ids, kv_cache)
            if i == self.config.backout_layer:
                mid = x
        if self.config.backout:
            x = x - self.backout_lambda * mid
        return self.norm_f(x)

    def smear_previous(self, x: torch.Tensor, doc_ids, kv_cache) -> torch.Tensor:
        """x[t] += smear_lambda · sigmoid(gate(x[t])) · x[t-1], never across a document boundary; with a cache,
        x[t-1] of the first new position is the last embedding of the previous call (kept in the cache's state),
        so decoding matches a full pass."""
        previous = x[:, :-1]
        if kv_cache is not None:
            last = kv_cache.state.get("smear_previous")
            kv_cache.state["smear_previous"] = x[:, -1:]
            if last is not None:
                previous = torch.cat([last.to(x.dtype), previous], dim=1)
        n = previous.size(1)
        if n == 0:
            return x
        current = x[:, x.size(1) - n:]
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(current[..., :self.smear_gate.in_features]))
        if doc_ids is not None:
            gate = gate * (doc_ids[:, 1:] == doc_ids[:, :-1]).unsqueeze(-1).to(gate.dtype)
        return torch.cat([x[:, :x.size(1) - n], current + gate * previous], dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def token_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), targets, ignore_index=-1, reduction="none")

    def chunked_token_losses(self, flat_x: torch.Tensor, flat_targets: torch.Tensor) -> torch.Tensor:
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // self.config.padded_vocab_size)
        if flat_x.size(0) <= chunk_rows:
            return self.token_losses(flat_x, flat_targets)
        recompute = torch.is_grad_enabled()
        pieces = []
        for i in range(0, flat_x.size(0), chunk_rows):
            xs, ts = flat_x[i:i + chunk_rows], flat_targets[i:i + chunk_rows]
            pieces.append(checkpoint(self.token_losses, xs, ts, use_reentrant=False) if recompute
                          else self.token_losses(xs, ts))
        return torch.cat(pieces)

    def forward(self, idx, targets=None, *, doc_ids=None, kv_cache=None, loss_reduction: str = "mean"):
        x = self.hidden_states(idx, doc_ids, kv_cache)
        if targets is None:
            return self.logits(x)
        B, T = targets.shape
        flat_x, flat_targets = x.reshape(B * T, -1), targets.reshape(B * T)
        if loss_reduction == "none":
            return self.chunked_token_losses(flat_x, flat_targets).view(B, T)
        if torch.compiler.is_compiling() and x.device.type == "cpu" and torch.is_grad_enabled():
            # compiled CPU training: the lm_head fused into the loss (nanochat/fused_loss.py)
            total = fused_linear_cross_entropy(flat_x, self.lm_head.weight[:self.config.vocab_size], flat_targets,
                                               self.config.softcap)
        else:
            total = self.chunked_token_losses(flat_x, flat_targets).sum()
        if loss_reduction == "sum":
            return total
        # clamp: a micro-batch with every target ignored contributes 0, not NaN
        return total / (flat_targets != -1).sum().clamp(min=1)
