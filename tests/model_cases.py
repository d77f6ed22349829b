"""One tiny model config and the list of architecture switch cases that the shape, cache == recompute, resume
and export tests all run over. A new switch adds one entry here."""
from __future__ import annotations

from nanochat.model_config import GPTConfig

# every frontier switch at once, on a GQA model with a window short enough to matter at max_seq_len 32
FRONTIER = dict(depth=4, head_dim=8, num_kv_heads=2, value_embeds=True, window_pattern="SSSL", short_window=5,
                residual_scalars=True, smear=True, backout=True, qk_scale=1.2, init_scheme="frontier",
                compute_dtype_embeddings=True)

SWITCH_CASES = {
    "default": {},
    "gqa": dict(head_dim=8, num_kv_heads=2),
    "swiglu": dict(mlp="swiglu", mlp_hidden_dim=48),
    "tied": dict(tie_embeddings=True),
    "norm_weight": dict(norm_weight=True),
    "value_embeds": dict(depth=3, value_embeds=True),
    "windows": dict(depth=3, window_pattern="SL", short_window=5),
    "residual_scalars": dict(residual_scalars=True),
    "smear": dict(smear=True),
    "backout": dict(depth=3, backout=True),
    "qk_scale": dict(qk_scale=1.2),
    "frontier_init": dict(init_scheme="frontier", compute_dtype_embeddings=True),
    "frontier": FRONTIER,
}


def tiny_config(vocab_size: int = 100, **switches) -> GPTConfig:
    """depth 2, width 32, heads of 16 (2 heads), context 32, unless `switches` say otherwise; num_heads follows
    model_dim / head_dim and num_kv_heads follows num_heads unless given."""
    shape = {**dict(depth=2, model_dim=32, head_dim=16, max_seq_len=32), **switches}
    shape.setdefault("num_heads", shape["model_dim"] // shape["head_dim"])
    shape.setdefault("num_kv_heads", shape["num_heads"])
    return GPTConfig(vocab_size=vocab_size, **shape)
