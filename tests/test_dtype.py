"""Dtype paths on plain CPU (MPS where present): float32 by default, --dtype bfloat16 allowed, for every model
architecture switch, through build_model, the loss, and export (always float32 on disk)."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from nanochat import common
from nanochat.checkpoint import build_model
from nanochat.flags import RuntimeFlags, parse_flags
from nanochat.hf_export import hf_state_dict
from tests.model_cases import SWITCH_CASES, tiny_config

ARCHITECTURES = {
    **SWITCH_CASES,
    "llama": dict(mlp="swiglu", mlp_hidden_dim=88, norm_weight=True, qk_norm=False, embed_norm=False, softcap=0.0),
}


def meta_for(**overrides) -> dict:
    return {"model_config": asdict(tiny_config(**{**dict(head_dim=8, num_kv_heads=2), **overrides}))}


@pytest.mark.parametrize("argv, expected", [
    ([], torch.float32),
    (["--dtype", "bfloat16"], torch.bfloat16),
    (["--dtype=float32"], torch.float32),
])
def test_cpu_dtype_from_flags(argv, expected):
    flags = parse_flags(RuntimeFlags, ["--device_type", "cpu", *argv])
    device_type = common.autodetect_device_type(flags.device_type)
    assert common.resolve_dtype(device_type, flags.dtype) == expected


def test_mps_row_of_the_table():
    """bfloat16 on MPS exactly when this torch can compute in it there; no MPS means float32 and a clear error
    for --device_type mps."""
    if common.mps_supports_bfloat16():
        assert common.resolve_dtype("mps", "auto") == torch.bfloat16
        assert (torch.ones(2, dtype=torch.bfloat16, device="mps") * 3).sum().item() == 6
    else:
        assert common.resolve_dtype("mps", "auto") == torch.float32
    if not torch.backends.mps.is_available():
        with pytest.raises(common.UserError, match="use --device_type cpu"):
            common.autodetect_device_type("mps")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_bfloat16_model_tracks_float32_on_cpu(name):
    meta = meta_for(**ARCHITECTURES[name])
    torch.manual_seed(0)
    reference = build_model(meta, torch.device("cpu"))
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(std=0.2)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    low = build_model(meta, torch.device("cpu"), dtype=torch.bfloat16, model_state=state)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    if low.config.tie_embeddings:
        assert low.lm_head.weight is low.wte.weight
    idx = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        exact, approx = reference(idx), low(idx)
    assert approx.dtype == torch.float32  # logits are always float32
    spread = exact.std().item()
    assert (exact - approx).abs().mean().item() < 0.05 * spread
    loss = low(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in low.parameters() if p.grad is not None)


def test_export_writes_float32_from_a_bfloat16_model():
    model = build_model(meta_for(), torch.device("cpu"), dtype=torch.bfloat16)
    state = hf_state_dict(model)
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert torch.equal(state["model.layers.0.self_attn.v_proj.weight"], model.blocks[0].attn.c_v.weight.float())
