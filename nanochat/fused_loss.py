"""The training loss fused with the lm_head, for compiled training on CPU.

    total = fused_linear_cross_entropy(x, weight, targets, softcap)   # x (N, D), weight (V, D), targets (N,)

returns the sum of the (soft-capped) cross-entropy losses over the targets that are not -1, like
`F.cross_entropy(logits(x), targets, ignore_index=-1, reduction="sum")`. The logits are made ROWS_PER_BLOCK rows
at a time and each block's gradient is worked out in the forward, while the block is still in cache; backward
only scales the saved gradients of x and weight by the incoming one. So the (N, V) float32 logits never exist
and are never read back: at the race shape (4096 rows, vocab 8192) the lm_head and loss take ~260 ms a step
instead of ~400 ms for the compiled unfused graph (docs/benchmarks.md).

Used by GPT.forward only while torch.compile traces it on CPU (training with grad, mean or sum reduction); it
runs outside the model's graph, with its own compiled block kernel of one fixed shape (the last block is padded
with ignored rows). On CUDA the model's compiled graph keeps the unfused loss: there the logits' memory traffic
is cheap and this path is unmeasured.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# 256 rows × vocab 8192 float32 = 8 MiB per block: measured fastest of 64-512 at the race shape
ROWS_PER_BLOCK = 256


def block_loss_and_grad(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of one block of raw logits z (rows, V) and its gradient d(sum)/dz; rows with target -1 count
    for nothing."""
    logits = z.float()
    if softcap > 0:
        squashed = torch.tanh(logits / softcap)
        logits = softcap * squashed
    valid = (targets >= 0).unsqueeze(1)
    safe = targets.clamp(min=0).unsqueeze(1)
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    loss = ((log_norm - logits.gather(1, safe)) * valid).sum()
    grad = torch.exp(logits - log_norm) - F.one_hot(safe.squeeze(1), logits.size(1)).to(logits.dtype)
    if softcap > 0:
        grad = grad * (1 - squashed * squashed)
    return loss, grad * valid


@functools.cache
def compiled_block_kernel():
    return torch.compile(block_loss_and_grad, dynamic=False)


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap: float):
        kernel = compiled_block_kernel()
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x, grad_weight = torch.empty_like(x), torch.zeros_like(weight)
        for start in range(0, x.size(0), ROWS_PER_BLOCK):
            rows = x[start:start + ROWS_PER_BLOCK]
            block_targets = targets[start:start + ROWS_PER_BLOCK]
            pad = ROWS_PER_BLOCK - rows.size(0)
            if pad:  # one kernel shape for every block
                rows = F.pad(rows, (0, 0, 0, pad))
                block_targets = F.pad(block_targets, (0, pad), value=-1)
            loss, grad = kernel(rows @ weight.T, block_targets, softcap)
            total += loss
            grad = grad.to(weight.dtype)
            grad_x[start:start + ROWS_PER_BLOCK] = (grad @ weight)[:grad.size(0) - pad]
            grad_weight.addmm_(grad.T, rows)
        ctx.save_for_backward(grad_x, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_weight * grad_total.to(grad_weight.dtype), None, None


@torch.compiler.disable
def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               softcap: float) -> torch.Tensor:
    return FusedLinearCrossEntropy.apply(x, weight, targets, softcap)
