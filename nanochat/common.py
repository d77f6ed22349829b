"""Runtime basics every stage shares: base dir, device and dtype choice, distributed init, logging,
seeding, peak FLOPs for MFU, and an optional wandb run.

Nothing here reads flags; scripts pass what the user asked for and these functions decide.
"""
from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist


T = TypeVar("T")


class UserError(ValueError):
    """Bad input from the user. Entry points print it as one `error: ...` line and exit 2."""


# ---------------------------------------------------------------------------------------------------------
# Base directory

def get_base_dir() -> Path:
    """`$NANOCHAT_BASE_DIR`, else `~/.cache/nanochat`; created on first use."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"
    base.mkdir(parents=True, exist_ok=True)
    return base


# ---------------------------------------------------------------------------------------------------------
# Atomic writes: a crash mid-write must leave the previous file (or no file) in place, never a torn one

def fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry (a no-op where the OS refuses)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path next to `path` for any writer (pyarrow, torch.save, ...); on success it is fsynced
    and renamed over `path`, on error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # rename last
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path | str, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


# ---------------------------------------------------------------------------------------------------------
# Device and dtype

DEVICE_TYPES = ("cuda", "mps", "cpu")


def autodetect_device_type(requested: str = "auto") -> str:
    """cuda > mps > cpu unless the user names one; naming one that is absent is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested not in DEVICE_TYPES:
        raise UserError(f"--device_type must be auto, cuda, mps or cpu, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device_type cuda was asked for but torch sees no CUDA GPU; use --device_type cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device_type mps was asked for but this torch has no MPS backend; use --device_type cpu")
    return requested


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mps_supports_bfloat16() -> bool:
    if not torch.backends.mps.is_available():
        return False
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps") * 2
        return True
    except (RuntimeError, TypeError):
        return False


def cuda_has_native_bfloat16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores arrived with Ampere (8.0); V100 and T4 only emulate bf16, slower than float32."""
    return capability >= (8, 0)


def resolve_dtype(device_type: str, requested: str = "auto") -> torch.dtype:
    """bfloat16 on GPUs with native bf16 (and on mps when this torch supports it), else float32; an explicit
    dtype wins."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device_type == "cuda":
        native = cuda_has_native_bfloat16(torch.cuda.get_device_capability())
        return torch.bfloat16 if native else torch.float32
    if device_type == "mps":
        return torch.bfloat16 if mps_supports_bfloat16() else torch.float32
    return torch.float32


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Compute in `dtype` with float32 master weights; float32 needs no autocast."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (cpu for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """dtype for sums that must stay exact (eval counts, loss totals): float64, except on MPS, which has none.
    float32 there still counts exactly up to 2^24 and sums per-batch totals with ~1e-7 relative error; float64
    elsewhere keeps CPU and CUDA figures identical to what they always were."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def sum_across_ranks(values, device: torch.device | str) -> torch.Tensor:
    """`values` (numbers or a tensor) summed over all ranks, as a tensor on `device` in the accumulator dtype:
    NCCL reduces only device tensors, and MPS has no float64."""
    total = torch.as_tensor(values, dtype=accumulator_dtype(device), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total


# ---------------------------------------------------------------------------------------------------------
# Distributed

@dataclass(frozen=True)
class DistInfo:
    is_distributed: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def is_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def local_device(device_type: str, local_rank: int, world_size: int) -> torch.device:
    """This process's device. Under SLURM each task may see only its own GPU (device_count 1 while LOCAL_RANK
    counts every task on the node), hence the modulo. MPS is one device for the whole machine."""
    if device_type == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device_type == "mps" and world_size > 1:
        raise UserError(f"torchrun with {world_size} processes on mps: a Mac has one MPS device, which processes "
                        "cannot share; run the stage as one process: python -m scripts.<stage>")
    return torch.device(device_type)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up; a plain process gets rank 0 of 1. On CUDA the group is
    "cpu:gloo,cuda:nccl", so a collective on a CPU tensor works too (NCCL alone rejects it)."""
    if not is_torchrun():
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
        configure_device(device)
        return DistInfo(False, 0, 0, 1, device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = local_device(device_type, local_rank, world_size)
    configure_device(device)
    if not dist.is_initialized():
        if device_type == "cuda":
            # device_id lets nccl bind eagerly to this process's GPU
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    if world_size > 1:
        check_shared_base_dir(rank)
    return DistInfo(world_size > 1, rank, local_rank, world_size, device)


def configure_device(device: torch.device) -> None:
    """On CUDA: bind this process to its GPU and let float32 matmuls use TF32 tensor cores (a float32 run on
    Ampere+ is otherwise several times slower for no accuracy that training needs)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")


def check_shared_base_dir(rank: int) -> None:
    """Every rank must see one base dir: checkpoints are saved by all ranks into one step directory that rank 0
    renames, and data, tokenizer and eval bundle are fetched once. Rank 0 writes a fresh nonce there; a rank
    that cannot read it back (another node's local disk, or a different NANOCHAT_BASE_DIR) stops every rank."""
    base = get_base_dir()
    nonce = [os.urandom(8).hex() if rank == 0 else None]
    dist.broadcast_object_list(nonce)
    probe = base / f".shared_check_{nonce[0]}"
    if rank == 0:
        atomic_write(probe, nonce[0])
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (file_holds(probe, nonce[0]), socket.gethostname(), str(base)))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host} ({path})" for r, (ok, host, path) in enumerate(seen) if not ok]
    if blind:
        raise UserError(f"NANOCHAT_BASE_DIR is not shared: {', '.join(blind)} cannot see the file rank 0 wrote in "
                        f"{seen[0][2]} on {seen[0][1]}; point NANOCHAT_BASE_DIR at one shared filesystem (NFS, "
                        "Lustre, ...) mounted on every node")


def file_holds(path: Path, text: str, wait_s: float = 5.0) -> bool:
    """Whether `path` reads as `text`, allowing a network filesystem a few seconds to show another node's write."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == text:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def decide_on_rank0(decide: Callable[[], T]) -> T:
    """`decide()` on rank 0 only, its answer on every rank: a choice made from local files (what is on disk, the
    system dictionary) can differ between nodes, and ranks that disagree build different batches and deadlock.
    A UserError on rank 0 is raised on every rank."""
    if get_world_size() == 1:
        return decide()
    box = [None]
    if get_rank() == 0:
        try:
            box = [(True, decide())]
        except UserError as exc:
            box = [(False, str(exc))]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise UserError(value)
    return value


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's weights and buffers to every rank after init: the same seed does not give the same weights
    everywhere (CUDA RNG output depends on the GPU), and ranks would then never agree again."""
    if get_world_size() > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # tearing down while another rank still runs collectives aborts that rank ("terminate called without an
        # active exception" from gloo): every rank arrives first
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """Ranks in the process group; 1 for a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


# ---------------------------------------------------------------------------------------------------------
# Logging

def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so N ranks don't print N copies."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Provenance

REPO_DIR = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """This checkout's short commit, with " (dirty)" when tracked files changed; None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10, cwd=REPO_DIR).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=REPO_DIR).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + (" (dirty)" if dirty else "")) or None


# ---------------------------------------------------------------------------------------------------------
# Seeding

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Peak FLOPs for MFU: dense bf16 tensor-core figures (float32 accumulate, no sparsity) from the vendors' spec
# sheets, matched against `torch.cuda.get_device_name` as whole words, most specific first: an "H100 PCIe" is
# not an H100 SXM, a "3090 Ti" not a 3090. GeForce cards accumulate in float32 at half their fp16 rate, so
# their bf16 figure is half the headline fp16 number.

PEAK_BF16_FLOPS = [
    (r"H100 PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H200 NVL", 835e12),
    (r"H800 PCIe", 756e12),
    (r"GH200", 989e12),
    (r"H100", 989e12),          # "NVIDIA H100 80GB HBM3": SXM
    (r"H200", 989e12),
    (r"H800", 989e12),
    (r"B200", 2250e12),
    (r"A100", 312e12),          # SXM4 and PCIe alike
    (r"A800", 312e12),
    (r"RTX 6000 Ada", 364e12),
    (r"RTX A6000", 155e12),
    (r"L40S", 362e12),
    (r"L40", 181e12),
    (r"L4", 121e12),
    (r"A10G", 70e12),
    (r"A10", 125e12),
    (r"RTX 5090", 209e12),
    (r"RTX 4090", 165e12),
    (r"RTX 4080 SUPER", 104e12),
    (r"RTX 4080", 97e12),
    (r"RTX 3090 Ti", 80e12),
    (r"RTX 3090", 71e12),
    (r"RTX 3080 Ti", 68e12),
    (r"RTX 3080", 59.5e12),
]


def peak_flops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of a GPU (as torch names it) for a `dtype` run, or None when unknown (then we print FLOP/s).
    Only bf16 has a table: an fp32/TF32 run against a bf16 peak would understate MFU by 2-8x."""
    if dtype != torch.bfloat16:
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<!\w){pattern}(?!\w)", device_name, flags=re.IGNORECASE):
            return flops
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), dtype)


# ---------------------------------------------------------------------------------------------------------
# wandb, optional

class DummyWandb:
    """Stands in for a wandb run when `--run dummy` (or on non-master ranks): every call is a no-op."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def init_wandb(run: str, project: str, config: dict, is_master: bool = True):
    if run == "dummy" or not is_master:
        return DummyWandb()
    import wandb  # imported lazily: it is slow to import and most runs don't use it

    return wandb.init(project=project, name=run, config=config)
