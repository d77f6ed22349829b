"""Catch, on a CPU run, the device bugs that only crash on GPUs and Macs.

    torchrun --nproc_per_node=2 -m tests.device_spy OUT_DIR STAGES_JSON   # STAGES_JSON: [[module, argv], ...]

Each rank runs the stages one after another in one process group and writes OUT_DIR/rank{r}.json with what the
two checks below saw. tests/test_devices.py launches it across base/mid/sft/rl/evals.

The problem: on CPU every tensor is on "the model's device", so asserting `tensor.device == model_device` at a
collective can never fail, yet `dist.all_reduce(torch.zeros(3))` crashes every NCCL run (NCCL reduces only CUDA
tensors), and a float64 tensor on the device crashes every Mac (MPS has no float64).

The design: track where each tensor WOULD live if the model were on a GPU. `HostTracker`, a TorchFunctionMode,
marks a tensor "host" when it is made by a factory without `device=` (`torch.zeros(3)`, `torch.tensor(...)`),
by `.cpu()` or `.to("cpu")`, or computed only from host tensors; `.to(device)` or `device=...` clears the
mark, and an op with any non-host input gives a non-host result (as CUDA does with 0-dim CPU operands).
Everything else (model parameters, gradients, loaded weights) counts as on the model's device.
- Collectives: every `torch.distributed` collective our code calls is wrapped; each tensor it is given must be
  on the device the stage chose (captured from `init_distributed`) and must not be host-marked. The old
  `pass_at_k` built `solved` with `torch.zeros(k + 1, dtype=torch.float64)` and all-reduced it: host-marked,
  so caught.
- float64: every float64 tensor that an op produces off the host is recorded. `accumulator_dtype` is pinned to
  its MPS answer for the run, so each accumulator is checked as on a Mac, and a float64 made any other way
  (`.double()`, `dtype=torch.float64`, a numpy array moved to the device) is caught.
Blind spots, by construction: `torch.from_numpy` and explicit `device="cpu"` objects look like device tensors
(on CPU the model's device IS cpu); tensors made on other threads are not tracked.
"""
from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "scatter", "gather", "send", "recv",
               "isend", "irecv")
HOST = "_on_host"
MOVES = ("to", "cpu", "cuda", "mps")


def is_host(tensor: torch.Tensor) -> bool:
    # a parameter lives where its module was moved, whatever made its first storage
    return not isinstance(tensor, torch.nn.Parameter) and getattr(tensor, HOST, False)


def mark(tensor: torch.Tensor, host: bool) -> None:
    try:
        setattr(tensor, HOST, host)
    except (AttributeError, RuntimeError):  # some views and wrapper tensors refuse attributes
        pass


def requested_device(name: str, args, kwargs):
    """For .to()/.cpu()/.cuda() and factories: (given, host) for the device asked for."""
    if name == "cpu":
        return True, True
    if name in ("cuda", "mps"):
        return True, False
    candidates = [kwargs.get("device")] + (list(args[1:]) if name == "to" else [])
    for value in candidates:
        if isinstance(value, torch.Tensor):
            return True, is_host(value)
        if isinstance(value, str):
            return True, value == "cpu"
        if isinstance(value, torch.device):
            return True, False
    return False, False


class HostTracker(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.float64 = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name.endswith("_") or name in ("__setitem__",) or (name.startswith("__i") and name.endswith("__")):
            return result  # in place: the tensor stays where it was
        outputs = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        if not outputs:
            return result
        given, host = requested_device(name, args if name in MOVES else (), kwargs)
        if not given:
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            host = all(is_host(t) for t in inputs)  # a factory (no tensor inputs) without device= is host
        for tensor in outputs:
            mark(tensor, host)
            if not host and tensor.dtype == torch.float64:
                self.float64.append(f"{name}: {stack_line()}")
        return result


def stack_line() -> str:
    """The innermost frame in nanochat/, scripts/ or tasks/ that led here."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(part in frame.filename for part in ("/nanochat/", "/scripts/", "/tasks/")):
            return f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} {frame.line}"
    return "outside the project"


class CollectiveSpy:
    """Wraps each collective in `torch.distributed`; records every tensor not on the stage's device."""

    def __init__(self):
        self.device = None
        self.calls = {}
        self.violations = []
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def install(self) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, self.wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)

    def wrap(self, name, original):
        def spied(*args, **kwargs):
            self.check(name, args, kwargs)
            return original(*args, **kwargs)
        return spied

    def check(self, name, args, kwargs) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        for tensor in (t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)):
            if is_host(tensor) or tensor.device != self.device:
                where = "host-made" if is_host(tensor) else str(tensor.device)
                self.violations.append(f"{name} got a {where} tensor (model on {self.device}): {stack_line()}")


def main(out_dir: str, stages_json: str) -> None:
    import nanochat.common as common

    # a Mac's accumulator dtype, so every accumulator is checked against MPS's missing float64
    real_accumulator_dtype = common.accumulator_dtype
    common.accumulator_dtype = lambda device: real_accumulator_dtype("mps")
    spy, tracker = CollectiveSpy(), HostTracker()
    real_init, real_cleanup = common.init_distributed, common.cleanup_distributed

    def init_distributed(device_type):
        info = real_init(device_type)
        spy.device = info.device
        return info

    common.init_distributed = init_distributed
    common.cleanup_distributed = lambda: None  # one process group for every stage in this run
    spy.install()
    stages = json.loads(stages_json)
    with tracker:
        for module, argv in stages:
            importlib.import_module(module).main(argv)
    rank = dist.get_rank()
    real_cleanup()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"calls": spy.calls, "violations": spy.violations, "float64": tracker.float64}))


if __name__ == "__main__":
    main(*sys.argv[1:])
