"""Device and distributed facts: the failures that only show on 8×H100 (NCCL), several nodes, one 3090 or a Mac,
each caught here on CPU. The collective-device spy and the no-float64-on-device check (tests/device_spy.py)
run every stage under two gloo ranks."""
from __future__ import annotations

import json
import math
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from nanochat import common
from nanochat.checkpoint import create_model
from tests.chat_fixtures import one_thread  # noqa: F401 (fixture)
from tests.device_spy import CollectiveSpy, HostTracker
from tests.model_cases import tiny_config
from tests.test_tasks_chat import WORDS
from tests.training_fixtures import TINY_MODEL_ARGS, make_mini_corpus, subprocess_env, torchrun_cmd


def test_spy_flags_the_patterns_that_crash_on_gpus_and_macs():
    """The old pass_at_k (host float64 all-reduced), loss_eval with zero steps (host totals) and chat_eval's
    float64 counts on the device: each is reported, and the fixed forms are not."""
    spy, tracker = CollectiveSpy(), HostTracker()
    spy.device = torch.device("cpu")
    device = torch.device("cpu")
    with tracker:
        solved = torch.zeros(3, dtype=torch.float64)
        solved[0] += 1.0
        spy.check("all_reduce", (solved,), {})
        spy.check("all_reduce", (torch.zeros((), dtype=torch.int64),), {})
        spy.check("all_reduce", (torch.tensor([1.0, 2.0]).sum() * 2,), {})
        counts = torch.tensor([3, 4], dtype=torch.float64, device=device)
        assert len(spy.violations) == 3 and len(tracker.float64) == 1
        spy.check("all_reduce", (counts,), {})
        moved = torch.zeros(3).to(device)
        spy.check("all_reduce", (moved + torch.tensor(1.0),), {})
        spy.check("all_gather", ([torch.empty(2, device=device)], torch.ones(2, device=device)), {})
        spy.check("broadcast", (torch.nn.Linear(2, 2).to(device).weight,), {})
    assert len(spy.violations) == 3
    assert spy.calls == {"all_reduce": 5, "all_gather": 1, "broadcast": 1}


def test_bpb_over_zero_steps_reduces_device_tensors(tmp_path):
    """A rank with no val batches still joins the all-reduce, with tensors on the model's device."""
    from nanochat.loss_eval import evaluate_bpb

    model = create_model(tiny_config(64), "cpu")
    spy, tracker = CollectiveSpy(), HostTracker()
    spy.device = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    spy.install()
    try:
        with tracker:
            assert math.isnan(evaluate_bpb(model, iter(()), 0, torch.ones(64, dtype=torch.int64)))
    finally:
        spy.uninstall()
        dist.destroy_process_group()
    assert spy.calls == {"all_reduce": 2} and spy.violations == []


@pytest.mark.slow
def test_every_stage_reduces_device_tensors_and_makes_no_float64_on_the_device(base_dir, shared_data, tmp_path):
    """base_train, base_loss, base_eval (CORE), mid, SFT, RL and chat_eval under two gloo ranks, in one process
    group. See tests/device_spy.py for how a CPU run catches what would crash on NCCL or MPS."""
    make_mini_corpus(base_dir, shared_data)
    (base_dir / "eval_bundle").symlink_to(shared_data / "core")
    (base_dir / "eval_data").symlink_to(shared_data / "eval")
    words = base_dir / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    chat = ["--chat_data", str(shared_data / "chat"), "--words_file", str(words), "--eval_batches", "1",
            "--chat_examples", "24"]
    stages = [
        ("scripts.base_train", [*TINY_MODEL_ARGS, "--device_batch_size=2", "--total_batch_size=128",
                                "--eval_tokens=128", "--sample_every=-1", "--num_iterations=2", "--eval_every=2"]),
        ("scripts.base_loss", ["--device_batch_size=2", "--split_tokens=128", "--sample_tokens=2"]),
        ("scripts.base_eval", ["--max_per_task=2", "--batch_size=4"]),
        ("scripts.mid_train", [*chat, "--device_batch_size=2", "--total_batch_size=128", "--num_iterations=1",
                               "--eval_every=1"]),
        ("scripts.chat_sft", [*chat, "--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=1",
                              "--eval_every=1", "--chat_eval_every=1", "--chat_eval_max=2"]),
        ("scripts.chat_rl", ["--task=arithmetic", "--train_examples=8", "--num_samples=2", "--examples_per_step=2",
                             "--max_new_tokens=6", "--eval_examples=2", "--eval_samples=2", "--num_iterations=1",
                             "--eval_every=1"]),
        ("scripts.chat_eval", ["-i", "rl", "-a", "ARC-Easy|GSM8K", "-x", "2", "--max_new_tokens=6"]),
    ]
    out = tmp_path / "spy"
    out.mkdir()
    result = subprocess.run(torchrun_cmd(2, "-m", "tests.device_spy", str(out), json.dumps(stages)),
                            capture_output=True, text=True, env=subprocess_env(base_dir), timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        seen = json.loads((out / f"rank{rank}.json").read_text())
        assert seen["violations"] == [], seen["violations"][:5]
        assert seen["float64"] == [], seen["float64"][:5]
        # the spy really watched: the loss average, the evals' sums and both sharded optimizers' collectives
        assert seen["calls"]["all_reduce"] >= 10
        assert {"reduce_scatter", "all_gather", "broadcast"} <= set(seen["calls"]), seen["calls"]


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), torch.float32),   # V100: bf16 only emulated
    ((7, 5), torch.float32),   # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),  # RTX 3090
    ((8, 9), torch.bfloat16),  # RTX 4090, L4
    ((9, 0), torch.bfloat16),  # H100
])
def test_auto_dtype_on_cuda_is_bfloat16_only_with_native_support(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert common.resolve_dtype("cuda", "auto") == expected
    assert common.resolve_dtype("cuda", "bfloat16") == torch.bfloat16  # an explicit choice still wins


# `torch.cuda.get_device_name` strings as real machines report them, with their dense bf16 peak
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H800", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10G", 70e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA RTX A6000", 155e12),
    ("NVIDIA RTX 6000 Ada Generation", 364e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA GeForce RTX 3090 Ti", 80e12),
    ("NVIDIA GeForce RTX 3080", 59.5e12),
    ("NVIDIA GeForce RTX 3080 Ti", 68e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 4080 SUPER", 104e12),
    ("NVIDIA GeForce RTX 5090", 209e12),
    ("Tesla V100-SXM2-16GB", None),  # no native bf16: such a run is float32
    ("Tesla T4", None),
    ("NVIDIA RTX A4000", None),      # not in the table: GFLOP/s instead of a made-up MFU
]


@pytest.mark.parametrize("name, flops", DEVICE_NAMES)
def test_peak_flops_by_exact_device_name(name, flops):
    assert common.peak_flops(name) == flops
    assert common.peak_flops(name, torch.float32) is None  # a float32 run is not measured against bf16 peaks


@pytest.mark.slow
def test_ranks_whose_local_files_differ_still_agree(tmp_path):
    """Two gloo ranks as two nodes: different initial weights, system dictionaries and demo chat data end up as
    rank 0's everywhere, and base dirs that are not one shared directory stop both ranks with one line."""
    base = tmp_path / "base"
    base.mkdir()
    result = subprocess.run(torchrun_cmd(2, "-m", "tests.devices_worker", str(tmp_path)), capture_output=True,
                            text=True, env=subprocess_env(base), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = ranks[1]
    assert seen["init_checksums"][0] != seen["init_checksums"][1]
    assert seen["broadcast_checksums"][0] == seen["broadcast_checksums"][1]
    assert seen["spelling"][0] == seen["spelling"][1] and "aword" in " ".join(seen["spelling"][1])
    assert seen["chat_data"] == ["hub", "hub"]
    for rank in ranks:
        message = rank["base_dir_error"]
        assert "NANOCHAT_BASE_DIR is not shared: rank 1 on" in message and "shared filesystem" in message
        assert "\n" not in message


def test_one_gpu_per_task_and_no_torchrun_on_mps(monkeypatch):
    """SLURM may show each task only its own GPU while LOCAL_RANK counts all tasks on the node."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.local_device("cuda", 3, 8) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert common.local_device("cuda", 5, 8) == torch.device("cuda", 1)
    assert common.local_device("cpu", 1, 2) == torch.device("cpu")
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(common.UserError, match="a Mac has one MPS device.*python -m scripts"):
        common.init_distributed("mps")


def test_training_in_float16_is_refused_in_one_line(capsys):
    from scripts import base_train

    with pytest.raises(SystemExit) as exit_info:
        from nanochat.flags import run_main
        run_main(lambda: base_train.main(["--dtype=float16"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dtype float16") and "bfloat16" in err and "float32" in err and "\n" not in err


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: the same guards and recompiles, without inductor's C++ build.
    Yields a function returning the graphs compiled so far."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="eager", **kwargs))
    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def test_varying_row_lengths_compile_once_per_bucket_with_unchanged_losses(eager_compile, one_thread):  # noqa: F811
    from nanochat.compiled import BucketedCompile, bucket_length

    assert [bucket_length(n, 2048) for n in (1, 64, 65, 700, 2048)] == [64, 64, 128, 1024, 2048]
    assert bucket_length(100, 96) == 100 and bucket_length(90, 96) == 96
    torch.manual_seed(0)
    model = create_model(tiny_config(64, max_seq_len=256), "cpu")
    compiled = BucketedCompile(model)
    lengths = [10, 33, 47, 64, 70, 99, 130, 200, 256]
    for length in lengths:
        inputs = torch.randint(0, 64, (2, length))
        targets = inputs.clone()
        targets[0, :length // 2] = -1
        assert torch.allclose(compiled(inputs, targets), model(inputs, targets), atol=1e-5)
        per_token = compiled(inputs, targets, loss_reduction="none")
        assert per_token.shape == (2, length)
        assert torch.allclose(per_token, model(inputs, targets, loss_reduction="none"), atol=1e-5)
    # buckets 64, 128, 256 × (reduction "none"; "mean", which on CPU with grad is the graph up to the fused loss
    # and the division after it), plus the fused loss's block kernel once; without buckets 9 lengths would pass
    # dynamo's recompile limit of 8
    assert eager_compile() == 3 * 3 + 1


def test_sft_with_compile_on_compiles_each_bucket_once(base_dir, shared_data, eager_compile, one_thread):  # noqa: F811
    from scripts import chat_sft
    from tests.chat_fixtures import make_base_checkpoint, train_tiny_tokenizer

    make_base_checkpoint(base_dir, train_tiny_tokenizer(300), seq_len=128)
    words = base_dir / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    # short synthetic conversations: rows of many lengths (7 compiles without buckets), in buckets 64 and 128
    chat_sft.main(["--source", "base", "--chat_examples", "0", "--simple_spelling", "40", "--spelling_bee", "20",
                   "--arithmetic", "0", "--identity", "off", "--task_train_sets", "false", "--words_file", str(words),
                   "--device_batch_size", "2", "--target_examples_per_step", "2", "--num_iterations", "8",
                   "--eval_every", "-1", "--chat_eval_every", "-1", "--compile", "true"])
    # each bucket: the graph up to the fused loss and the division after it; the loss's block kernel once
    assert eager_compile() <= 2 * 2 + 1


def test_rl_rollouts_sample_in_the_training_dtype(one_thread):  # noqa: F811
    from nanochat.engine import SamplingParams
    from nanochat.rl import RolloutBatches
    from tasks.arithmetic import Arithmetic
    from tests.chat_fixtures import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(300)
    model = create_model(tiny_config(tokenizer.vocab_size, depth=1, max_seq_len=96), "cpu")
    seen = set()
    model.lm_head.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    sampling = SamplingParams(max_tokens=4, temperature=1.0, num_samples=2)
    rollouts = RolloutBatches(model, tokenizer, Arithmetic(4), sampling, torch.device("cpu"), dtype=torch.bfloat16)
    next(rollouts)
    assert seen == {torch.bfloat16}


def test_report_cost_counts_the_gpus_of_every_node(base_dir, monkeypatch):
    """Two 8-GPU nodes: a stage's sidecar records 16 ranks; generate() on a node that sees 8 charges for 16."""
    from nanochat import report

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(report, "get_world_size", lambda: 16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    report.reset()
    report.log_section("Base model training", {"steps": 1}, source="base", wall_time_s=3600)
    assert json.loads((base_dir / "report" / "base-model-training.json").read_text())["gpus"] == 16
    text = report.generate(gpu_hourly_cost=2.0, copy_to=base_dir).read_text()
    assert "Estimated cost: $32.00 (16 GPU(s) × $2/GPU-hour × 1.00 h)" in text


def run_stages(base_dir, body: str, **env: str) -> subprocess.Popen:
    from tests.training_fixtures import REPO

    return subprocess.Popen(["bash", "-c", f"set -euo pipefail; source scripts/stages.sh; {body}"], cwd=REPO,
                            env={**subprocess_env(base_dir), "PIPELINE_POLL_S": "0.1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_setup_stages_run_on_node_0_only_and_other_nodes_wait_for_them(tmp_path):
    """Nodes sharing one base dir: node 1 never runs a set-up stage (a second tokenizer training or download
    into the same files); it waits for node 0's marker, then goes on."""
    waiting = run_stages(tmp_path, "setup_stage tok_train echo trained-on-node-1; echo node-1-goes-on", NODE_RANK="1")
    time.sleep(1.0)
    assert waiting.poll() is None  # still waiting
    node0 = run_stages(tmp_path, "setup_stage tok_train echo trained-on-node-0", NODE_RANK="0")
    assert node0.communicate(timeout=60)[0].count("trained-on-node-0") == 2  # the stage line and its output
    out = waiting.communicate(timeout=60)[0]
    assert waiting.returncode == 0
    assert "waiting for node 0" in out and "node-1-goes-on" in out and "trained-on-node-1" not in out


def test_chat_web_on_mps_serves_with_one_worker(capsys):
    from nanochat.server.loading import worker_devices

    assert worker_devices("mps", 4) == ["mps"]
    assert "one worker" in capsys.readouterr().out
    assert worker_devices("cpu", 3) == ["cpu"] * 3


def test_memory_estimate_adds_what_the_cuda_runtime_takes():
    """model_info sizes the whole device: allocator margin, cuBLAS workspace, CUDA context, NCCL when
    distributed, and the optimizer step's buffers (which never coexist with the activations)."""
    from nanochat.sizing import ALLOCATOR_MARGIN, CUBLAS_WORKSPACE, CUDA_CONTEXT, NCCL_BUFFERS, estimate_memory

    config = tiny_config(65536, depth=12, model_dim=768, head_dim=128, max_seq_len=2048)
    one = estimate_memory(config, 16, autocast=True)
    assert one.total == one.weights + one.grads + one.optimizer + one.activations  # activations dominate
    assert one.reserved == int(one.total * (1 + ALLOCATOR_MARGIN)) + CUBLAS_WORKSPACE
    assert one.device_total == one.reserved + CUDA_CONTEXT and one.nccl == 0
    eight = estimate_memory(config, 16, autocast=True, world_size=8)
    assert eight.nccl == NCCL_BUFFERS and eight.device_total == eight.reserved + NCCL_BUFFERS + CUDA_CONTEXT
    largest_matrix = 4 * config.model_dim * config.model_dim  # the MLP's c_fc / c_proj
    assert one.optimizer_transient == 4 * 3 * largest_matrix
    assert eight.optimizer_transient > one.optimizer_transient  # plus the gradients in flight
    tiny = estimate_memory(config, 1, seq_len=1, autocast=True)
    assert tiny.total == tiny.weights + tiny.grads + tiny.optimizer + tiny.optimizer_transient


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_check_refuses_without_a_gpu_in_one_line(tmp_path):
    from tests.training_fixtures import REPO

    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
                            env=subprocess_env(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: bench/gpu_check.sh needs a CUDA GPU and torch sees none; on CPU run the test "
                             "suite instead\n")


def test_accumulator_dtype_is_float32_only_on_mps():
    assert common.accumulator_dtype("mps") == torch.float32
    assert common.accumulator_dtype(torch.device("cuda", 1)) == torch.float64
    assert common.accumulator_dtype("cpu") == torch.float64
    total = common.sum_across_ranks([3, 4], "cpu")  # one process: no collective, just the tensor
    assert total.dtype == torch.float64 and total.tolist() == [3.0, 4.0]


def test_memory_estimate_counts_gqa_kv_expanded_for_float32_on_cuda():
    from nanochat.sizing import estimate_memory
    from tests.model_cases import tiny_config

    config = tiny_config(1024, depth=4, model_dim=256, head_dim=64, num_kv_heads=1, max_seq_len=512)
    flash = estimate_memory(config, 8)
    expanded = estimate_memory(config, 8, expanded_kv=True)
    assert expanded.activations - flash.activations == 8 * 512 * config.depth * 4 * 2 * 256  # fp32 k and v copies
    no_gqa = tiny_config(1024, depth=4, model_dim=256, head_dim=64, max_seq_len=512)
    assert estimate_memory(no_gqa, 8, expanded_kv=True).activations == estimate_memory(no_gqa, 8).activations
