"""Run under torchrun (two gloo ranks) by tests/test_devices.py: what each rank sees when the ranks' local files
differ, as on several nodes.

    torchrun --nproc_per_node=2 -m tests.devices_worker TMP_DIR    # writes TMP_DIR/rank{r}.json

Rank r's system dictionary and demo chat data differ from rank 0's; at the end each rank points
NANOCHAT_BASE_DIR at a directory of its own.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import nanochat.chat_stage as chat_stage
import tasks.spellingbee as spellingbee
from nanochat.checkpoint import create_model
from nanochat.common import UserError, broadcast_parameters, check_shared_base_dir, init_distributed
from nanochat.flags import parse_flags
from tests.model_cases import tiny_config


def gather(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def checksum(model) -> float:
    return sum(float(t.double().sum()) for t in model.state_dict().values())


def main(tmp: str) -> None:
    info = init_distributed("cpu")
    rank, seen = info.rank, {}

    torch.manual_seed(rank)  # as if each GPU's RNG gave different initial weights
    model = create_model(tiny_config(64), "cpu")
    seen["init_checksums"] = gather(checksum(model))
    broadcast_parameters(model)
    seen["broadcast_checksums"] = gather(checksum(model))

    words = Path(tmp, f"dict_rank{rank}.txt")
    words.write_text("\n".join(f"{'ab'[rank]}word{letter}" for letter in "abcdefghijklmnopqrst") + "\n")
    spellingbee.SYSTEM_WORDLIST = words
    flags = parse_flags(chat_stage.ChatTrainFlags, ["--chat_examples=0", "--simple_spelling=8", "--spelling_bee=0",
                                                    "--arithmetic=0", "--identity=off"])
    mixture = chat_stage.chat_mixture(flags, "train", "hub", {})
    seen["spelling"] = gather([mixture[i]["messages"][0]["content"] for i in range(len(mixture))])

    demo = Path(tmp, f"demo_rank{rank}")
    demo.mkdir()
    if rank == 1:
        (demo / "train.jsonl").write_text("")
    chat_stage.demo_chat_dir = lambda: demo
    seen["chat_data"] = gather(chat_stage.resolve_chat_data("auto"))

    os.environ["NANOCHAT_BASE_DIR"] = str(Path(tmp, f"base_rank{rank}"))
    try:
        check_shared_base_dir(rank)
        seen["base_dir_error"] = None
    except UserError as exc:
        seen["base_dir_error"] = str(exc)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
