"""Optimizers: Muon for the 2-D matrices inside the blocks, AdamW for the embedding and the lm_head.

Both are data-parallel on their own, with no DDP wrapper: every rank runs backward on its micro-batches, then
`step()` averages the gradients across ranks as part of the update.
- Muon owns parameters block-cyclically: within each same-shape group, parameter i belongs to rank i % world.
  Gradients are reduce-scattered to their owner, the owner updates (and alone keeps the momentum buffer), and
  the new values are all-gathered back to every rank.
- AdamW shards each parameter along dim 0 (ZeRO-2 style): gradients are reduce-scattered, each rank keeps the
  moments of its own slice, updates it, and the slices are all-gathered. A parameter whose first dim does not
  split evenly is all-reduced and updated whole on every rank.
A single process takes a plain path with no collective calls. Gradients are summed with SUM and divided by the
world size because gloo has no AVG reduction.

Muon (Keller Jordan, 2024): Nesterov momentum, then the update is orthogonalised with a quintic Newton-Schulz
iteration whose coefficients (3.4445, -4.7750, 2.0315) push all singular values towards 1 in 5 steps.
The frontier recipe (nanochat 2026, after modded-nanogpt) changes three things, each a flag:
- `--muon_orthogonalizer polar_express`: Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932), one
  tuned coefficient triple per iteration, closer to U·Vᵀ in the same 5 steps; with MuonEq row equilibration
  before (arXiv:2603.28254) and Muon+ Frobenius renormalisation to sqrt(min(m, n)) after (arXiv:2602.21545).
- `--muon_beta2 0.9`: NorMuon (arXiv:2510.05491): an EMA of each neuron's mean squared update rescales the
  orthogonalised update per row (tall) or column (wide), keeping its overall Frobenius norm.
- `--matrix_weight_decay`: cautious weight decay, applied only where the update and the weight agree in sign
  (the decay never fights the step), scheduled by the trainer (cosine to zero in the frontier recipe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.common import UserError, get_world_size
from nanochat.flags import flag
from nanochat.schedules import Schedule, constant, cosine_to_zero, muon_momentum

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express for 5 iterations (safety factor 2e-2, cushion 2), from the paper's published table
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ORTHOGONALIZERS = ("newton_schulz", "polar_express")


@torch.no_grad()
def orthogonalize(grad: torch.Tensor, steps: int = 5, method: str = "newton_schulz") -> torch.Tensor:
    """Approximately U·Vᵀ of grad's SVD (batched over leading dims); bf16 on GPU (fast, and the iteration
    tolerates it), float32 elsewhere."""
    x = grad.bfloat16() if grad.is_cuda else grad.float()
    polar = method == "polar_express"
    if polar:  # rows to the mean row norm: a better-conditioned spectrum going in
        target = x.float().norm(dim=(-2, -1), keepdim=True) / x.size(-2) ** 0.5
        x = x * (target / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(x.dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    if polar:  # the 1.01 keeps the spectral norm safely below 1 in bf16
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
        coefficients = POLAR_EXPRESS_COEFFICIENTS[:steps]
    else:
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
        coefficients = (NS_COEFFICIENTS,) * steps
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.mT if transposed else x
    if polar:  # an exactly semi-orthogonal matrix has Frobenius norm sqrt(min(m, n))
        norm = x.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        x = x * (min(x.size(-2), x.size(-1)) ** 0.5 / norm).to(x.dtype)
    return x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters only."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 orthogonalizer: str = "newton_schulz", beta2: float = 0.0, weight_decay: float = 0.0):
        by_shape: dict[torch.Size, list] = {}
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
            by_shape.setdefault(p.shape, []).append(p)
        # one group per shape, in first-seen order (the same on every rank), so a rank's slice is a plain stack
        groups = [{"params": ps} for ps in by_shape.values()]
        # momentum is set per step by the trainer's schedule (nanochat.schedules.muon_momentum warms it up)
        # weight_decay likewise, from initial_weight_decay
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"orthogonalizer must be one of {ORTHOGONALIZERS}, got {orthogonalizer!r}")
        defaults = dict(lr=lr, initial_lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        orthogonalizer=orthogonalizer, beta2=beta2, weight_decay=weight_decay,
                        initial_weight_decay=weight_decay)
        super().__init__(groups, defaults)

    def direction(self, p: torch.Tensor, grad: torch.Tensor, group: dict, momentum: float) -> torch.Tensor:
        """Advance p's momentum buffer with grad and return the (Nesterov) direction to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if group["nesterov"] else buf

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # optimizer states saved before a switch existed (load_state_dict keeps the saved groups) resume with
        # the value this optimizer was built with, which --resume's recipe check has already matched
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def normalize_neurons(self, p: torch.Tensor, update: torch.Tensor, beta2: float) -> torch.Tensor:
        """NorMuon: divide each neuron's update by the root of an EMA of its mean square (rows of a tall
        matrix, columns of a wide one), then restore the update's Frobenius norm."""
        update = update.float()
        neuron_dim = -1 if update.size(-2) >= update.size(-1) else -2  # average over this dim: one value per neuron
        mean_square = update.square().mean(dim=neuron_dim, keepdim=True)
        state = self.state[p]
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros_like(mean_square)
        second_moment = state["second_moment"]
        second_moment.lerp_(mean_square, 1 - beta2)
        scaled = update * second_moment.clamp_min(1e-10).rsqrt()
        return scaled * (update.norm() / scaled.norm().clamp_min(1e-10))

    def apply(self, params: list[torch.Tensor], directions: torch.Tensor, group: dict) -> None:
        """Orthogonalise a stack of same-shape directions in one batched call and step each parameter."""
        updates = orthogonalize(directions, group["ns_steps"], group["orthogonalizer"])
        # orthogonal updates have unit singular values; tall matrices get a larger step so per-element RMS matches
        scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5
        lr, weight_decay = group["lr"] * scale, group["weight_decay"]
        for p, update in zip(params, updates):
            if group["beta2"]:
                update = self.normalize_neurons(p, update, group["beta2"])
            update = update.to(p.dtype)
            if weight_decay:  # cautious: decay only where the step already pulls the weight towards zero
                p.sub_(lr * weight_decay * p * (update * p >= 0))
            p.add_(update, alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        world = get_world_size()
        if world == 1:
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    directions = torch.stack([self.direction(p, p.grad, group, group["momentum"]) for p in params])
                    self.apply(params, directions, group)
            return None
        self.distributed_step(world, dist.get_rank())
        return None

    def distributed_step(self, world: int, rank: int) -> None:
        pending = []  # (group, chunk of params, this rank's reduced grad, reduce work)
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world):
                chunk = params[base:base + world]
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
                grads += [torch.zeros_like(chunk[0])] * (world - len(chunk))  # pad so every rank gets a slot
                owned_grad = torch.empty_like(chunk[0])
                work = dist.reduce_scatter(owned_grad, grads, op=dist.ReduceOp.SUM, async_op=True)
                pending.append((group, chunk, owned_grad, work))
        gathers = []
        for group, chunk, owned_grad, work in pending:
            work.wait()
            if rank < len(chunk):
                mine = chunk[rank]
                direction = self.direction(mine, owned_grad.div_(world), group, group["momentum"])
                self.apply([mine], direction[None], group)
            outputs = chunk + [torch.empty_like(chunk[0]) for _ in range(world - len(chunk))]
            source = chunk[rank] if rank < len(chunk) else outputs[rank]
            gathers.append(dist.all_gather(outputs, source.clone(), async_op=True))
        for work in gathers:
            work.wait()


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay; ZeRO-2 sharded state under torchrun."""

    def __init__(self, param_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.8, 0.95),
                 eps: float = 1e-10, weight_decay: float = 0.0):
        groups = []
        for group in param_groups:
            group = dict(group)
            group.setdefault("initial_lr", group.get("lr", lr))
            groups.append(group)
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def update(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    @torch.no_grad()
    def step(self, closure=None):
        world = get_world_size()
        if world == 1:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.update(p, p.grad, self.state[p], group)
            return None
        self.distributed_step(world, dist.get_rank())
        return None

    def distributed_step(self, world: int, rank: int) -> None:
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if p.size(0) % world == 0:
                    shard = torch.empty_like(grad[:p.size(0) // world])
                    work = dist.reduce_scatter_tensor(shard, grad.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
                    pending.append((group, p, shard, work, True))
                else:
                    grad = grad.clone()
                    pending.append((group, p, grad, dist.all_reduce(grad, async_op=True), False))
        gathers = []
        for group, p, grad, work, sharded in pending:
            work.wait()
            grad.div_(world)
            if not sharded:
                self.update(p, grad, self.state[p], group)
                continue
            rows = p.size(0) // world
            shard = p[rank * rows:(rank + 1) * rows].clone()
            self.update(shard, grad, self.state[p], group)
            gathers.append(dist.all_gather_into_tensor(p, shard, async_op=True))
        for work in gathers:
            work.wait()


ADAMW_GROUPINGS = ("shared", "per_group")
WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")


@dataclass
class OptimFlags:
    """The optimizer's flags, shared by every training stage: the one home of the LR defaults (the dataclass
    defaults are the 2025 recipe; `nanochat.recipes` holds the others)."""
    embedding_lr: float = flag(0.2, "AdamW LR of the input embedding (× (model_dim/768)^-0.5; chat stages: also × "
                                    "--init_lr_frac)")
    unembedding_lr: float = flag(0.004, "AdamW LR of the lm_head (× (model_dim/768)^-0.5; chat stages: also × "
                                        "--init_lr_frac)")
    matrix_lr: float = flag(0.02, "Muon LR of the block matrices (chat stages: × --init_lr_frac)")
    scalar_lr: float = flag(-1.0, "AdamW LR of the per-layer lambdas (× 0.01 for the residual scales); "
                                  "-1 = the lm_head's LR")
    weight_decay: float = flag(0.0, "AdamW weight decay of the embeddings and lm_head (--adamw_groups shared)")
    adamw_groups: str = flag("shared", "AdamW settings per parameter group: shared (one betas/decay for all) | "
                                       "per_group (nanochat 2026: own betas, decay and LR share per group)",
                             ADAMW_GROUPINGS)
    muon_orthogonalizer: str = flag("newton_schulz", "how Muon orthogonalises", ORTHOGONALIZERS)
    muon_beta2: float = flag(0.0, "NorMuon per-neuron second-moment EMA decay; 0 = off")
    matrix_weight_decay: float = flag(0.0, "cautious weight decay of Muon's matrices (batch-scaled in base_train "
                                           "with --batch_lr_scaling); 0 = off")
    weight_decay_schedule: str = flag("constant", "Muon weight decay over the run: constant | cosine (to zero)",
                                      WEIGHT_DECAY_SCHEDULES)
    muon_momentum_start: float = flag(0.85, "Muon momentum at step 0")
    muon_momentum: float = flag(0.95, "Muon momentum after --muon_momentum_warmup steps")
    muon_momentum_warmup: int = flag(300, "steps of linear Muon momentum warm-up")
    muon_momentum_final: float = flag(-1.0, "Muon momentum at the end of the LR warm-down (linear from "
                                            "--muon_momentum over it); -1 = off")

    def __post_init__(self):
        if self.muon_momentum_warmup < 0:
            raise UserError(f"--muon_momentum_warmup must be >= 0, got {self.muon_momentum_warmup}")
        if not 0 <= self.muon_beta2 < 1:
            raise UserError(f"--muon_beta2 must be in [0, 1), got {self.muon_beta2}")
        if self.matrix_weight_decay < 0 or self.weight_decay < 0:
            raise UserError("--weight_decay and --matrix_weight_decay must be >= 0")
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


def adamw_groups(model, groups: dict, flags: OptimFlags, lr_scale: float, gate_lr_scale: float,
                 muon_gates: list) -> list[dict]:
    """AdamW param groups. shared: the lm_head (tied: the one shared matrix) at the unembedding LR, embeddings
    (input and value) at the embedding LR, every vector and gate at the lm_head's LR. per_group (nanochat 2026):
    own betas and decay per group, value embeddings at half the embedding LR, the residual scales at 1% of
    --scalar_lr, the x0 blends with beta1 0.96, the smear/backout gates at a fixed 0.2 × `gate_lr_scale`."""
    width = (model.config.model_dim / 768) ** -0.5
    unembedding, embedding = flags.unembedding_lr * lr_scale * width, flags.embedding_lr * lr_scale * width
    scalar = unembedding if flags.scalar_lr == -1 else flags.scalar_lr * lr_scale
    gates = [p for p in groups["gates"] if all(p is not q for q in muon_gates)]
    if flags.adamw_groups == "shared":
        result = [{"params": groups["lm_head"], "lr": unembedding}]
        if not model.config.tie_embeddings:  # tied: the one shared matrix sits in lm_head, at the unembedding LR
            result.append({"params": groups["embeddings"] + groups["value_embeds"], "lr": embedding})
        # vectors and gates (learnable RMSNorm gains, the frontier switches' lambdas and gates): AdamW, not Muon
        small = groups["norm_gains"] + groups["resid_lambdas"] + groups["x0_lambdas"] + gates
        if small:
            result.append({"params": small, "lr": scalar})
        return result
    result = [
        {"params": groups["lm_head"], "lr": unembedding, "betas": (0.8, 0.96), "weight_decay": 0.01},
        {"params": groups["embeddings"], "lr": embedding, "betas": (0.8, 0.995), "weight_decay": 0.001},
        {"params": groups["value_embeds"], "lr": embedding * 0.5, "betas": (0.8, 0.995), "weight_decay": 0.01},
        {"params": groups["resid_lambdas"], "lr": scalar * 0.01, "betas": (0.8, 0.95), "weight_decay": 0.05},
        {"params": groups["x0_lambdas"], "lr": scalar, "betas": (0.96, 0.95), "weight_decay": 0.0},
        {"params": gates, "lr": 0.2 * gate_lr_scale, "betas": (0.8, 0.95), "weight_decay": 0.0},
        {"params": groups["norm_gains"], "lr": unembedding, "betas": (0.8, 0.95), "weight_decay": 0.0},
    ]
    return [group for group in result if group["params"]]


def setup_optimizers(model, flags: OptimFlags | None = None, lr_scale: float = 1.0,
                     matrix_weight_decay: float | None = None,
                     gate_lr_scale: float | None = None) -> list[torch.optim.Optimizer]:
    """[AdamW (embeddings, lm_head, vectors and gates), Muon (block matrices)] over `model.param_groups()`,
    every LR × `lr_scale` (batch-size scaling in base_train, --init_lr_frac in the chat stages). AdamW LRs also
    scale as (model_dim / 768)^-0.5 so the defaults tuned at width 768 carry over to other widths.
    `matrix_weight_decay` overrides the flag's (base_train scales it with the batch size and run length).
    `gate_lr_scale` (default `lr_scale`) scales per_group's fixed smear/backout gate LR: nanochat 2026 exempts it
    from the batch-size scaling but not from --init_lr_frac."""
    flags = flags or OptimFlags()
    groups = model.param_groups()
    # per_group follows nanochat 2026, where the value gates sit among the block matrices, in Muon
    block_params = {id(p) for p in model.blocks.parameters()}
    muon_gates = [p for p in groups["gates"] if p.ndim == 2 and id(p) in block_params] \
        if flags.adamw_groups == "per_group" else []
    gate_lr_scale = lr_scale if gate_lr_scale is None else gate_lr_scale
    adamw = AdamW(adamw_groups(model, groups, flags, lr_scale, gate_lr_scale, muon_gates), betas=(0.8, 0.95), eps=1e-10,
                  weight_decay=flags.weight_decay)
    decay = flags.matrix_weight_decay if matrix_weight_decay is None else matrix_weight_decay
    muon = Muon(groups["matrices"] + muon_gates, lr=flags.matrix_lr * lr_scale, momentum=flags.muon_momentum,
                orthogonalizer=flags.muon_orthogonalizer, beta2=flags.muon_beta2, weight_decay=decay)
    return [adamw, muon]


def training_schedule(flags: OptimFlags, num_iterations: int, lr: Callable[[int], float],
                      warmdown_ratio: float = 0.0) -> Schedule:
    """The LR multiplier `lr` plus the Muon momentum and weight-decay schedules the flags ask for."""
    final = None if flags.muon_momentum_final == -1 else flags.muon_momentum_final
    momentum = muon_momentum(flags.muon_momentum_start, flags.muon_momentum, flags.muon_momentum_warmup, final,
                             num_iterations, warmdown_ratio)
    decay = cosine_to_zero(num_iterations) if flags.weight_decay_schedule == "cosine" else constant()
    return Schedule(lr=lr, muon_momentum=momentum, weight_decay=decay)
