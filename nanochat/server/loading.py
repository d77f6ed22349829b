"""Loading a checkpoint into server workers: one model replica per GPU on cuda; on cpu/mps the workers share
one model (its weights are read-only during generation, and each request has its own KV cache), except on
mps, which serves with one worker."""
from __future__ import annotations

import os

import torch

from nanochat.checkpoint import complete_steps, load_model, newest_tag, source_dir
from nanochat.common import UserError, print0
from nanochat.engine import Engine
from nanochat.server.app import LoadedModel
from nanochat.server.workers import Worker


def worker_devices(device_type: str, num_workers: int) -> list[str]:
    if num_workers < 1:
        raise UserError(f"--num_gpus must be >= 1, got {num_workers}")
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if num_workers > available:
            raise UserError(f"--num_gpus {num_workers} but torch sees {available} GPU(s); use --num_gpus {available}")
        return [f"cuda:{i}" for i in range(num_workers)]
    if device_type == "mps" and num_workers > 1:
        # several threads generating on one MPS device crash torch; requests queue for the one worker instead
        print0(f"note: --num_gpus {num_workers} on mps serves with one worker (MPS is one device)")
        return ["mps"]
    return [device_type] * num_workers


def cpu_threads_per_worker(num_workers: int) -> int:
    """Split the cores between workers and leave one to the event loop: torch's OpenMP threads spin between ops,
    and a loop thread that cannot get a core delays every stream's chunks and /health."""
    return max(1, ((os.cpu_count() or 1) - 1) // num_workers)


def load_workers(source: str, tag: str | None, step: int | None, device_type: str, dtype: torch.dtype | None,
                 num_workers: int) -> LoadedModel:
    """Load `source` (newest tag and step unless given) once per distinct device and wrap one Engine per worker."""
    devices = worker_devices(device_type, num_workers)
    if device_type == "cpu":
        torch.set_num_threads(cpu_threads_per_worker(num_workers))
    tag = tag or newest_tag(source_dir(source))
    steps = complete_steps(source_dir(source) / tag)
    if not steps:
        raise UserError(f"no complete checkpoints in {source_dir(source) / tag}; check --model_tag")
    step = steps[-1] if step is None else step
    loaded = {}
    for device in dict.fromkeys(devices):
        loaded[device] = load_model(source, device, tag=tag, step=step, dtype=dtype)
    workers = [Worker(i, Engine(loaded[device][0], loaded[device][1]), device) for i, device in enumerate(devices)]
    model, tokenizer, _meta = loaded[devices[0]]
    return LoadedModel(workers=workers, tokenizer=tokenizer, max_seq_len=model.config.max_seq_len,
                       model_id=f"nanochat-{source}-{tag}-step{step}",
                       info={"source": source, "tag": tag, "step": step})
