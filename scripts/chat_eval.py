"""Evaluate a chat checkpoint on ARC, MMLU, GSM8K, HumanEval and SpellingBee, and compute ChatCORE.

    python -m scripts.chat_eval -i sft                          # every task, every problem
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    python -m scripts.chat_eval -i sft -a HumanEval -n 10 -t 0.8 -k 50   # pass@10
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat import report
from nanochat.chat_eval import (BASELINES, TASK_NAMES, build_task, chatcore, parse_task_names, run_categorical,
                                run_generative)
from nanochat.checkpoint import CHECKPOINT_DIRS, load_model
from nanochat.common import UserError, autodetect_device_type, cleanup_distributed, init_distributed, print0, resolve_dtype
from nanochat.core_eval import centered
from nanochat.download import OfflineFlags
from nanochat.engine import Engine, SamplingParams
from nanochat.flags import CheckpointFlags, RuntimeFlags, flag, parse_flags, run_main

@dataclass
class ChatEvalFlags(OfflineFlags, RuntimeFlags, CheckpointFlags):
    source: str = flag("sft", "checkpoint to evaluate", tuple(CHECKPOINT_DIRS), short="-i")
    task_name: str = flag("", "tasks separated by |, e.g. 'ARC-Easy|GSM8K'; empty = all", short="-a")
    num_samples: int = flag(1, "samples per generative problem; a problem is solved if any passes (pass@n)",
                            short="-n")
    max_problems: int = flag(-1, "problems per task (the first N); -1 = all", short="-x")
    temperature: float = flag(0.0, "sampling temperature for generative tasks; 0 = greedy", short="-t")
    top_k: int = flag(50, "sample from the k most likely tokens; 0 = off", short="-k")
    max_new_tokens: int = flag(512, "tokens generated per sample; capped at half the model's context")
    batch_size: int = flag(8, "prompts per forward pass for categorical tasks")
    data_dir: str = flag("", "folder of <task>.jsonl.gz eval files; empty = $NANOCHAT_BASE_DIR/eval_data "
                             "(downloaded when missing)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise UserError(f"-k/--top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_problems == 0 or self.max_problems < -1:
            raise UserError(f"-x/--max_problems must be >= 1 or -1 (all), got {self.max_problems}")
        if self.num_samples > 1 and self.temperature == 0:
            raise UserError("-n > 1 with -t 0 samples the same completion n times; set -t (e.g. 0.8)")
        parse_task_names(self.task_name)


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(ChatEvalFlags, argv)
    start = time.time()
    device_type = autodetect_device_type(flags.device_type)
    dist = init_distributed(device_type)
    model, tokenizer, meta = load_model(flags.source, dist.device, *flags.checkpoint_choice(),
                                        resolve_dtype(device_type, flags.dtype))
    engine = Engine(model, tokenizer)
    sampling = SamplingParams(max_tokens=flags.max_new_tokens, temperature=flags.temperature, top_k=flags.top_k,
                              num_samples=flags.num_samples)
    accuracies = {}
    for name in parse_task_names(flags.task_name):
        task = build_task(name, flags.data_dir or None)
        if task.eval_type == "categorical":
            correct, total = run_categorical(model, tokenizer, task, dist.device, flags.max_problems,
                                             flags.batch_size, dist.rank, dist.world_size, dist.is_master)
        else:
            correct, total = run_generative(engine, tokenizer, task, sampling, flags.max_problems, dist.rank,
                                            dist.world_size, dist.is_master)
        accuracies[name] = correct / max(1, total)
        print0(f"{name}: {correct}/{total} = {accuracies[name]:.4f}")
    score = chatcore(accuracies)
    print0(f"ChatCORE ({len(accuracies)} tasks): {score:.4f}")
    rows = [[name, acc, centered(acc, BASELINES[name])] for name, acc in accuracies.items()]
    # ChatCORE enters the summary table only over the full task set, so columns stay comparable
    metrics = {**accuracies, **({"ChatCORE": score} if set(accuracies) == set(TASK_NAMES) else {})}
    table = report.markdown_table(["Task", "Accuracy", "Centered"], rows + [["**ChatCORE**", "", score]])
    report.log_section(f"Chat evaluation {flags.source}", [
        {"checkpoint step": meta.get("step"), "max problems": flags.max_problems, "samples": flags.num_samples,
         "temperature": flags.temperature}, table,
    ], source=flags.source, metrics=metrics, wall_time_s=time.time() - start)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
