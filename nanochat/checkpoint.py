"""Checkpoints: atomic step directories, finding the newest complete one, resume state, and `load_model`.

    <base_dir>/<source>_checkpoints/<tag>/step_NNNNNN/
        model.safetensors   weights only (rank 0)
        meta.json           model config, step, flags, metrics, sha256 of every file, world size, git commit
        optim_rank{r}.pt    each rank's optimizer state (its shard); torch.load(weights_only=True)
        rng_rank{r}.pt      each rank's RNG and data-loader state; torch.load(weights_only=True)

Every rank writes into `step_NNNNNN.tmp/` and fsyncs; the ranks then share whether their writes succeeded (one
rank that cannot write stops every rank with the same line, none waits at a barrier for it), and rank 0 writes
meta.json last and renames the directory. A directory is complete when it has no `.tmp` suffix and holds
meta.json; nothing else is ever loaded, and leftover `.tmp` directories are deleted by the next save.

Loading reads each file once, checks it against its sha256 in meta.json and loads from those same bytes. A
file without a checksum there (a step saved before checksums were recorded) counts as damaged, like one that
does not match: there is no switch to load an unverified step. Multi-node runs need the
checkpoint directory on a filesystem every node shares.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from nanochat.common import (UserError, barrier, fsync_dir, get_base_dir, get_rank, get_world_size, git_commit,
                             print0)
from nanochat.gpt import GPT, GPTConfig

CHECKPOINT_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                   "rl": "chatrl_checkpoints"}
PAUSE_ENV = "NANOCHAT_TEST_PAUSE_SAVE"  # seconds to sleep mid-save, so a test can kill -9 the writer
MODEL_FILE, META_FILE = "model.safetensors", "meta.json"


def checkpoint_dir(source: str, tag: str) -> Path:
    return source_dir(source) / tag


def source_dir(source: str) -> Path:
    if source not in CHECKPOINT_DIRS:
        raise UserError(f"checkpoint source must be one of {', '.join(CHECKPOINT_DIRS)}, got {source!r}")
    return get_base_dir() / CHECKPOINT_DIRS[source]


def step_dir(tag_dir: Path, step: int) -> Path:
    return Path(tag_dir) / f"step_{step:06d}"


def complete_steps(tag_dir: Path) -> list[int]:
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return []
    steps = []
    for path in tag_dir.glob("step_*"):
        digits = path.name[len("step_"):]
        if digits.isdigit() and (path / META_FILE).is_file():
            steps.append(int(digits))
    return sorted(steps)


def remove_partial(tag_dir: Path) -> None:
    for path in Path(tag_dir).glob("step_*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# RNG state, stored as plain tuples and tensors so torch.load(weights_only=True) accepts it

def capture_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Save

def model_state_for_save(model: GPT) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as wte.weight; safetensors refuses shared storage
    return state


def save_checkpoint(tag_dir: Path, step: int, model: GPT, optimizers: list, meta: dict, rank_state: dict,
                    keep_last: int = 2) -> Path:
    """Collective: every rank calls it. Returns the complete step directory."""
    tag_dir = Path(tag_dir)
    rank = get_rank()
    final = step_dir(tag_dir, step)
    tmp = final.with_name(final.name + ".tmp")

    def make_tmp() -> None:
        tag_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(tag_dir)
        tmp.mkdir()

    # each step ends in an exchange of errors, not a bare barrier: a rank that failed tells the others, so every
    # rank stops with the same line instead of the healthy ones waiting forever for it
    stop_if_any_rank_failed(failed_write(make_tmp) if rank == 0 else None, tag_dir, tmp, step)
    own_files = [tmp / f"optim_rank{rank}.pt", tmp / f"rng_rank{rank}.pt"]

    def write_own_files() -> None:
        torch.save([opt.state_dict() for opt in optimizers], own_files[0])
        torch.save(rank_state, own_files[1])
        if rank == 0:
            save_file(model_state_for_save(model), tmp / MODEL_FILE)
            own_files.append(tmp / MODEL_FILE)
        for path in own_files:
            fsync_file(path)

    stop_if_any_rank_failed(failed_write(write_own_files), tag_dir, tmp, step)
    error = None
    if rank == 0:
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:
            print0(f"pausing {pause:g}s mid-save of {tmp} ({PAUSE_ENV})")
            time.sleep(pause)

        def write_meta_and_rename() -> None:
            full_meta = {**meta, "step": step, "model_config": asdict(model.config), "world_size": get_world_size(),
                         "git_commit": git_commit() or "unknown", "torch_version": torch.__version__,
                         "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}
            meta_path = tmp / META_FILE
            meta_path.write_text(json.dumps(full_meta, indent=2, default=str))
            fsync_file(meta_path)
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (a resumed run repeating its last step)
                discard(final)
            # rename last: a crash before this line leaves only a .tmp directory, which is never loaded
            os.replace(tmp, final)
            fsync_dir(tag_dir)

        error = failed_write(write_meta_and_rename)
    stop_if_any_rank_failed(error, tag_dir, tmp, step)
    if rank == 0:
        prune(tag_dir, keep_last)
    barrier()
    return final


def failed_write(write) -> str | None:
    """Run `write`; a full disk (or a file-size limit) becomes a short reason naming this rank, not a traceback from
    deep inside torch.save (which reports it as an opaque RuntimeError)."""
    try:
        write()
    except (OSError, RuntimeError, SafetensorError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"rank {get_rank()}: {reason}" if get_world_size() > 1 else reason
    return None


def first_error_on_any_rank(error: str | None) -> str | None:
    """Collective: every rank learns the first rank's error (or None when all succeeded)."""
    if get_world_size() == 1:
        return error
    errors: list[str | None] = [None] * get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def stop_if_any_rank_failed(error: str | None, tag_dir: Path, tmp: Path, step: int) -> None:
    """Collective. Raises the same one-line UserError on every rank when any rank's write failed."""
    error = first_error_on_any_rank(error)
    if error is None:
        return
    if get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    have = complete_steps(tag_dir)
    good = step_dir(tag_dir, have[-1]) if have else "none yet"
    raise UserError(f"could not write the checkpoint for step {step} ({error}); is the disk full? Free space "
                    f"and --resume; last complete checkpoint: {good}")


def discard(path: Path) -> None:
    """Rename to *.old.tmp first so a crash mid-delete leaves a directory that is ignored, never a half one
    (and never the name of the step_N.tmp being written)."""
    doomed = path.with_name(path.name + ".old.tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(tag_dir: Path, keep_last: int) -> None:
    if keep_last == -1:
        return
    for step in complete_steps(tag_dir)[:-keep_last]:
        discard(step_dir(tag_dir, step))


# ---------------------------------------------------------------------------------------------------------
# Load

@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_states: list[dict] | None
    rank_state: dict
    meta: dict


class DamagedCheckpoint(UserError):
    """A step with a file that is missing, not listed with a checksum in meta.json, or not matching it."""


def read_verified(directory: Path, name: str, meta: dict) -> bytes:
    """The file's bytes, hashed from the same read that loads them: what is checked is exactly what is used."""
    expected = meta.get("files", {}).get(name)
    if expected is None:
        raise DamagedCheckpoint(f"{directory / META_FILE} lists no checksum for {name} (the step predates "
                                "checksums or is damaged), so it is not loaded; use another step "
                                "(--resume_from_step) or train it again")
    try:
        data = (directory / name).read_bytes()
    except FileNotFoundError:
        raise DamagedCheckpoint(f"checkpoint {directory} has no {name}; it was saved by a different world size or "
                                "is damaged; use another step (--resume_from_step)") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise DamagedCheckpoint(f"{directory / name} does not match its checksum in {META_FILE}; the file is "
                                "damaged, use another step (--resume_from_step)")
    return data


def read_meta(directory: Path) -> dict:
    try:
        return json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{directory / META_FILE} is unreadable ({exc}); the checkpoint is damaged, "
                                "use another step (--resume_from_step)") from exc


def load_tensors_only(directory: Path, name: str, meta: dict, device) -> object:
    """torch.load(weights_only=True) of a verified file, with a refused pickle (code an attacker slipped in) as
    one clear line."""
    data = read_verified(directory, name, meta)
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{directory / name} holds objects that weights_only loading refuses, so it is not loaded "
                        "(it may run code); use another step (--resume_from_step)") from exc


def load_checkpoint(tag_dir: Path, step: int, device, rank: int = 0, load_optimizer: bool = True) -> Checkpoint:
    """Each file is read once, checked against its sha256 in meta.json and loaded from those bytes; a file that
    is missing, unlisted or different raises DamagedCheckpoint. Rank `rank` reads only its own optimizer/RNG files."""
    directory = step_dir(tag_dir, step)
    if step not in complete_steps(tag_dir):
        have = complete_steps(tag_dir)
        raise UserError(f"no complete checkpoint for step {step} in {tag_dir}; complete steps: {have or 'none'}")
    meta = read_meta(directory)
    model_state = load_safetensors(read_verified(directory, MODEL_FILE, meta))
    model_state = {name: tensor.to(device) for name, tensor in model_state.items()}
    optimizer_states, rank_state = None, {}
    if load_optimizer:
        world = get_world_size()
        if meta.get("world_size", 1) != world:
            raise UserError(f"checkpoint {directory} was saved by {meta['world_size']} ranks but this run has "
                            f"{world}; resume with the same number of processes")
        optimizer_states = load_tensors_only(directory, f"optim_rank{rank}.pt", meta, device)
        rank_state = load_tensors_only(directory, f"rng_rank{rank}.pt", meta, "cpu")
    return Checkpoint(model_state, optimizer_states, rank_state, meta)


def load_model_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"checkpoint weights do not fit the model (missing {sorted(missing)}, "
                        f"unexpected {sorted(unexpected)})")


def meta_model(config: GPTConfig) -> GPT:
    """The model on the meta device: shapes and counts without allocating a byte."""
    with torch.device("meta"):
        return GPT(config)


def empty_model(config: GPTConfig, device) -> GPT:
    """Built on the meta device, then given uninitialised storage: no time spent on a throw-away init."""
    model = meta_model(config)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # to_empty re-creates parameters, breaking the tie
    return model


def create_model(config: GPTConfig, device, dtype: torch.dtype | None = None) -> GPT:
    """A freshly initialised GPT on `device` (weights from the current torch seed)."""
    model = empty_model(config, device)
    model.init_weights()
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def build_model(meta: dict, device, dtype: torch.dtype | None = None,
                model_state: dict[str, torch.Tensor] | None = None) -> GPT:
    """A GPT from meta["model_config"]; with `model_state` its weights, else fresh init_weights()."""
    config = GPTConfig(**meta["model_config"])
    if model_state is None:
        return create_model(config, device, dtype)
    model = empty_model(config, device)
    load_model_state(model, model_state)
    model.init_rotary()
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def newest_tag(root: Path) -> str:
    tags = [d for d in root.iterdir() if d.is_dir() and complete_steps(d)] if root.is_dir() else []
    if not tags:
        raise UserError(f"no checkpoints in {root}; train one first (python -m scripts.base_train)")
    return max(tags, key=lambda d: step_dir(d, complete_steps(d)[-1]).stat().st_mtime).name


def load_model(source: str, device, tag: str | None = None, step: int | None = None,
               dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, meta) for inference; the newest tag and step unless given."""
    from nanochat.tokenizer import get_tokenizer  # here, so training code does not need the tokenizer module

    root = source_dir(source)
    tag = tag or newest_tag(root)
    tag_dir = root / tag
    steps = complete_steps(tag_dir)
    if not steps:
        raise UserError(f"no complete checkpoints in {tag_dir}; check --model_tag")
    step = steps[-1] if step is None else step
    print0(f"loading {source} checkpoint {tag} step {step} from {step_dir(tag_dir, step)}")
    ckpt = load_checkpoint(tag_dir, step, device, load_optimizer=False)
    model = build_model(ckpt.meta, torch.device(device), dtype, ckpt.model_state)
    model.eval()
    return model, get_tokenizer(), ckpt.meta
