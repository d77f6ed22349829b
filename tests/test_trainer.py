"""The shared training loop: overfitting, exact resume, 1 vs 2 processes, non-finite stop, batch arithmetic.

Run as `torchrun ... -m tests.test_trainer --rows R --out D ...` this file is also the distributed worker.
"""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, replace

import pytest
import torch

from nanochat.checkpoint import complete_steps, create_model, load_checkpoint
from nanochat.common import DistInfo, UserError, init_distributed
from nanochat.flags import TrainFlags, flag, parse_flags
from nanochat.optim import setup_optimizers
from nanochat.schedules import Schedule, constant, warmup_warmdown
from nanochat.trainer import (CPU_COMPILE_MIN_STEPS, Eval, Run, TrainingDiverged, auto_compile, clip_gradients,
                              grad_accum_steps, set_hyperparameters, train)
from tests.model_cases import SWITCH_CASES, tiny_config
from tests.training_fixtures import (VOCAB_SIZE, make_mini_corpus, read_losses, read_real_docs, subprocess_env,
                                     token_rows, torchrun_cmd)

SEQ_LEN = 32
CPU = DistInfo(False, 0, 0, 1, torch.device("cpu"))


class RowBatches:
    """Rows in a fixed order. Micro-batch m of a step on rank r holds the rows a single process would use for
    micro-batch m·world + r, so 1 and N processes see the same data per optimizer step."""

    def __init__(self, rows: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        index = torch.arange(self.pos + self.rank * self.batch_size,
                             self.pos + (self.rank + 1) * self.batch_size) % len(self.rows)
        self.pos += self.batch_size * self.world_size
        batch = self.rows[index]
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


@dataclass
class WorkerFlags(TrainFlags):
    rows: str = flag("", "token rows saved with torch.save")
    out: str = flag("", "checkpoint directory")


def run_training(flags: TrainFlags, rows: torch.Tensor, out, dist: DistInfo = CPU, evals=(), loss_fn=None,
                 switches: dict | None = None):
    torch.manual_seed(flags.seed)
    model = create_model(tiny_config(VOCAB_SIZE, max_seq_len=SEQ_LEN, **(switches or {})), dist.device)
    optimizers = setup_optimizers(model)
    batches = RowBatches(rows, flags.device_batch_size, dist.rank, dist.world_size)
    accum = grad_accum_steps(flags.total_batch_size, flags.device_batch_size, SEQ_LEN, dist.world_size)
    result = train(model, optimizers, batches, schedule=Schedule(lr=warmup_warmdown(flags.num_iterations)), flags=flags,
                   checkpoint_dir=out, dist=dist, num_iterations=flags.num_iterations, grad_accum_steps=accum,
                   evals=evals, flops_per_token=model.estimate_flops(SEQ_LEN), loss_fn=loss_fn)
    return model, result


def flags_for(**overrides) -> TrainFlags:
    base = dict(device_type="cpu", device_batch_size=2, total_batch_size=4 * SEQ_LEN, num_iterations=15,
                eval_every=-1, save_every=5, keep_last=-1)
    base.update(overrides)
    return TrainFlags(**base)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    tokenizer = make_mini_corpus(tmp_path_factory.mktemp("corpus"), shared_data, train_docs=48, val_docs=4)
    return token_rows(tokenizer, read_real_docs(shared_data, 48), SEQ_LEN)


def test_tiny_model_overfits_one_batch(rows, tmp_path):
    _, result = run_training(flags_for(num_iterations=30, save_every=-1), rows[:2], tmp_path / "ckpt")
    assert result.losses[1] > 5.0
    assert result.losses[30] < 0.3 * result.losses[1]


class Preempted(Exception):
    pass


def preempt_at(step: int) -> Eval:
    def maybe_stop(model, current):
        if current == step:
            raise Preempted
        return {}
    return Eval("preempt", 1, maybe_stop)


@pytest.mark.parametrize("case", SWITCH_CASES)
def test_exact_resume_single_process(rows, tmp_path, case):
    switches = SWITCH_CASES[case]
    straight_model, straight = run_training(flags_for(), rows, tmp_path / "straight", switches=switches)
    # stop after step 11 (checkpoint at 10), like a preempted job, then resume
    with pytest.raises(Preempted):
        run_training(flags_for(), rows, tmp_path / "resumed", evals=[preempt_at(11)], switches=switches)
    assert complete_steps(tmp_path / "resumed") == [5, 10]
    resumed_model, resumed = run_training(flags_for(resume=True), rows, tmp_path / "resumed", switches=switches)
    assert sorted(resumed.losses) == [11, 12, 13, 14, 15]
    assert [resumed.losses[s] for s in range(11, 16)] == [straight.losses[s] for s in range(11, 16)]
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    logged = read_losses(tmp_path / "resumed" / "train_log.jsonl")
    assert logged == straight.losses
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").open()]
    assert steps_logged == list(range(1, 16))


def test_compute_dtype_embeddings_train_save_and_resume_in_bfloat16(rows, tmp_path):
    switches = dict(compute_dtype_embeddings=True, value_embeds=True)
    model, result = run_training(flags_for(dtype="bfloat16", num_iterations=6, save_every=3), rows,
                                 tmp_path / "ckpt", switches=switches)
    tables = [model.wte.weight, *(table.weight for table in model.value_embeds.values())]
    assert {t.dtype for t in tables} == {torch.bfloat16} and model.lm_head.weight.dtype == torch.float32
    saved = load_checkpoint(tmp_path / "ckpt", 6, "cpu", load_optimizer=False).model_state
    assert saved["wte.weight"].dtype == torch.bfloat16 and saved["lm_head.weight"].dtype == torch.float32
    assert all(math.isfinite(loss) for loss in result.losses.values()) and result.losses[6] < result.losses[1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(rows, tmp_path):
    def poison(model, step):
        if step == 3:
            model.wte.weight.data.fill_(float("nan"))
        return {}

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4; .*step_000002"):
        run_training(flags_for(save_every=2), rows, tmp_path / "ckpt", evals=[Eval("poison", 1, poison)])
    assert complete_steps(tmp_path / "ckpt") == [2]


def test_evals_run_on_cadence_and_reach_checkpoint_meta(rows, tmp_path):
    seen = []

    def record(model, step):
        assert not model.training and not torch.is_grad_enabled()
        seen.append(step)
        return {"val_metric": float(step)}

    run_training(flags_for(num_iterations=7, save_every=-1), rows, tmp_path / "ckpt", evals=[Eval("v", 3, record)])
    assert seen == [0, 3, 6, 7]
    meta = json.loads((tmp_path / "ckpt" / "step_000007" / "meta.json").read_text())
    assert meta["val_metric"] == 7.0 and meta["step"] == 7


def test_a_failing_eval_saves_the_trained_steps_first(rows, tmp_path):
    def out_of_memory_at_step_4(model, step):
        if step == 4:
            raise torch.OutOfMemoryError("out of memory during eval")
        return {}

    with pytest.raises(torch.OutOfMemoryError):
        run_training(flags_for(num_iterations=8, save_every=-1), rows, tmp_path / "ckpt",
                     evals=[Eval("v", 2, out_of_memory_at_step_4)])
    assert complete_steps(tmp_path / "ckpt") == [4]


def test_out_of_memory_names_a_smaller_batch(rows, tmp_path):
    def exhausted(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(UserError, match=r"out of memory at step 1 with --device_batch_size 2; try "
                                        r"--device_batch_size 1 .* or --activation_checkpointing"):
        run_training(flags_for(), rows, tmp_path / "ckpt", loss_fn=exhausted)


def test_custom_loss_fn_drives_training(rows, tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append(batch[0].shape)
        return model(batch[0], batch[1])

    _, result = run_training(flags_for(num_iterations=2, save_every=-1), rows, tmp_path / "ckpt", loss_fn=loss_fn)
    assert seen == [(2, SEQ_LEN)] * 4 and sorted(result.losses) == [1, 2]


@pytest.mark.parametrize("total, device_batch, world, message", [
    (1056, 4, 1, "--total_batch_size 1056 is not a multiple of 128 tokens per micro-step .* try "
                 "--total_batch_size 1024 or --device_batch_size 3"),
    (200, 4, 2, "try --total_batch_size 256$"),
])
def test_batch_arithmetic_names_the_fix(total, device_batch, world, message):
    with pytest.raises(UserError, match=message):
        grad_accum_steps(total, device_batch, 32, world)


def test_grad_accum_steps_divides():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(524288, 16, 2048, 1) == 16


def bare_run(model, optimizers, flags: TrainFlags, schedule: Schedule, tmp_path) -> Run:
    return Run(model, optimizers, iter(()), schedule, flags, tmp_path, CPU, 1, 1, [], {}, None, None, "test")


def test_grad_clip_scales_the_global_norm_down_only():
    model = create_model(tiny_config(VOCAB_SIZE, max_seq_len=SEQ_LEN), "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    before = [p.grad.clone() for p in model.parameters()]
    clip_gradients(bare_run(model, [], flags_for(grad_clip=float(norm) * 2), Schedule(constant()), None))
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    clip_gradients(bare_run(model, [], flags_for(grad_clip=0.5), Schedule(constant()), None))
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert clipped == pytest.approx(0.5, rel=1e-4)
    for a, p in zip(before, model.parameters()):  # same direction
        torch.testing.assert_close(p.grad, a * (0.5 / norm), rtol=1e-4, atol=1e-7)


def test_grad_clip_changes_training_only_when_on(rows, tmp_path):
    _, plain = run_training(flags_for(num_iterations=3, save_every=-1), rows, tmp_path / "plain")
    _, off = run_training(flags_for(num_iterations=3, save_every=-1, grad_clip=0.0), rows, tmp_path / "off")
    _, clipped = run_training(flags_for(num_iterations=3, save_every=-1, grad_clip=0.01), rows, tmp_path / "clip")
    assert off.losses == plain.losses
    assert clipped.losses[1] == plain.losses[1] and clipped.losses[3] != plain.losses[3]


def test_schedules_reach_every_param_group():
    model = create_model(tiny_config(VOCAB_SIZE, max_seq_len=SEQ_LEN), "cpu")
    adamw, muon = setup_optimizers(model)
    muon.param_groups[0]["initial_weight_decay"] = 0.2
    schedule = Schedule(lr=lambda step: 0.5 if step == 7 else 1.0, muon_momentum=lambda step: 0.9 - step / 100,
                        weight_decay=constant(0.25))
    assert set_hyperparameters(bare_run(model, [adamw, muon], flags_for(), schedule, None), 7) == 0.5
    assert all(g["lr"] == g["initial_lr"] * 0.5 for opt in (adamw, muon) for g in opt.param_groups)
    assert all(g["momentum"] == pytest.approx(0.83) for g in muon.param_groups)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    assert "momentum" not in adamw.param_groups[0]


@pytest.mark.slow
def test_two_processes_match_one(rows, tmp_path):
    rows_path = tmp_path / "rows.pt"
    torch.save(rows, rows_path)
    flags = flags_for(num_iterations=5, save_every=-1)
    _, single = run_training(flags, rows, tmp_path / "single")
    result = subprocess.run(torchrun_cmd(2, "-m", "tests.test_trainer", f"--rows={rows_path}",
                                         f"--out={tmp_path / 'double'}", "--device_type=cpu",
                                         "--device_batch_size=2", f"--total_batch_size={4 * SEQ_LEN}",
                                         "--num_iterations=5", "--eval_every=-1"),
                            capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    double = read_losses(tmp_path / "double" / "train_log.jsonl")
    assert sorted(double) == [1, 2, 3, 4, 5]
    for step in double:
        assert double[step] == pytest.approx(single.losses[step], rel=1e-5)
    assert single.losses[5] < single.losses[1]


def worker_main() -> None:
    flags = parse_flags(WorkerFlags)
    dist = init_distributed("cpu")
    rows = torch.load(flags.rows, weights_only=True)
    run_training(replace(flags), rows, flags.out, dist)


if __name__ == "__main__":
    worker_main()


def test_compile_default_on_cuda_and_on_long_cpu_runs_with_a_compiler(monkeypatch, tmp_path):
    cpu, long_run = torch.device("cpu"), CPU_COMPILE_MIN_STEPS
    assert auto_compile(torch.device("cuda"), 10)
    assert not auto_compile(cpu, long_run - 1)  # too short to earn the compile back
    assert not auto_compile(torch.device("mps"), long_run)
    compiler = tmp_path / "c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    assert auto_compile(cpu, long_run)
    monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
    assert not auto_compile(cpu, long_run)  # inductor could not build its kernels
