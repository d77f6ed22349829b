"""The lm_head fused into the loss (nanochat/fused_loss.py): the same losses and gradients as the unfused path,
and the path compiled CPU training takes."""
import pytest
import torch
import torch.nn.functional as F

import nanochat.fused_loss as fused_loss
from nanochat.compiled import BucketedCompile
from nanochat.fused_loss import ROWS_PER_BLOCK, FusedLinearCrossEntropy, fused_linear_cross_entropy
from nanochat.gpt import GPT
from tests.model_cases import tiny_config


def unfused(x, weight, targets, softcap):
    logits = x @ weight.T
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")


@pytest.mark.parametrize("softcap", [15.0, 0.0])
def test_losses_and_gradients_match_the_unfused_loss(softcap):
    torch.manual_seed(0)
    rows = 2 * ROWS_PER_BLOCK + 37  # a padded last block
    x = torch.randn(rows, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    targets = torch.randint(0, 50, (rows,))
    targets[::7] = -1  # ignored rows count for nothing
    scale = torch.tensor(0.3)  # what backward gets from a mean or a grad-accumulation division
    (fused_loss_value := fused_linear_cross_entropy(x, weight, targets, softcap)).mul(scale).backward()
    fused_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    (reference := unfused(x, weight, targets, softcap)).mul(scale).backward()
    assert fused_loss_value.item() == pytest.approx(reference.item(), rel=1e-5)
    for fused_grad, grad in zip(fused_grads, (x.grad, weight.grad)):
        assert torch.allclose(fused_grad, grad, rtol=1e-4, atol=1e-6)


def test_compiled_cpu_training_takes_the_fused_path_with_unchanged_losses_and_gradients(monkeypatch):
    forwards = []
    real_forward = FusedLinearCrossEntropy.forward
    monkeypatch.setattr(FusedLinearCrossEntropy, "forward",
                        staticmethod(lambda *args: forwards.append(1) or real_forward(*args)))
    real_compile = torch.compile  # dynamo's eager backend: the same tracing and graph break, no C++ build
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager", **kwargs))
    fused_loss.compiled_block_kernel.cache_clear()
    torch.manual_seed(0)
    model = GPT(tiny_config(300, max_seq_len=64, smear=True, value_embeds=True))  # vocab padded to 320
    model.init_weights()
    inputs, targets = torch.randint(0, 300, (4, 64)), torch.randint(0, 300, (4, 64))
    targets[0, :10] = -1
    compiled = BucketedCompile(model)
    results = []
    for forward in (compiled, model):
        loss = forward(inputs, targets)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    assert forwards == [1]  # the compiled call only; eager calls keep the unfused loss
    (fused_value, fused_grads), (value, grads) = results
    assert fused_value.item() == pytest.approx(value.item(), rel=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name
    with torch.no_grad():  # evaluation keeps the unfused loss, compiled or not
        assert compiled(inputs, targets).item() == pytest.approx(value.item(), rel=1e-5)
    assert forwards == [1]
    fused_loss.compiled_block_kernel.cache_clear()
