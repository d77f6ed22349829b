"""bench/fidelity.py's other half, run under a karpathy/nanochat checkout's Python (PYTHONPATH = the checkout), so
it imports nothing of ours: loads our initial weights into its GPT, runs its MuonAdamW for the same steps on the
same batches with the same LRs, and writes its logits at the start and its weights at the end under our names.

    python bench/fidelity_ref.py --dir DIR      # DIR holds init.safetensors, batches.safetensors, settings.json

The two rotary conventions are mirror images (its pairs rotate by +θ, ours by -θ); both train equally well but
the same weights give different logits, so its `apply_rotary_emb` is replaced by ours for the comparison.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import nanochat.gpt as reference_gpt

# our parameter names -> its names (the rest are spelled the same)
RENAMES = (("blocks.", "transformer.h."), ("value_gate", "ve_gate"))


def reference_name(ours: str) -> str:
    if ours == "wte.weight":
        return "transformer.wte.weight"
    for old, new in RENAMES:
        ours = ours.replace(old, new)
    return ours


def rotate_like_ours(x, cos, sin):
    half = x.shape[3] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    directory = Path(parser.parse_args().dir)
    settings = json.loads((directory / "settings.json").read_text())
    reference_gpt.apply_rotary_emb = rotate_like_ours
    config = reference_gpt.GPTConfig(**settings["reference_config"])
    with torch.device("meta"):
        model = reference_gpt.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    ours = load_file(directory / "init.safetensors")
    model.load_state_dict({reference_name(k): v for k, v in ours.items()}, strict=True)
    batches = load_file(directory / "batches.safetensors")["batches"]
    optimizer = model.setup_optimizer(**settings["reference_lrs"])
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = settings["momentum"], settings["weight_decay"]
    with torch.no_grad():
        logits = model(batches[0, :, :-1]).float()
    model.train()
    for batch in batches:
        model(batch[:, :-1], batch[:, 1:].contiguous()).backward()  # it views the targets flat
        optimizer.step()
        model.zero_grad(set_to_none=True)
    state = model.state_dict()
    final = {name: state[reference_name(name)].detach().float().contiguous() for name in ours}
    save_file({"logits": logits.contiguous()}, directory / "reference_logits.safetensors")
    save_file(final, directory / "reference_final.safetensors")


if __name__ == "__main__":
    main()
