"""scripts.model_info and nanochat.sizing: parameter split, run length, and the memory estimate checked against
the measured peak of real training steps on CPU (and on GPU when one is present)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nanochat.common import UserError
from nanochat.sizing import estimate_memory, largest_batch, measure_peak_memory
from scripts.model_info import main
from tests.model_cases import SWITCH_CASES, tiny_config
from tests.training_fixtures import REPO, subprocess_env

GIB = 2**30


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", ["default", "frontier"])
def test_estimate_within_25_percent_of_measured_cpu_peak(checkpointing, case):
    switches = {**SWITCH_CASES[case], "head_dim": 32, "short_window": 16}
    config = tiny_config(500, **{**switches, "model_dim": 64, "max_seq_len": 64})
    measured = measure_peak_memory(config, 8, torch.device("cpu"), activation_checkpointing=checkpointing)
    estimate = estimate_memory(config, 8, autocast=False, activation_checkpointing=checkpointing).total
    assert 0.75 <= estimate / measured <= 1.25, (estimate, measured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_estimate_within_25_percent_of_measured_gpu_peak():
    config = tiny_config(8192, depth=4, model_dim=256, head_dim=64, max_seq_len=512)
    measured = measure_peak_memory(config, 8, torch.device("cuda"))
    estimate = estimate_memory(config, 8, autocast=True).total
    assert 0.75 <= estimate / measured <= 1.25, (estimate, measured)


def test_checkpointing_saves_memory_and_largest_batch_is_tight():
    config = tiny_config(65536, depth=12, model_dim=768, head_dim=128, max_seq_len=2048)
    plain = estimate_memory(config, 16, autocast=True)
    saved = estimate_memory(config, 16, autocast=True, activation_checkpointing=True)
    assert saved.activations < 0.5 * plain.activations and saved.weights == plain.weights
    fits = largest_batch(config, 24 * GIB, autocast=True)
    assert estimate_memory(config, fits, autocast=True).device_total <= 24 * GIB
    assert estimate_memory(config, fits + 1, autocast=True).device_total > 24 * GIB
    sharded = estimate_memory(config, 16, autocast=True, world_size=8)
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8, rel=1e-6)


def test_ittybitty_report(capsys):
    main(["--recipe=2025", "--depth=4", "--model_dim=512", "--head_dim=64", "--vocab_size=24576", "--vram_gb=24",
          "--target_param_data_ratio=20", "--total_batch_size=524288"])
    out = capsys.readouterr().out
    assert "8 heads" in out
    assert "parameters: 37,748,736 = embedding 12,582,912 + blocks 12,582,912 + lm_head 12,582,912" in out
    assert "1,440 steps of 524,288 tokens = 754,974,720 tokens" in out
    assert "with activation checkpointing:" in out and "largest --device_batch_size that fits 24 GiB:" in out


@pytest.mark.parametrize("args, message", [
    (["--vram_gb=0"], "--vram_gb must be > 0 or -1"),
    (["--depth=4", "--model_dim=500", "--num_heads=8", "--head_dim=64"], r"\(8 × 64 = 512\)"),
    (["--device_batch_size=0"], "--device_batch_size must be >= 1"),
    (["--total_batch_size=0"], r"--total_batch_size must be >= 1 or -1 \(auto\)"),
    (["--mfu=0"], r"--mfu must be in \(0, 1\]"),
    (["--total_batch_size=-1", "--target_param_data_ratio=-1"], "need --target_param_data_ratio"),
])
def test_bad_flags_name_the_fix(args, message):
    with pytest.raises(UserError, match=message):
        main(["--vocab_size=1000", *args])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_check_free_vram_without_gpu_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.model_info", "--depth=2", "--vocab_size=1000",
                             "--check_free_vram"], capture_output=True, text=True, env=subprocess_env(tmp_path),
                            cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: --check_free_vram needs a CUDA GPU; use --vram_gb to size for one\n"


def test_frontier_switches_in_the_report(capsys):
    """Value embeddings and scalars are counted; sliding windows cut the attention FLOPs."""
    ittybitty = ["--depth=4", "--model_dim=512", "--head_dim=64", "--vocab_size=24576", "--max_seq_len=2048"]
    main([*ittybitty, "--value_embeds", "--residual_scalars", "--smear", "--backout", "--window_pattern=SSSL"])
    out = capsys.readouterr().out
    # value embeddings on layers 1 and 3: 2 × 24576 × 512; scalars: 4 + 4 resid/x0, 24 smear gate, 2 lambdas;
    # blocks gain the value gates (2 × 12 × 8)
    assert "value_embeds 25,165,824 + blocks 12,583,104 + scalars 34 + lm_head 12,582,912" in out
    # attention: 12 · 8 · 64 · (3 × 512 + 2048) instead of 12 · 8 · 64 · 4 × 2048
    flops = 6 * (12_583_104 + 12_582_912 + 24) + 12 * 8 * 64 * (3 * 512 + 2048)
    assert f"FLOPs per token (fwd+bwd): {flops:.4e}" in out


def test_run_plan_matches_base_train_and_times_it_on_the_named_gpu(capsys):
    """The speedrun's flags: model_info resolves the same steps and batch as base_train, and the time is FLOPs over
    GPUs × peak × MFU."""
    from nanochat.checkpoint import meta_model
    from nanochat.flags import parse_flags
    from nanochat.model_config import model_config
    from scripts.base_train import BaseTrainFlags, batch_plan, ratio_param_count, resolve_num_iterations

    run = ["--recipe=frontier", "--depth=24", "--target_param_data_ratio=8"]
    main([*run, "--vocab_size=65536", "--world_size=8", "--gpu=H100", "--mfu=0.5"])
    out = capsys.readouterr().out
    flags = parse_flags(BaseTrainFlags, run)
    model = meta_model(model_config(flags, 65536))
    total = batch_plan(flags, model, 65536)[0]
    flops = model.estimate_flops(2048)
    steps, _ = resolve_num_iterations(flags, ratio_param_count(flags, model), flops, total)
    assert f"run (--target_param_data_ratio 8, recipe frontier): {steps:,} steps of {total:,} tokens" in out
    hours = flops * steps * total / (8 * 989e12 * 0.5) / 3600
    assert f"expected training time: {hours:.2f} h on 8 × H100 (989 TFLOP/s bf16 peak) at MFU 0.50" in out
    main(["--depth=2", "--vocab_size=1000", "--gpu=Mystery 9000"])
    assert "expected time: unknown ('Mystery 9000' is not in the bf16 peak table" in capsys.readouterr().out
