"""Run under torchrun (gloo, CPU) by tests/test_dataloader.py: each rank takes 20 batches straight, then 10,
saves the loader state, rebuilds the loader, loads the state and takes 10 more; it writes what it saw to
`<out>/rank{r}.json` for the test to compare."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import cleanup_distributed, init_distributed
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import get_tokenizer


def main(out: Path) -> None:
    info = init_distributed("cpu")
    tokenizer = get_tokenizer()

    def make():
        return PretrainLoader(tokenizer, batch_size=2, seq_len=48, rank=info.rank, world_size=info.world_size,
                              buffer_docs=8)

    straight = make()
    reference = [next(straight)[0].tolist() for _ in range(20)]
    first = make()
    resumed = [next(first)[0].tolist() for _ in range(10)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = make()
    second.load_state_dict(state)
    resumed += [next(second)[0].tolist() for _ in range(10)]
    groups = [[path.name, group] for path, group in straight.groups]
    # Every rank must see the same number of row groups' worth of structure; the all-reduce proves gloo is up.
    count = torch.tensor([len(groups)])
    dist.all_reduce(count)
    (out / f"rank{info.rank}.json").write_text(json.dumps(
        {"reference": reference, "resumed": resumed, "groups": groups, "total_groups": int(count)}))
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
