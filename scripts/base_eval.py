"""CORE score of a base checkpoint over the eval bundle (see nanochat/core_eval.py).

    python -m scripts.base_eval --download_only          # fetch the public bundle into eval_bundle/ and exit
    python -m scripts.base_eval --max_per_task 500       # evaluate the newest base checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nanochat import report
from nanochat.checkpoint import load_model, newest_tag, source_dir
from nanochat.common import (UserError, autodetect_device_type, barrier, cleanup_distributed, get_base_dir,
                             init_distributed, print0, resolve_dtype)
from nanochat.core_eval import bundle_dir, download_bundle, evaluate_core, load_bundle, write_results_csv
from nanochat.download import OfflineFlags
from nanochat.flags import CheckpointFlags, RuntimeFlags, flag, parse_flags, run_main


@dataclass
class BaseEvalFlags(OfflineFlags, RuntimeFlags, CheckpointFlags):
    max_per_task: int = flag(-1, "items per task (a fixed shuffle's first N); -1 = all")
    batch_size: int = flag(32, "sequences per forward pass; lower it if you run out of memory")
    bundle: str = flag("", "eval bundle directory; empty = $NANOCHAT_BASE_DIR/eval_bundle")
    download: bool = flag(False, "fetch the public bundle first when it is missing")
    download_only: bool = flag(False, "fetch the public bundle when missing, then exit")

    def __post_init__(self):
        super().__post_init__()
        if self.max_per_task == 0 or self.max_per_task < -1:
            raise UserError(f"--max_per_task must be >= 1 or -1 (all), got {self.max_per_task}")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {self.batch_size}")


def results_table(results: dict) -> str:
    rows = [[r["label"], r["accuracy"], r["centered"]] for r in results["tasks"]]
    return report.markdown_table(["Task", "Accuracy", "Centered"], rows + [["**CORE**", "", results["core"]]])


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(BaseEvalFlags, argv)
    start = time.time()
    device_type = autodetect_device_type(flags.device_type)
    dist = init_distributed(device_type)
    directory = Path(flags.bundle) if flags.bundle else bundle_dir()
    if flags.download or flags.download_only:
        if dist.is_master:
            download_bundle(directory)
        barrier()
        if flags.download_only:
            print0(f"CORE eval bundle ready in {directory}")
            cleanup_distributed()
            return
    tasks = load_bundle(directory)
    tag, step = flags.checkpoint_choice()
    tag = tag or newest_tag(source_dir("base"))
    model, tokenizer, meta = load_model("base", dist.device, tag, step, resolve_dtype(device_type, flags.dtype))
    results = evaluate_core(model, tokenizer, tasks, dist.device, model.config.max_seq_len, flags.max_per_task,
                            flags.batch_size, dist.rank, dist.world_size, progress=dist.is_master)
    table = results_table(results)
    print0(table)
    if dist.is_master:
        csv_path = write_results_csv(results, get_base_dir() / "base_eval" / f"{tag}_step{meta['step']:06d}.csv")
        print0(f"CORE {results['core']:.4f}; per-task results in {csv_path}")
        report.log_section("Base model evaluation (CORE)", [
            {"checkpoint": f"{tag} step {meta['step']}", "max per task": flags.max_per_task,
             "CORE": results["core"]}, table,
        ], source="base", metrics={"CORE": results["core"]}, wall_time_s=time.time() - start)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
