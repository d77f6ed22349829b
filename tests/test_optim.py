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

from nanochat.common import cleanup_distributed
from nanochat.checkpoint import create_model
from nanochat.optim import AdamW, Muon, OptimFlags, orthogonalize, setup_optimizers, training_schedule
from nanochat.schedules import auto_batch_size, batch_scaling, cosine_to_zero, muon_momentum, warmup_warmdown
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


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (256, 64)])
def test_polar_express_lands_closer_to_orthogonal_than_newton_schulz(shape):
    torch.manual_seed(0)
    grad = torch.randn(shape) * 3.0
    worst = {m: float((torch.linalg.svdvals(orthogonalize(grad, 5, m)) - 1).abs().max())
             for m in ("newton_schulz", "polar_express")}
    assert worst["polar_express"] < 0.2 and worst["polar_express"] < 0.6 * worst["newton_schulz"], worst
    # Muon+ renormalisation: exactly the Frobenius norm of a semi-orthogonal matrix
    assert orthogonalize(grad, 5, "polar_express").norm() == pytest.approx(min(shape) ** 0.5, rel=1e-5)


@pytest.mark.parametrize("shape, neuron_dim", [((48, 16), -1), ((16, 48), -2)])
def test_normuon_equalises_neurons_and_keeps_the_norm(shape, neuron_dim):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = Muon([p], beta2=0.9)
    neuron_scale = torch.linspace(0.1, 3.0, shape[0 if neuron_dim == -1 else 1])
    update = torch.randn(shape) * (neuron_scale[:, None] if neuron_dim == -1 else neuron_scale[None, :])
    out = opt.normalize_neurons(p, update, 0.9)
    rms = out.square().mean(dim=neuron_dim).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, float(rms.mean())), rtol=1e-4, atol=0)
    assert out.norm() == pytest.approx(float(update.norm()), rel=1e-5)
    second_moment = opt.state[p]["second_moment"]  # one EMA value per neuron, (1 - beta2) of the first mean square
    torch.testing.assert_close(second_moment, 0.1 * update.square().mean(dim=neuron_dim, keepdim=True))


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    torch.manual_seed(0)
    start = torch.randn(32, 16)
    grad = torch.randn(32, 16)

    def stepped(weight_decay):
        p = torch.nn.Parameter(start.clone())
        p.grad = grad.clone()
        Muon([p], lr=0.1, momentum=0.0, nesterov=False, weight_decay=weight_decay).step()
        return p.detach()

    plain, decayed = stepped(0.0), stepped(0.5)
    update = start - plain  # lr · sqrt(32 / 16) · orthogonalised update; the decay uses the same step size
    agree = update * start >= 0
    torch.testing.assert_close(decayed[~agree], plain[~agree], rtol=0, atol=0)
    torch.testing.assert_close(decayed[agree], plain[agree] - 0.1 * 2 ** 0.5 * 0.5 * start[agree], rtol=1e-5, atol=1e-7)
    assert 0.2 < agree.float().mean() < 0.8


def test_frontier_schedules_at_key_steps():
    lr = warmup_warmdown(1000, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
    assert [lr(s) for s in (0, 19, 39, 200, 349)] == pytest.approx([1 / 40, 0.5, 1.0, 1.0, 1.0])
    assert lr(350) == 1.0 and lr(351) < 1.0 and lr(999) == pytest.approx(0.05) and lr(675) == pytest.approx(0.525, abs=2e-3)
    flags = OptimFlags(muon_momentum=0.97, muon_momentum_warmup=400, muon_momentum_final=0.90,
                       weight_decay_schedule="cosine")
    schedule = training_schedule(flags, 1000, lr, warmdown_ratio=0.65)
    momentum = [schedule.muon_momentum(s) for s in (0, 200, 399, 400, 700, 999)]
    assert momentum == pytest.approx([0.85, 0.91, 0.97 - 0.07 * 49 / 650, 0.97 - 0.07 * 50 / 650,
                                      0.97 - 0.07 * 350 / 650, 0.97 - 0.07 * 649 / 650], abs=1e-4)
    # the warm-down starts (step 350) before the warm-up ends (400): no jump where they meet
    steps = [schedule.muon_momentum(s) for s in range(1000)]
    assert max(abs(b - a) for a, b in zip(steps, steps[1:])) <= 0.12 / 400 + 1e-9
    assert [schedule.weight_decay(s) for s in (0, 500, 1000)] == pytest.approx([1.0, 0.5, 0.0])
    assert cosine_to_zero(10)(5) == pytest.approx(0.5)
    plain = training_schedule(OptimFlags(), 1000, lr)  # 2025: momentum warm-up only, fixed decay
    assert plain.muon_momentum(999) == 0.95 and plain.weight_decay(999) == 1.0


def test_auto_batch_size_and_batch_scaling():
    reference = 1e9
    assert auto_batch_size(reference, reference) == 2 ** 19
    assert auto_batch_size(2 * reference, reference) == 2 ** 19  # 2^0.383: rounds back down
    assert auto_batch_size(10 * reference, reference) == 2 ** 20  # 10^0.383 ≈ 2.4
    assert auto_batch_size(reference / 100, reference) == 2 ** 16
    lr_scale, decay_scale = batch_scaling(2 ** 20, 2 * reference, reference)
    assert lr_scale == pytest.approx(2 ** 0.5) and decay_scale == pytest.approx(2 ** 0.5 / 2)
    assert batch_scaling(2 ** 20, 2 * reference, reference, floor_batch=2 ** 18) == (lr_scale, decay_scale)
    # below the floor the LR keeps the floor's factor and the decay shrinks so LR × decay is unchanged
    lr_scale, decay_scale = batch_scaling(2 ** 12, reference, reference, floor_batch=2 ** 18)
    assert lr_scale == pytest.approx(0.5 ** 0.5) and lr_scale * decay_scale == pytest.approx(2 ** -7)


def test_frontier_groups_cover_every_parameter_once():
    config = tiny_config(300, model_dim=64, value_embeds=True, residual_scalars=True, smear=True, backout=True)
    model = create_model(config, "cpu")
    flags = OptimFlags(adamw_groups="per_group", scalar_lr=0.5, matrix_weight_decay=0.2,
                       muon_orthogonalizer="polar_express", muon_beta2=0.9)
    adamw, muon = setup_optimizers(model, flags)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    gates = [p for p in model.param_groups()["gates"] if p.ndim == 2 and p.shape[0] == config.num_kv_heads]
    assert gates and all(any(p is q for g in muon.param_groups for q in g["params"]) for p in gates)
    assert {g["orthogonalizer"] for g in muon.param_groups} == {"polar_express"}
    assert {g["initial_weight_decay"] for g in muon.param_groups} == {0.2}
    x0 = next(g for g in adamw.param_groups if g["params"][0] is model.x0_lambdas)
    assert x0["lr"] == 0.5 and x0["betas"] == (0.96, 0.95)


def test_muon_resumes_a_state_saved_before_its_switches():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    opt = Muon([p])
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:  # what a 2025 checkpoint holds
        for key in ("orthogonalizer", "beta2", "weight_decay", "initial_weight_decay"):
            del group[key]
    fresh = Muon([p])
    fresh.load_state_dict(saved)
    fresh.step()
    assert fresh.param_groups[0]["orthogonalizer"] == "newton_schulz" and fresh.param_groups[0]["beta2"] == 0.0


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
    """Three same-shape matrices (does not divide by 2 ranks) plus a 3-row matrix (rows do not split), and three
    wide matrices for a frontier Muon (Polar Express, NorMuon, cautious decay)."""
    gen = torch.Generator().manual_seed(0)
    muon_params = [torch.nn.Parameter(torch.randn(8, 4, generator=gen)) for _ in range(3)]
    adam_params = [torch.nn.Parameter(torch.randn(3, 5, generator=gen)),
                   torch.nn.Parameter(torch.randn(6, 2, generator=gen))]
    frontier_params = [torch.nn.Parameter(torch.randn(4, 8, generator=gen)) for _ in range(3)]
    return muon_params, adam_params, frontier_params


def rank_grads(params, rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in params]


def run_problem(rank: int, world: int, steps: int = 3) -> list[torch.Tensor]:
    """Each rank sees its own gradients; a single process (world=1) is fed their average."""
    muon_params, adam_params, frontier_params = make_problem()
    params = muon_params + adam_params + frontier_params
    opts = [Muon(muon_params, lr=0.05), AdamW([{"params": adam_params, "lr": 0.01}]),
            Muon(frontier_params, lr=0.05, orthogonalizer="polar_express", beta2=0.9, weight_decay=0.2)]
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
    cleanup_distributed()
