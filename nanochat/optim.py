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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import get_world_size
from nanochat.flags import flag

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(grad: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ of grad's SVD; bf16 on GPU (fast, and the iteration tolerates it), float32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = grad.bfloat16() if grad.is_cuda else grad.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters only."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        by_shape: dict[torch.Size, list] = {}
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
            by_shape.setdefault(p.shape, []).append(p)
        # one group per shape, in first-seen order (the same on every rank), so a rank's slice is a plain stack
        groups = [{"params": ps} for ps in by_shape.values()]
        # momentum is set per step by the trainer's schedule (nanochat.schedules.muon_momentum warms it up)
        defaults = dict(lr=lr, initial_lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(groups, defaults)

    def direction(self, p: torch.Tensor, grad: torch.Tensor, group: dict, momentum: float) -> torch.Tensor:
        """Advance p's momentum buffer with grad and return the (Nesterov) direction to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if group["nesterov"] else buf

    @staticmethod
    def apply(params: list[torch.Tensor], directions: torch.Tensor, group: dict) -> None:
        """Orthogonalise a stack of same-shape directions in one batched call and step each parameter."""
        updates = orthogonalize(directions, group["ns_steps"])
        # orthogonal updates have unit singular values; tall matrices get a larger step so per-element RMS matches
        scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5
        for p, update in zip(params, updates):
            p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

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


@dataclass
class OptimFlags:
    """The optimizer's flags, shared by every training stage: the one home of the LR defaults."""
    embedding_lr: float = flag(0.2, "AdamW LR of the input embedding (× (model_dim/768)^-0.5; chat stages: also × "
                                    "--init_lr_frac)")
    unembedding_lr: float = flag(0.004, "AdamW LR of the lm_head (× (model_dim/768)^-0.5; chat stages: also × "
                                        "--init_lr_frac)")
    matrix_lr: float = flag(0.02, "Muon LR of the block matrices (chat stages: × --init_lr_frac)")
    weight_decay: float = flag(0.0, "AdamW weight decay of the embeddings and lm_head")


def setup_optimizers(model, flags: OptimFlags | None = None, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
    """[AdamW for wte and lm_head, Muon for every block matrix], every LR × `lr_scale`. AdamW LRs also scale as
    (model_dim / 768)^-0.5 so the defaults tuned at width 768 carry over to other widths."""
    flags = flags or OptimFlags()
    embedding_lr, unembedding_lr = flags.embedding_lr * lr_scale, flags.unembedding_lr * lr_scale
    matrix_lr, weight_decay = flags.matrix_lr * lr_scale, flags.weight_decay
    scale = (model.config.model_dim / 768) ** -0.5
    groups = model.param_groups()
    adam_groups = [{"params": groups["lm_head"], "lr": unembedding_lr * scale}]
    if not model.config.tie_embeddings:  # tied: the one shared matrix sits in lm_head, at the unembedding LR
        adam_groups.append({"params": groups["embeddings"] + groups["value_embeds"], "lr": embedding_lr * scale})
    # vectors and gates (learnable RMSNorm gains, the frontier switches' lambdas and gates): AdamW, not Muon
    small = groups["norm_gains"] + groups["resid_lambdas"] + groups["x0_lambdas"] + groups["gates"]
    if small:
        adam_groups.append({"params": small, "lr": unembedding_lr * scale})
    adamw = AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    muon = Muon(groups["matrices"], lr=matrix_lr)
    return [adamw, muon]
