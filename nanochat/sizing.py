"""Sizing a run before starting it: parameter split, FLOPs per token, run length for a param:data ratio, and the
peak training memory per device (weights, grads, optimizer state, activations), with and without activation
checkpointing. `scripts.model_info` prints it; tests check it against a measured step.

Activations are counted from what autograd keeps for backward in `nanochat.gpt` (per token, per block):
the block input and the mid-block residual, the two RMSNorm outputs, rotary and QK-normed q/k, v, the attention
output and its re-layout for c_proj, and the MLP's hidden tensors (ReLU² keeps 2, SwiGLU 4). Under autocast
(bf16 on GPU) those are 2 bytes except the fp32 residual stream, plus one bf16 copy of the normed input per
consumer (c_q, c_k, c_v). The loss keeps fp32 logits twice per token (tanh and log-softmax outputs) when it fits
one chunk; a chunked loss keeps only the final hidden state and recomputes one chunk of logits at a time.
Attention is assumed to run a flash kernel (no T×T matrix), as SDPA does on GPU and on CPU without GQA.
Frontier switches add per token: the value-embedding lookup and the gated V on each value-embedding layer, the
scaled residual per block (residual scalars), and one residual-sized tensor each for smear and backout.
With compute_dtype_embeddings under autocast the embedding tables, their grads and AdamW state are bf16.

A CUDA device needs more than the tensors: `MemoryEstimate.device_total` adds what the allocator and the
runtime take on top (figures for an H100 with CUDA 12, the largest we know of; a smaller card takes less):
- the optimizer step's transient buffers (three copies of the largest Muon matrix for the update and
  Newton-Schulz, plus an fp32 copy of the matrix gradients in flight in reduce-scatter/all-gather when
  distributed), counted against the activations they never coexist with;
- the caching allocator's reserve above the allocated peak (fragmentation): a stated 10% margin;
- the cuBLAS/cuBLASLt workspaces (64 MiB), NCCL's channel buffers when distributed (512 MiB on an 8-GPU
  NVLink node), and the CUDA context with torch's kernels (600 MiB), which no allocator statistic shows.
`scripts.model_info --measure` prints the allocator's peak reserved memory next to these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanochat.checkpoint import meta_model
from nanochat.gpt import GPT, LOSS_CHUNK_ELEMENTS
from nanochat.model_config import GPTConfig
from nanochat.optim import AdamW, Muon, setup_optimizers

FP32 = 4
MIB = 2**20
ALLOCATOR_MARGIN = 0.10
CUBLAS_WORKSPACE = 64 * MIB
NCCL_BUFFERS = 512 * MIB
CUDA_CONTEXT = 600 * MIB


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    optimizer_transient: int = 0
    nccl: int = 0

    @property
    def total(self) -> int:
        """Peak bytes of tensors (torch.cuda.max_memory_allocated): the step's activations, or later the
        optimizer's transient buffers, on top of weights, grads and optimizer state."""
        return self.weights + self.grads + self.optimizer + max(self.activations, self.optimizer_transient)

    @property
    def reserved(self) -> int:
        """What the caching allocator holds at that peak (torch.cuda.max_memory_reserved)."""
        return int(self.total * (1 + ALLOCATOR_MARGIN)) + CUBLAS_WORKSPACE

    @property
    def device_total(self) -> int:
        """Everything this process takes on a CUDA device (nvidia-smi's figure)."""
        return self.reserved + self.nccl + CUDA_CONTEXT


def optimizer_state_elements(model: GPT) -> int:
    """AdamW keeps two moments per parameter, Muon one momentum buffer (the same split setup_optimizers makes)."""
    total = 0
    for opt in setup_optimizers(model):
        per_param = 2 if isinstance(opt, AdamW) else 1 if isinstance(opt, Muon) else 0
        total += per_param * sum(p.numel() for group in opt.param_groups for p in group["params"])
    return total


def block_activation_bytes(config: GPTConfig, autocast: bool, expanded_kv: bool = False) -> float:
    """Bytes autograd keeps per token for one block. `expanded_kv`: GQA's k/v copied out to every query head
    (nanochat.attention does so on CUDA in float32, where SDPA would otherwise take its T×T math kernel), and
    SDPA keeps those copies."""
    dim, dim_q = config.model_dim, config.num_heads * config.head_dim
    dim_kv = config.num_kv_heads * config.head_dim
    qk = 2 if config.qk_norm else 1  # with QK-norm both the rotary output and the normed q/k are kept
    hidden = config.hidden_dim * (4 if config.mlp == "swiglu" else 2)
    gains = 2 * dim if config.norm_weight else 0
    residual = 2 * dim  # block input and mid-block residual, fp32 even under autocast
    normed = 2 * dim if not autocast else dim * (3 + (2 if config.mlp == "swiglu" else 1))
    other = qk * (dim_q + dim_kv) + dim_kv + 2 * dim_q + hidden + gains
    if expanded_kv and dim_kv < dim_q:
        other += 2 * dim_q
    width = 2 if autocast else FP32
    return FP32 * residual + width * (normed + other)


def switch_activation_bytes(config: GPTConfig, autocast: bool) -> float:
    """Bytes per token the frontier switches add over the whole model."""
    width = 2 if autocast else FP32
    dim_kv = config.num_kv_heads * config.head_dim
    value_embeds = len(config.value_embed_layers) * width * (2 * dim_kv + config.num_kv_heads)
    residual = FP32 * config.model_dim * (config.depth * config.residual_scalars + config.smear + config.backout)
    return value_embeds + residual


def estimate_memory(config: GPTConfig, device_batch_size: int, seq_len: int | None = None, autocast: bool = False,
                    activation_checkpointing: bool = False, world_size: int = 1,
                    expanded_kv: bool = False) -> MemoryEstimate:
    """Peak bytes on one device for a training step (fp32 master weights; `autocast` = bf16 compute;
    `expanded_kv` = a float32 run on CUDA with GQA, see block_activation_bytes)."""
    seq_len = seq_len or config.max_seq_len
    model = meta_model(config)
    counts = model.num_params()
    params = counts["total"]
    # bytes saved per embedding element (weight, grad and two AdamW moments) when the tables are bf16
    narrow = (FP32 - 2) * (counts["embedding"] + counts["value_embeds"]) if (
        config.compute_dtype_embeddings and autocast) else 0
    tokens = device_batch_size * seq_len
    block = tokens * block_activation_bytes(config, autocast, expanded_kv)
    stem = tokens * (FP32 * config.model_dim * 3 + switch_activation_bytes(config, autocast))
    vocab = config.padded_vocab_size
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    if tokens <= chunk_rows:
        logits = tokens * 3 * FP32 * vocab  # tanh and log-softmax outputs kept, plus the logits grad in backward
    else:
        logits = chunk_rows * 4 * FP32 * vocab  # one recomputed chunk: logits, tanh, log-softmax, grad
    if activation_checkpointing:
        # only each block's input is kept; one block is recomputed at a time, after the loss is done with
        activations = tokens * config.depth * FP32 * config.model_dim + stem + max(block, logits)
    else:
        activations = config.depth * block + stem + logits
    # ZeRO-2 AdamW and owner-only Muon state split the optimizer state across ranks
    optimizer = (FP32 * optimizer_state_elements(model) - 2 * narrow) // world_size
    return MemoryEstimate(weights=FP32 * params - narrow, grads=FP32 * params - narrow, optimizer=optimizer,
                          activations=int(activations), optimizer_transient=optimizer_transient_bytes(model, world_size),
                          nccl=NCCL_BUFFERS if world_size > 1 else 0)


def optimizer_transient_bytes(model: GPT, world_size: int) -> int:
    """Buffers the optimizer step allocates and frees: three fp32 copies of the largest Muon matrix (momentum
    update, Newton-Schulz iterate and Gram products) and, distributed, the matrix gradients in flight."""
    matrices = [p for opt in setup_optimizers(model) if isinstance(opt, Muon)
                for group in opt.param_groups for p in group["params"]]
    if not matrices:
        return 0
    in_flight = sum(p.numel() for p in matrices) if world_size > 1 else 0
    return FP32 * (3 * max(p.numel() for p in matrices) + in_flight)


def largest_batch(config: GPTConfig, budget_bytes: float, seq_len: int | None = None, **kwargs) -> int:
    """The largest device batch whose whole-device estimate fits `budget_bytes` (0 when even one row does not)."""
    low, high = 0, 1
    while estimate_memory(config, high, seq_len, **kwargs).device_total <= budget_bytes and high < 1 << 16:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if estimate_memory(config, mid, seq_len, **kwargs).device_total <= budget_bytes:
            low = mid
        else:
            high = mid
    return low


def profiled_cpu_peak(fn) -> int:
    """Peak bytes allocated above the starting point while `fn()` runs, from the profiler's allocation events
    (CPU has no max_memory_allocated)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure_peak_memory(config: GPTConfig, device_batch_size: int, device: torch.device,
                        activation_checkpointing: bool = False) -> int:
    """Peak bytes of a real training step (the second, so optimizer state exists) on `device`."""
    from nanochat.checkpoint import create_model

    model = create_model(config, device)
    model.activation_checkpointing = activation_checkpointing
    optimizers = setup_optimizers(model)
    autocast = device.type == "cuda"
    tokens = torch.randint(0, config.vocab_size, (device_batch_size, config.max_seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    resident += sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
                    for t in state.values() if torch.is_tensor(t))
    return resident + profiled_cpu_peak(step)
