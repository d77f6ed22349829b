"""Run a module as `python -m` would, with every `torch.manual_seed(s)` call turned into `manual_seed(s + OFFSET)`:
other seeds for a reference checkout whose seed is written into its code (karpathy/nanochat's compute_init calls
`torch.manual_seed(42)` and has no seed flag), so bench/race.py can measure the reference's run-to-run spread too.

    python bench/reseed.py OFFSET scripts.base_train --depth=4 ...     # cwd and PYTHONPATH = the checkout

Like race_eval.py it runs under the reference's Python and imports nothing of ours.
"""
from __future__ import annotations

import os
import runpy
import sys

import torch


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].lstrip("-").isdigit():
        sys.exit("usage: python bench/reseed.py OFFSET MODULE [ARGS...]  (OFFSET an integer added to every torch "
                 "seed)")
    offset, module = int(sys.argv[1]), sys.argv[2]
    seed = torch.manual_seed
    torch.manual_seed = lambda value: seed(value + offset)
    sys.argv = [module, *sys.argv[3:]]
    sys.path[0] = os.getcwd()  # as under `python -m`: the checkout's modules, not bench/'s, are found first
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
