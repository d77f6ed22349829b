"""Runtime basics every stage shares: base dir, device and dtype choice, distributed init, logging,
seeding, peak FLOPs for MFU, and an optional wandb run.

Nothing here reads flags; scripts pass what the user asked for and these functions decide.
"""
from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


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


def resolve_dtype(device_type: str, requested: str = "auto") -> torch.dtype:
    """bfloat16 on cuda (and on mps when this torch supports it), float32 on cpu; an explicit dtype wins."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device_type == "cuda":
        return torch.bfloat16
    if device_type == "mps":
        return torch.bfloat16 if mps_supports_bfloat16() else torch.float32
    return torch.float32


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


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (nccl on cuda, gloo otherwise); a plain process gets rank 0 of 1."""
    if not is_torchrun():
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
        return DistInfo(False, 0, 0, 1, device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(device_type)
        backend = "gloo"
    if not dist.is_initialized():
        # device_id lets nccl bind eagerly; gloo ignores it.
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(world_size > 1, rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
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
# Peak FLOPs for MFU (dense bf16 tensor-core figures from the vendors' spec sheets, no sparsity)

PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A6000", 155e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 5090", 209e12),
    ("RTX 4090", 165e12),
    ("RTX 4080", 97e12),
    ("RTX 3090", 71e12),
    ("RTX 3080", 59e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a GPU name as torch reports it, or None when unknown (then we print FLOP/s)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


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
