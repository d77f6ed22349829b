"""scripts.base_train end to end on a slice of real shards: learning, checkpoints, resume under torchrun
(standalone and two "nodes" on 127.0.0.1), kill -9 mid-save, and one-line errors for bad flags."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from nanochat.checkpoint import PAUSE_ENV, complete_steps, load_model, meta_model
from nanochat.common import UserError
from nanochat.flags import parse_flags
from nanochat.model_config import model_config
from nanochat.recipes import FRONTIER, RECIPES
from scripts.base_train import BaseTrainFlags, batch_plan, main, ratio_param_count, resolve_num_iterations
from tests.training_fixtures import TINY_MODEL_ARGS, make_mini_corpus, read_losses, subprocess_env, torchrun_cmd

# 2025: frontier's batch-scaled LRs are 0.022x at a 256-token batch, too small to learn in a few steps
RUN_ARGS = [*TINY_MODEL_ARGS, "--recipe=2025", "--device_batch_size=4", "--total_batch_size=256",
            "--eval_tokens=256", "--sample_every=-1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    directory = tmp_path_factory.mktemp("base")
    make_mini_corpus(directory, shared_data)
    return directory


@pytest.fixture
def base(corpus, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(corpus))
    return corpus


def tag_dir(base, tag):
    return base / "base_checkpoints" / tag


@pytest.mark.slow
def test_loss_falls_on_real_shards_and_checkpoint_loads(base, capsys):
    # continue packing: at T=32 crop would train on nothing but the first 32 tokens of the shortest documents
    main([*RUN_ARGS, "--model_tag=learn", "--num_iterations=30", "--eval_every=15", "--sample_every=30",
          "--packing=continue"])
    out = capsys.readouterr().out
    losses = read_losses(tag_dir(base, "learn") / "train_log.jsonl")
    assert sorted(losses) == list(range(1, 31))
    assert sum(losses[s] for s in range(26, 31)) < 0.85 * sum(losses[s] for s in range(1, 6))
    bpb = [json.loads(line)["val_bpb"] for line in open(tag_dir(base, "learn") / "train_log.jsonl")
           if "val_bpb" in line]
    assert len(bpb) == 3 and bpb[-1] < bpb[0]
    assert "GFLOP/s" in out and "tok/s" in out and "sample: 'The capital of France is" in out
    assert re.search(r"^data: .*base_data yields ~[\d,]+ tokens per train shard; 7,680 fit once$", out, re.M)
    data = re.search(r"^data: read ([\d,]+) tokens, trained ([\d,]+) \(0\.0 % dropped\), epoch \d+$", out, re.M)
    assert data, out[-2000:]
    read, trained = (int(group.replace(",", "")) for group in data.groups())
    assert read > trained >= 30 * 256  # a row of T+1 tokens trains T targets; continuations repeat one token
    assert data.group(0).removeprefix("data: ") in (base / "report" / "base-model-training.md").read_text()
    model, tokenizer, meta = load_model("base", "cpu", tag="learn")
    assert meta["step"] == 30 and meta["val_bpb"] == bpb[-1] and meta["model_config"]["depth"] == 2
    ids = torch.tensor([tokenizer.encode("Hello world", prepend=tokenizer.bos_token_id)])
    assert torch.isfinite(model(ids)).all()


@pytest.mark.parametrize("args, message", [
    (["--total_batch_size=1000"], "--total_batch_size 1000 is not a multiple of 128 tokens per micro-step"),
    (["--total_batch_size=320"], "try --total_batch_size 256 or --device_batch_size 2"),
    (["--depth=0"], "--depth must be >= 1"),
    (["--model_dim=40", "--num_heads=2"], r"--model_dim 40 is not num_heads × head_dim \(2 × 16 = 32\)"),
    (["--keep_last=0"], "--keep_last must be >= 1 or -1"),
    (["--sample_every=0"], "--sample_every must be >= 1 or -1"),
    (["--num_iterations=-1", "--target_param_data_ratio=0.0001"], "gives 0 steps"),
    (["--resume", "--model_tag=never_trained"], "--resume found no complete checkpoint"),
])
def test_bad_flags_name_the_fix(base, args, message):
    with pytest.raises(UserError, match=message):
        main([*RUN_ARGS, "--num_iterations=2", *args])


@pytest.mark.parametrize("args, steps, why", [
    (["--num_iterations=7", "--target_flops=1e15"], 7, "--num_iterations"),
    (["--target_flops=1e12"], round(1e12 / (2e5 * 256)), "--target_flops"),
    (["--target_param_data_ratio=10"], round(10 * 50_000 / 256), "--target_param_data_ratio 10"),
])
def test_run_length_priority(args, steps, why):
    flags = parse_flags(BaseTrainFlags, [*RUN_ARGS, *args])
    assert resolve_num_iterations(flags, num_params=50_000, flops_per_token=2e5) == (steps, why)


def test_bad_flag_is_one_line_on_stderr(base):
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *RUN_ARGS, "--total_batch_size=1000"],
                            capture_output=True, text=True, env=subprocess_env(base), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: --total_batch_size 1000")


@pytest.mark.slow
def test_kill_during_save_resumes_from_previous_complete_step(base):
    # document masks and activation checkpointing ride along: they must survive a resume too
    extras = ["--model_tag=killed", "--save_every=2", "--eval_every=-1", "--doc_mask", "--activation_checkpointing"]
    main([*RUN_ARGS, *extras, "--num_iterations=4"])
    assert complete_steps(tag_dir(base, "killed")) == [2, 4]
    args = [*RUN_ARGS, *extras, "--num_iterations=6", "--resume"]
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env(base, **{PAUSE_ENV: "120"}))
    try:
        for line in proc.stdout:
            if line.startswith("pausing"):
                break
        assert (tag_dir(base, "killed") / "step_000006.tmp" / "model.safetensors").is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert complete_steps(tag_dir(base, "killed")) == [2, 4]
    main(args)
    assert complete_steps(tag_dir(base, "killed")) == [4, 6]
    assert not list(tag_dir(base, "killed").glob("*.tmp"))
    assert sorted(read_losses(tag_dir(base, "killed") / "train_log.jsonl")) == list(range(1, 7))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_resume_is_exact_and_two_nodes_run(base):
    """2 ranks train 6 steps (checkpoints at 3 and 6); then two one-process "nodes" on 127.0.0.1 resume from
    step 3: steps 4-6 must repeat bit for bit."""
    args = [*RUN_ARGS, "--model_tag=dist", "--num_iterations=6", "--save_every=3", "--keep_last=-1",
            "--eval_every=-1", "--device_type=cpu"]
    env = subprocess_env(base)
    first = subprocess.run(torchrun_cmd(2, "-m", "scripts.base_train", *args), capture_output=True, text=True,
                           env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    straight = read_losses(tag_dir(base, "dist") / "train_log.jsonl")
    assert sorted(straight) == list(range(1, 7))
    meta = json.loads((tag_dir(base, "dist") / "step_000006" / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"optim_rank0.pt", "optim_rank1.pt", "rng_rank1.pt"} <= set(meta["files"])

    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=static", f"--rdzv_endpoint={endpoint}",
                               "-m", "scripts.base_train", *args, "--resume_from_step=3"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(2)]
    outputs = []
    deadline = time.time() + 300
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=max(1, deadline - time.time()))[0])
        finally:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    resumed = read_losses(tag_dir(base, "dist") / "train_log.jsonl")
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    assert "resumed from" in outputs[0]


def test_every_recipe_key_is_a_real_flag():
    fields = {f.name for f in dataclasses.fields(BaseTrainFlags)}
    for name, table in RECIPES.items():
        assert set(table) <= fields, (name, set(table) - fields)
    assert RECIPES["2025"] == {}  # the dataclass defaults are the 2025 recipe


def test_recipe_sets_defaults_and_explicit_flags_win(capsys):
    assert parse_flags(BaseTrainFlags, []).recipe == "frontier"
    plain = parse_flags(BaseTrainFlags, list(RUN_ARGS))
    assert plain.recipe == "2025" and plain.embedding_lr == 0.2 and plain.muon_orthogonalizer == "newton_schulz"
    frontier = parse_flags(BaseTrainFlags, [*RUN_ARGS, "--recipe", "frontier", "--embedding_lr=0.25"])
    assert frontier.recipe == "frontier" and frontier.embedding_lr == 0.25
    explicit = {"embedding_lr", "total_batch_size"}  # RUN_ARGS sets the batch
    assert all(getattr(frontier, key) == value for key, value in FRONTIER.items() if key not in explicit)
    with pytest.raises(SystemExit):
        parse_flags(BaseTrainFlags, ["--recipe=frontier", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(nanochat/recipes.py); explicit flags win (default: frontier)" in help_text
    assert "--init_lr_frac) (default: 0.3)" in help_text and "(default: polar_express)" in help_text


def test_unknown_recipe_is_one_line(base):
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", "--recipe=2030"], capture_output=True,
                            text=True, env=subprocess_env(base), timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "invalid choice: '2030'" in result.stderr


def test_fp8_off_an_h100_is_refused_in_one_line(base):
    with pytest.raises(UserError, match="--fp8 needs an H100-class CUDA GPU; this run is on cpu"):
        main([*RUN_ARGS, "--num_iterations=1", "--fp8", "--device_type=cpu"])


@pytest.mark.parametrize("recipe", ["2025", "frontier"])
def test_resume_is_bit_exact_under_each_recipe(base, recipe):
    args = [*RUN_ARGS, f"--recipe={recipe}", f"--model_tag=exact_{recipe}", "--num_iterations=6", "--save_every=3",
            "--keep_last=-1", "--eval_every=-1"]
    main(args)
    straight = read_losses(tag_dir(base, f"exact_{recipe}") / "train_log.jsonl")
    main([*args, "--resume_from_step=3"])
    resumed = read_losses(tag_dir(base, f"exact_{recipe}") / "train_log.jsonl")
    assert sorted(resumed) == list(range(1, 7)) and resumed == straight
    meta = json.loads((tag_dir(base, f"exact_{recipe}") / "step_000006" / "meta.json").read_text())
    assert meta["flags"]["recipe"] == recipe and meta["total_batch_size"] == 256
    if recipe == "frontier":  # LRs × √(2^18 / 2^19) (the floor), except the smear/backout gates' fixed 0.2
        adamw, muon = torch.load(tag_dir(base, "exact_frontier") / "step_000006" / "optim_rank0.pt",
                                 weights_only=True)
        assert 0.2 in [group["initial_lr"] for group in adamw["param_groups"]]
        assert muon["param_groups"][0]["initial_lr"] == pytest.approx(FRONTIER["matrix_lr"] * 0.5 ** 0.5)


def test_resume_refuses_another_recipe(base):
    args = [*RUN_ARGS, "--model_tag=switch", "--num_iterations=2", "--eval_every=-1"]
    main(args)
    with pytest.raises(UserError, match=r"^the checkpoint was trained with --recipe 2025 .* this run has frontier; "
                                        r"pass --recipe 2025"):
        main([*args, "--num_iterations=4", "--resume", "--recipe=frontier"])
    with pytest.raises(UserError, match=r"^the checkpoint was trained with --matrix_lr 0.02 .*this run has 0.03"):
        main([*args, "--num_iterations=4", "--resume", "--matrix_lr=0.03"])


def test_auto_batch_follows_the_horizon(base, capsys):
    flags = parse_flags(BaseTrainFlags, [*RUN_ARGS, "--recipe=frontier", "--total_batch_size=-1"])
    model = meta_model(model_config(flags, 320))
    total, lr_scale, decay = batch_plan(flags, model, 320)
    d12 = meta_model(model_config(replace(flags, depth=12, model_dim=-1, num_heads=-1, num_kv_heads=-1), 320))
    ratio = ratio_param_count(flags, model) / ratio_param_count(flags, d12)
    assert total == 2 ** round(19 + 0.383 * math.log2(ratio))
    floor = FRONTIER["batch_lr_floor"]
    assert total < floor and lr_scale == pytest.approx((floor / 2 ** 19) ** 0.5)
    assert decay == pytest.approx(0.28 * (total / 2 ** 19) / lr_scale / ratio)
    unfloored = parse_flags(BaseTrainFlags, [*RUN_ARGS, "--recipe=frontier", "--total_batch_size=-1",
                                             "--batch_lr_floor=0"])
    assert batch_plan(unfloored, model, 320) == (total, pytest.approx((total / 2 ** 19) ** 0.5),
                                                 pytest.approx(0.28 * (total / 2 ** 19) ** 0.5 / ratio))
    explicit = parse_flags(BaseTrainFlags, [*RUN_ARGS, "--recipe=frontier"])  # RUN_ARGS has 256: it wins
    assert batch_plan(explicit, model, 320)[0] == 256
    assert batch_plan(parse_flags(BaseTrainFlags, list(RUN_ARGS)), model, 320) == (256, 1.0, 0.0)


def test_race_takes_repeated_references():
    from bench.race import RaceFlags

    flags = parse_flags(RaceFlags, ["--reference", "old", "--reference", "new", "--recipes", "frontier"])
    assert flags.reference == ["old", "new"] and flags.recipes == ["frontier"]
    assert parse_flags(RaceFlags, []).recipes == ["2025", "frontier"]


def test_race_seeded_runs_differ_only_in_seed(tmp_path):
    from bench.race import RaceFlags, ours

    flags = parse_flags(RaceFlags, ["--seeds", "1", "2"])
    assert flags.seeds == [1, 2]
    plain, seeded = ours("frontier", flags, tmp_path), ours("frontier", flags, tmp_path, seed=1)
    assert seeded.name == "ours frontier seed 1" and seeded.tag == "race_frontier_seed1"
    assert seeded.train_args == [*(a.replace(plain.tag, seeded.tag) for a in plain.train_args), "--seed=1"]
    assert parse_flags(BaseTrainFlags, seeded.train_args).seed == 1


def test_race_seeds_every_ablation_recipe_and_reference(tmp_path):
    from bench.race import RESEED, RaceFlags, lineup

    checkout = tmp_path / "nanochat-new"  # a karpathy/nanochat checkout as far as the race reads one
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "nanochat").mkdir()
    (checkout / "scripts" / "base_train.py").write_text('parser.add_argument("--device-batch-size")\n')
    (checkout / "nanochat" / "dataset.py").write_text('DATA_DIR = "base_data_climbmix"\n')
    flags = parse_flags(RaceFlags, ["--recipes", "frontier", "--ablate", "lr_floor", "--seeds", "1", "3",
                                    "--reference", str(checkout), "--reference_seeds", "2", "0"])
    systems = lineup(flags, tmp_path / "out")
    assert [s.name for s in systems] == ["ours frontier -lr_floor seed 1", "ours frontier -lr_floor seed 3",
                                         "ours frontier seed 1", "ours frontier seed 3",
                                         "nanochat nanochat-new seed+2", "nanochat nanochat-new"]
    assert "--batch_lr_floor=0" in systems[1].train_args and "--seed=3" in systems[1].train_args
    unseeded = lineup(parse_flags(RaceFlags, ["--reference", str(checkout)]), tmp_path / "out")
    assert [s.name for s in unseeded] == ["ours 2025", "ours frontier", "nanochat nanochat-new"]
    assert not any(arg.startswith("--seed") for arg in unseeded[0].train_args)
    seeded, plain = systems[-2:]
    assert seeded.base_dir == plain.base_dir and (seeded.tag, plain.tag) == ("race_seed2", "race")
    assert seeded.train_command == [str(RESEED), "2", "scripts.base_train"]
    assert plain.train_command == ["-m", "scripts.base_train"] and "--model-tag=race_seed2" in seeded.train_args


def test_reseed_adds_its_offset_to_every_torch_seed_a_module_sets(tmp_path):
    from bench.race import RESEED

    (tmp_path / "reference_scripts").mkdir()  # not `scripts`: ours is importable here and would shadow it
    (tmp_path / "reference_scripts" / "train.py").write_text(
        "import sys, torch\ntorch.manual_seed(42)\nprint(torch.initial_seed(), sys.argv[1:], torch.rand(1).item())\n")

    def run(*launcher):
        return subprocess.run([sys.executable, *launcher, "reference_scripts.train", "--x=1"], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.split(maxsplit=1)

    assert run(str(RESEED), "0") == run("-m")
    seed, rest = run(str(RESEED), "1")
    assert seed == "43" and rest.startswith("['--x=1']") and rest != run("-m")[1]
    refused = subprocess.run([sys.executable, str(RESEED), "one", "reference_scripts.train"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.strip().startswith("usage: python bench/reseed.py OFFSET")


def test_race_ablations_each_turn_frontier_switches_back_to_2025():
    from dataclasses import asdict

    from bench.race import ABLATIONS, ablations

    frontier, old = (asdict(parse_flags(BaseTrainFlags, [f"--recipe={name}"])) for name in ("frontier", "2025"))
    for name, args in ABLATIONS.items():
        ablated = asdict(parse_flags(BaseTrainFlags, ["--recipe=frontier", *args]))
        changed = {key for key in ablated if ablated[key] != frontier[key]}
        assert len(changed) == len(args) and all(ablated[key] == old[key] for key in changed), name
    assert ablations(["all"]) == list(ABLATIONS)
    with pytest.raises(UserError, match="--ablate smeer: unknown; choose from value_embeds"):
        ablations(["smeer"])


def test_fidelity_maps_every_frontier_parameter_and_measures_the_update_gap():
    from bench.fidelity import SHAPE_ARGS, VOCAB_SIZE, FidelityFlags, update_differences
    from bench.fidelity_ref import reference_name

    with pytest.raises(UserError, match=r"--reference PATH is required"):
        parse_flags(FidelityFlags, [])
    model = meta_model(model_config(parse_flags(BaseTrainFlags, SHAPE_ARGS), VOCAB_SIZE))
    names = [name for name, _ in model.named_parameters()]
    mapped = [reference_name(name) for name in names]  # karpathy/nanochat's GPT state-dict keys
    assert len(set(mapped)) == len(names) and "transformer.wte.weight" in mapped and "lm_head.weight" in mapped
    assert "transformer.h.1.attn.ve_gate.weight" in mapped and "transformer.h.0.mlp.c_fc.weight" in mapped
    start = {"w": torch.zeros(3)}
    rows = update_differences(start, {"w": torch.tensor([1.0, 2.0, 2.0])}, {"w": torch.tensor([1.0, 2.0, 2.0])})
    assert rows == [("w", 3.0, 0.0)]
    assert update_differences(start, {"w": torch.tensor([0.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 3.0, 4.0])}
                              )[0][2] == pytest.approx(1.0)
