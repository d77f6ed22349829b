"""common.py and flags.py: base dir, device and dtype choice, distributed init under a real torchrun, flags."""
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nanochat import common
from nanochat.common import UserError
from nanochat.flags import CheckpointFlags, TrainFlags, flag, parse_flags

REPO = Path(__file__).resolve().parents[1]


def test_base_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nested" / "base"))
    assert common.get_base_dir() == tmp_path / "nested" / "base"
    assert (tmp_path / "nested" / "base").is_dir()


def test_base_dir_default_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.get_base_dir() == tmp_path / ".cache" / "nanochat"


def test_device_autodetect_and_override():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert common.autodetect_device_type("auto") == expected
    assert common.autodetect_device_type("cpu") == "cpu"
    with pytest.raises(UserError, match="must be auto, cuda, mps or cpu"):
        common.autodetect_device_type("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="use --device_type cpu"):
            common.autodetect_device_type("cuda")


@pytest.mark.parametrize("device_type, requested, expected", [
    ("cpu", "auto", torch.float32),
    ("cpu", "bfloat16", torch.bfloat16),
    ("cuda", "float32", torch.float32),
    ("cpu", "float16", torch.float16),
])
def test_dtype_decision_table(device_type, requested, expected):
    assert common.resolve_dtype(device_type, requested) == expected


def test_dtype_on_mps_follows_backend_support():
    assert common.resolve_dtype("mps", "auto") == (
        torch.bfloat16 if common.mps_supports_bfloat16() else torch.float32)


def test_bad_dtype_names_choices():
    with pytest.raises(UserError, match="--dtype must be auto, float32, bfloat16, float16"):
        common.resolve_dtype("cpu", "fp8")


def test_peak_flops_table():
    assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.peak_flops("NVIDIA GeForce RTX 3090") == 71e12
    assert common.peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert common.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.peak_flops("Some Unknown Accelerator") is None
    assert common.device_peak_flops(torch.device("cpu")) is None


def test_dummy_run_never_touches_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing wandb would now fail
    run = common.init_wandb("dummy", "nanochat", {"a": 1})
    run.log({"loss": 1.0})
    run.finish()


def test_single_process_distributed_info(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    info = common.init_distributed("cpu")
    assert (info.is_distributed, info.rank, info.world_size, info.is_master) == (False, 0, 1, True)


def test_seeding_is_reproducible():
    common.seed_everything(7)
    first = torch.rand(3)
    common.seed_everything(7)
    assert torch.equal(first, torch.rand(3))


@pytest.mark.slow
def test_torchrun_gloo_all_reduce(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from nanochat.common import init_distributed, cleanup_distributed, print0
        info = init_distributed("cpu")
        value = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(value)
        print(f"rank={info.rank} world={info.world_size} sum={value.item():g}", flush=True)
        print0("master-only line")
        cleanup_distributed()
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "rank=0 world=2 sum=3" in result.stdout
    assert "rank=1 world=2 sum=3" in result.stdout
    assert result.stdout.count("master-only line") == 1


# ----------------------------------------------------------------------------------------------------- flags

@dataclass
class ExampleFlags(TrainFlags):
    depth: int = flag(4, "blocks")
    ratio: float | None = flag(None, "none = derive")
    names: list[str] = flag([], "some names")


def test_flags_parse_types_bools_and_optionals():
    flags = parse_flags(ExampleFlags, ["--depth", "6", "--resume", "--compile=false", "--ratio", "1.5",
                                       "--names", "a", "b"])
    assert (flags.depth, flags.resume, flags.compile, flags.ratio, flags.names) == (6, True, False, 1.5, ["a", "b"])
    defaults = parse_flags(ExampleFlags, [])
    assert (defaults.resume, defaults.compile, defaults.ratio, defaults.names) == (False, None, None, [])
    assert parse_flags(ExampleFlags, ["--ratio", "none"]).ratio is None


def test_flag_validation_raises_flag_error():
    with pytest.raises(UserError, match="--device_batch_size must be >= 1, got 0"):
        parse_flags(ExampleFlags, ["--device_batch_size", "0"])


def run_flag_cli(tmp_path, *args):
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from nanochat.flags import TrainFlags, parse_flags, run_main

        def main():
            flags = parse_flags(TrainFlags)
            print("ok", flags.device_batch_size)

        run_main(main)
    """))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--device_batch_size", "0"], "error: --device_batch_size must be >= 1, got 0"),
    (["--device_batch_size", "lots"], "error: argument --device_batch_size: expected int, got 'lots' (see --help)"),
    (["--no_such_flag", "1"], "error: unrecognized arguments: --no_such_flag 1 (see --help)"),
])
def test_bad_flags_print_one_line_and_exit_2(tmp_path, args, message):
    result = run_flag_cli(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_good_flags_run(tmp_path):
    result = run_flag_cli(tmp_path, "--device_batch_size", "3")
    assert result.returncode == 0 and result.stdout.strip() == "ok 3"


# ----------------------------------------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    common.atomic_write(target, "first")
    common.atomic_write(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    common.atomic_write(target, "good")
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_short_aliases_and_description():
    @dataclass
    class Short:
        max_problems: int = flag(-1, "problems per task", short="-x")

    assert parse_flags(Short, ["-x", "5"]).max_problems == 5
    assert parse_flags(Short, ["--max_problems", "6"]).max_problems == 6
    from nanochat.flags import build_parser
    assert not build_parser(Short).description.startswith("Short(")  # never dataclass's generated signature


def test_git_commit_names_this_checkout():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert common.git_commit().split(" ")[0] == head.stdout.strip()
    assert common.get_world_size() == 1


@pytest.mark.parametrize("cls", ["scripts.base_eval.BaseEvalFlags", "scripts.base_loss.BaseLossFlags",
                                 "scripts.chat_eval.ChatEvalFlags", "scripts.chat_web.ChatWebFlags",
                                 "scripts.export.ExportFlags", "nanochat.terminal.TerminalFlags"])
def test_every_loading_script_picks_its_checkpoint_the_same_way(cls):
    import importlib

    module, name = cls.rsplit(".", 1)
    flags_class = getattr(importlib.import_module(module), name)
    extra = ["--out", "x"] if name == "ExportFlags" else []
    assert issubclass(flags_class, CheckpointFlags)
    assert parse_flags(flags_class, extra).checkpoint_choice() == (None, None)
    assert parse_flags(flags_class, [*extra, "--model_tag", "d4", "--step", "0"]).checkpoint_choice() == ("d4", 0)
    with pytest.raises(UserError, match=r"--step must be >= 0 or -1 \(newest\), got -2"):
        parse_flags(flags_class, [*extra, "--step", "-2"])
