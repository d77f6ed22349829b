"""The model's configuration: GPTConfig (what meta.json stores; checked on construction, so configs read from
checkpoints are checked too), ModelFlags (the model flags every training script shares) and model_config, which
resolves derived flags and copies every ModelFlags field GPTConfig also has by name. See nanochat/gpt.py for
what each switch does.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from nanochat.common import UserError
from nanochat.flags import flag

VOCAB_MULTIPLE = 64
INIT_SCHEMES = ("2025", "frontier")


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
    # frontier switches; the defaults are the 2025 architecture, so older meta.json files load unchanged
    value_embeds: bool = False
    window_pattern: str = "L"  # tiled over layers: L = full context, S = short_window; the last layer is always L
    short_window: int = -1  # -1 = a quarter of max_seq_len rounded up to a multiple of 128 (FA3's tile)
    residual_scalars: bool = False
    smear: bool = False
    backout: bool = False
    qk_scale: float = 1.0
    init_scheme: str = "2025"
    compute_dtype_embeddings: bool = False

    def __post_init__(self):
        if self.mlp not in ("relu2", "swiglu"):
            raise UserError(f"model config mlp must be relu2 or swiglu, got {self.mlp!r}")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise UserError(f"--window_pattern must be letters S (short) and L (long), e.g. SSSL; "
                            f"got {self.window_pattern!r}")
        if self.short_window < 1 and self.short_window != -1:
            raise UserError(f"--short_window must be >= 1 or -1 (a quarter of the context), got {self.short_window}")
        if self.qk_scale <= 0:
            raise UserError(f"--qk_scale must be > 0, got {self.qk_scale}")
        if self.qk_scale != 1.0 and not self.qk_norm:
            raise UserError("--qk_scale scales the QK-normed queries and keys; it needs qk_norm")
        if self.init_scheme not in INIT_SCHEMES:
            raise UserError(f"--init_scheme must be one of {', '.join(INIT_SCHEMES)}, got {self.init_scheme!r}")
        if self.compute_dtype_embeddings and self.tie_embeddings:
            raise UserError("--compute_dtype_embeddings would store the tied lm_head in low precision too; "
                            "drop one of it and --tie_embeddings")

    @property
    def hidden_dim(self) -> int:
        return 4 * self.model_dim if self.mlp_hidden_dim == -1 else self.mlp_hidden_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def windows(self) -> list[int | None]:
        """Per layer: how many earlier positions a query sees (FA3's left window), None = the whole context."""
        short = self.short_window if self.short_window != -1 else -(-self.max_seq_len // 4 // 128) * 128
        windows = [short if self.window_pattern[i % len(self.window_pattern)] == "S" else None
                   for i in range(self.depth)]
        windows[-1] = None  # the last layer always sees the whole context
        return [None if w is not None and w >= self.max_seq_len - 1 else w for w in windows]

    @property
    def value_embed_layers(self) -> list[int]:
        """Alternating layers ending with the last one (modded-nanogpt and nanochat both keep the last)."""
        if not self.value_embeds:
            return []
        return [i for i in range(self.depth) if i % 2 == (self.depth - 1) % 2]

    @property
    def backout_layer(self) -> int:
        return self.depth // 2


@dataclass
class ModelFlags:
    depth: int = flag(20, "number of transformer blocks")
    model_dim: int = flag(-1, "width of the residual stream; -1 = 64 × depth")
    head_dim: int = flag(128, "width of each attention head (must be even)")
    num_heads: int = flag(-1, "query heads; -1 = model_dim / head_dim")
    num_kv_heads: int = flag(-1, "key/value heads (GQA when fewer than num_heads); -1 = num_heads")
    max_seq_len: int = flag(2048, "context length in tokens")
    tie_embeddings: bool = flag(False, "share the input embedding with the lm_head")
    rope_theta: float = flag(10000.0, "rotary base frequency")
    value_embeds: bool = flag(False, "value embeddings on alternating layers (last included), gated into V")
    window_pattern: str = flag("L", "sliding windows tiled over layers: S = --short_window, L = full context; "
                                    "the last layer is always L (e.g. SSSL)")
    short_window: int = flag(-1, "S layers' window in tokens; -1 = a quarter of --max_seq_len rounded up to 128")
    residual_scalars: bool = flag(False, "per-layer learnable residual scale and input-embedding (x0) blend")
    smear: bool = flag(False, "mix a gated share of the previous token's embedding into each position")
    backout: bool = flag(False, "subtract a learned share of the mid-network residual before the final norm")
    qk_scale: float = flag(1.0, "multiply queries and keys by this after QK-norm (sharper attention)")
    init_scheme: str = flag("2025", "weight initialisation", choices=INIT_SCHEMES)
    compute_dtype_embeddings: bool = flag(False, "store the embedding tables in the compute dtype (bf16 on GPU)")


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
    config_fields = {f.name for f in fields(GPTConfig)}
    shared = {f.name: getattr(flags, f.name) for f in fields(ModelFlags) if f.name in config_fields}
    return GPTConfig(**{**shared, "model_dim": model_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                        "vocab_size": vocab_size})
