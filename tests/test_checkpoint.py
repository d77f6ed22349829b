"""Checkpoints: round trip of model, optimizer and RNG state; what counts as complete; pruning; checksums;
pickle-free files; and load_model picking the newest tag and step."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from nanochat.checkpoint import (DamagedCheckpoint, capture_rng_state, checkpoint_dir, complete_steps, create_model,
                                 load_checkpoint, load_model, restore_rng_state, save_checkpoint, step_dir)
from nanochat.common import UserError
from nanochat.optim import setup_optimizers
from tests.model_cases import tiny_config
from tests.training_fixtures import make_mini_corpus


def trained(config, steps: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(config, "cpu")
    optimizers = setup_optimizers(model)
    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len + 1))
    for _ in range(steps):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model, optimizers


def save(tag_dir, step, model, optimizers, keep_last=2, **meta):
    return save_checkpoint(tag_dir, step, model, optimizers, meta, {"rng": capture_rng_state(), "loader": {"pos": step}},
                           keep_last=keep_last)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    config = tiny_config(300)
    model, optimizers = trained(config)
    path = save(tmp_path, 7, model, optimizers, val_bpb=1.5)
    expected_random = torch.rand(5)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["val_bpb"] == 1.5 and meta["world_size"] == 1
    assert set(meta["files"]) == {"model.safetensors", "optim_rank0.pt", "rng_rank0.pt"}
    assert meta["model_config"]["model_dim"] == 32 and meta["torch_version"] == torch.__version__

    ckpt = load_checkpoint(tmp_path, 7, "cpu")
    restored = create_model(config, "cpu")
    restored.load_state_dict(ckpt.model_state)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    fresh = setup_optimizers(restored)
    for opt, state in zip(fresh, ckpt.optimizer_states):
        opt.load_state_dict(state)
    assert torch.equal(next(iter(fresh[1].state.values()))["momentum_buffer"],
                       next(iter(optimizers[1].state.values()))["momentum_buffer"])
    assert torch.equal(next(iter(fresh[0].state.values()))["exp_avg"],
                       next(iter(optimizers[0].state.values()))["exp_avg"])
    restore_rng_state(ckpt.rank_state["rng"])
    assert torch.equal(torch.rand(5), expected_random)
    assert ckpt.rank_state["loader"] == {"pos": 7}


def test_rank_files_load_without_pickle(tmp_path):
    model, optimizers = trained(tiny_config(300), steps=1)
    path = save(tmp_path, 1, model, optimizers)
    for name in ("optim_rank0.pt", "rng_rank0.pt"):
        torch.load(path / name, weights_only=True)


def test_only_complete_directories_count_and_keep_last_prunes(tmp_path):
    model, optimizers = trained(tiny_config(300), steps=1)
    for step in (1, 2, 3):
        save(tmp_path, step, model, optimizers, keep_last=2)
    assert complete_steps(tmp_path) == [2, 3]
    (tmp_path / "step_000009.tmp").mkdir()          # a save killed before its rename
    (tmp_path / "step_000008").mkdir()              # a directory without meta.json
    (tmp_path / "step_000008" / "model.safetensors").write_bytes(b"")
    assert complete_steps(tmp_path) == [2, 3]
    save(tmp_path, 4, model, optimizers, keep_last=-1)
    assert not (tmp_path / "step_000009.tmp").exists()
    assert complete_steps(tmp_path) == [2, 3, 4]
    with pytest.raises(UserError, match="no complete checkpoint for step 8"):
        load_checkpoint(tmp_path, 8, "cpu")


def test_damaged_file_fails_its_checksum(tmp_path):
    model, optimizers = trained(tiny_config(300), steps=1)
    path = save(tmp_path, 1, model, optimizers)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its checksum"):
        load_checkpoint(tmp_path, 1, "cpu")


@pytest.mark.parametrize("unlisted", ["model.safetensors", "optim_rank0.pt", "every file"])
def test_a_file_without_a_checksum_is_damaged(tmp_path, unlisted):
    """A step saved before checksums were recorded (or whose meta.json lost one) cannot be verified: refused."""
    model, optimizers = trained(tiny_config(300), steps=1)
    path = save(tmp_path, 1, model, optimizers)
    meta = json.loads((path / "meta.json").read_text())
    if unlisted == "every file":
        del meta["files"]
    else:
        del meta["files"][unlisted]
    (path / "meta.json").write_text(json.dumps(meta))
    name = "model.safetensors" if unlisted == "every file" else unlisted
    with pytest.raises(DamagedCheckpoint, match=f"lists no checksum for {name} .*not loaded"):
        load_checkpoint(tmp_path, 1, "cpu")


def test_each_file_is_read_once_and_loaded_from_the_bytes_verified(tmp_path):
    """Each file becomes a FIFO that hands its bytes to one reader only: a separate checksum pass before the load
    would open it a second time and wait for bytes that never come."""
    model, optimizers = trained(tiny_config(300), steps=1)
    path = save(tmp_path, 1, model, optimizers)
    names = ["model.safetensors", "optim_rank0.pt", "rng_rank0.pt"]
    contents = {name: (path / name).read_bytes() for name in names}
    for name in names:
        (path / name).unlink()
        os.mkfifo(path / name)
        threading.Thread(target=(path / name).write_bytes, args=(contents[name],), daemon=True).start()
    loaded = {}
    loader = threading.Thread(target=lambda: loaded.update(ckpt=load_checkpoint(tmp_path, 1, "cpu")), daemon=True)
    loader.start()
    loader.join(timeout=60)
    for name in names:  # let a reader stuck on a second open see end-of-file, so no thread is left waiting
        try:
            os.close(os.open(path / name, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody is waiting to read it
    loader.join(timeout=10)
    assert "ckpt" in loaded, "load_checkpoint did not load from one read of each file"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["ckpt"].model_state[name], tensor), name
    assert loaded["ckpt"].rank_state["loader"] == {"pos": 1}


def test_resuming_with_another_world_size_is_refused(tmp_path):
    model, optimizers = trained(tiny_config(300), steps=1)
    path = save(tmp_path, 1, model, optimizers)
    meta = json.loads((path / "meta.json").read_text())
    meta["world_size"] = 2
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="saved by 2 ranks but this run has 1"):
        load_checkpoint(tmp_path, 1, "cpu")
    assert load_checkpoint(tmp_path, 1, "cpu", load_optimizer=False).meta["world_size"] == 2


def test_load_model_picks_newest_tag_and_step(base_dir, shared_data, capsys):
    tokenizer = make_mini_corpus(base_dir, shared_data, train_docs=24, val_docs=4)
    config = tiny_config(tokenizer.vocab_size)
    older, opts = trained(config, steps=1, seed=1)
    save(checkpoint_dir("base", "older"), 5, older, opts)
    old_step = step_dir(checkpoint_dir("base", "older"), 5)
    os.utime(old_step, (time.time() - 100, time.time() - 100))
    tied_config = tiny_config(tokenizer.vocab_size)
    tied_config.tie_embeddings = True
    newer, opts = trained(tied_config, steps=1, seed=2)
    for step in (1, 2):
        save(checkpoint_dir("base", "newer"), step, newer, opts)

    model, loaded_tokenizer, meta = load_model("base", "cpu")
    assert "loading base checkpoint newer step 2" in capsys.readouterr().out
    assert meta["step"] == 2 and not model.training
    assert model.lm_head.weight is model.wte.weight
    ids = torch.tensor([loaded_tokenizer.encode("Once upon a time", prepend=loaded_tokenizer.bos_token_id)])
    newer.eval()
    assert torch.equal(model(ids), newer(ids))
    model, _, meta = load_model("base", "cpu", tag="older", dtype=torch.bfloat16)
    assert meta["step"] == 5 and model.wte.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="no checkpoints in"):
        load_model("mid", "cpu")
