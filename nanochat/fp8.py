"""fp8 matmuls for training (`--fp8`): torchao's float8 training on an H100-class GPU, bf16 for every eval.

Only linear layers whose dims are multiples of 16 and at least 128 are converted (the fp8 kernels' shape rule;
smaller ones gain nothing). Evals swap each Float8Linear back to a plain nn.Linear sharing its weight, so val bpb,
samples and CORE are measured in bf16 like every other run (nanochat 2026 does the same).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from nanochat.common import UserError

MIN_FP8_DIM = 128


def fp8_refusal(device: torch.device) -> str | None:
    """Why --fp8 cannot run here, or None."""
    if device.type != "cuda":
        return f"--fp8 needs an H100-class CUDA GPU; this run is on {device.type}: drop --fp8"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"--fp8 needs an H100-class GPU (compute capability 8.9+), this is {torch.cuda.get_device_name(device)}"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "--fp8 needs torchao: pip install torchao (or drop --fp8)"
    return None


def fp8_eligible(module: nn.Module, name: str) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % 16 == 0 for d in dims) and min(dims) >= MIN_FP8_DIM


def enable_fp8(model: nn.Module, device: torch.device) -> int:
    """Convert the eligible linears to torchao Float8Linear (tensorwise scaling); returns how many."""
    refusal = fp8_refusal(device)
    if refusal:
        raise UserError(refusal)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=fp8_eligible)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


@contextmanager
def fp8_disabled(model: nn.Module):
    """Every Float8Linear replaced by an nn.Linear sharing its parameters, restored on exit (no-op without)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Float8Linear":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = module.weight
        if module.bias is not None:
            plain.bias = module.bias
        setattr(parent, attr, plain)
        swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
