"""Muon and AdamW: the math against references, LR scaling, parameter coverage, and the sharded torchrun path
(uneven parameter counts, rows that do not split) against a single process fed the averaged gradients.

Run as `torchrun ... -m tests.test_optim OUT` this file is also the distributed worker.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from nanochat.checkpoint import create_model
from nanochat.optim import AdamW, Muon, OptimFlags, orthogonalize, setup_optimizers
from nanochat.schedules import muon_momentum
from tests.model_cases import tiny_config
from tests.training_fixtures import subprocess_env, torchrun_cmd


def test_orthogonalize_flattens_singular_values():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        grad = torch.randn(shape) * 3.0
        singular = torch.linalg.svdvals(orthogonalize(grad))
        assert singular.min() > 0.5 and singular.max() < 1.3, singular
        before = torch.linalg.svdvals(grad)
        assert singular.max() / singular.min() < 0.5 * before.max() / before.min()


def test_muon_step_is_nesterov_then_scaled_orthogonal_update():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(64, 16))
    start = tall.detach().clone()
    momentum = 0.85
    opt = Muon([tall], lr=0.1, momentum=momentum)
    tall.grad = torch.randn(64, 16)
    opt.step()
    buf = (1 - momentum) * tall.grad
    expected = start - 0.1 * (64 / 16) ** 0.5 * orthogonalize(tall.grad.lerp(buf, momentum))
    torch.testing.assert_close(tall.detach(), expected)


def test_muon_momentum_warms_up_over_300_steps():
    momentum = muon_momentum()
    assert [momentum(s) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D parameters only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours_p = torch.nn.Parameter(torch.randn(8, 4))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    ours = AdamW([{"params": [ours_p], "lr": 0.01}], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(8, 4)
        ours_p.grad, ref_p.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tie", [False, True])
def test_setup_covers_every_parameter_once_with_scaled_lrs(tie):
    config = tiny_config(300, model_dim=64)
    config.tie_embeddings = tie
    model = create_model(config, "cpu")
    adamw, muon = setup_optimizers(model, OptimFlags(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02))
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    scale = (64 / 768) ** -0.5
    lrs = sorted(g["initial_lr"] for g in adamw.param_groups)
    assert lrs == pytest.approx([0.004 * scale] if tie else [0.004 * scale, 0.2 * scale])
    assert all(g["initial_lr"] == 0.02 for g in muon.param_groups)


def make_problem():
    """Three same-shape matrices (does not divide by 2 ranks) plus a 3-row matrix (rows do not split)."""
    gen = torch.Generator().manual_seed(0)
    muon_params = [torch.nn.Parameter(torch.randn(8, 4, generator=gen)) for _ in range(3)]
    adam_params = [torch.nn.Parameter(torch.randn(3, 5, generator=gen)),
                   torch.nn.Parameter(torch.randn(6, 2, generator=gen))]
    return muon_params, adam_params


def rank_grads(params, rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in params]


def run_problem(rank: int, world: int, steps: int = 3) -> list[torch.Tensor]:
    """Each rank sees its own gradients; a single process (world=1) is fed their average."""
    muon_params, adam_params = make_problem()
    params = muon_params + adam_params
    opts = [Muon(muon_params, lr=0.05), AdamW([{"params": adam_params, "lr": 0.01}])]
    for step in range(steps):
        if world == 1:
            grads = [torch.stack(gs).mean(0) for gs in zip(*(rank_grads(params, r, step) for r in range(2)))]
        else:
            grads = rank_grads(params, rank, step)
        for p, g in zip(params, grads):
            p.grad = g
        for opt in opts:
            opt.step()
    return [p.detach() for p in params]


@pytest.mark.slow
def test_sharded_optimizers_match_single_process(tmp_path):
    result = subprocess.run(torchrun_cmd(2, "-m", "tests.test_optim", str(tmp_path / "out.pt")),
                            capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(tmp_path / "out.pt", weights_only=True)
    single = run_problem(0, 1)
    for a, b in zip(sharded, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    final = run_problem(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(final, sys.argv[1])
    dist.destroy_process_group()
