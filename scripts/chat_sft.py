"""Supervised finetuning: one conversation per row, loss only on what the assistant writes.

    python -m scripts.chat_sft                                   # newest mid checkpoint, one epoch
    python -m scripts.chat_sft --source base --chat_data ../shared/data/chat --num_iterations 100

Rows are padded to the longest conversation of each micro-batch (no loss on padding); a conversation longer
than a row is cropped and counted. A step is `--target_examples_per_step` conversations. The LR starts at
`--init_lr_frac` of the base LRs and decays linearly to zero. Val loss every `--eval_every` steps; exact-answer
accuracy on the synthetic val tasks every `--chat_eval_every` steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from nanochat import report
from nanochat.chat_data import PaddedChatBatches, loader_totals
from nanochat.chat_eval import run_generative
from nanochat.chat_stage import (SYNTHETIC, ChatTrainFlags, chat_mixture, chat_val_loss, resolve_chat_data,
                                 stage_optimizers, start_stage)
from nanochat.common import UserError, cleanup_distributed, print0
from nanochat.engine import Engine, SamplingParams
from nanochat.flags import flag, parse_flags, run_main
from nanochat.optim import training_schedule
from nanochat.schedules import warmup_warmdown
from nanochat.trainer import Eval, grad_accum_steps, train
from tasks.arc import ARC
from tasks.gsm8k import GSM8K

SFT_FRACTIONS = {"simple_spelling": 0.03, "spelling_bee": 0.03, "arithmetic": 0.1}


def mixture_task_sets() -> list:
    """Answering science questions and word problems, from the train splits of ARC and GSM8K."""
    return [ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), GSM8K(split="train")]


@dataclass
class SFTFlags(ChatTrainFlags):
    """Chat SFT: one conversation per row, loss on the assistant's tokens."""
    source: str = flag("mid", "checkpoint to start from", choices=("mid", "base"))
    chat_examples: int = flag(10000, "chat conversations in the mixture; -1 = all; 0 = none")
    device_batch_size: int = flag(4, "conversations per device per micro-step; lower it if you run out of memory")
    target_examples_per_step: int = flag(32, "conversations per optimizer step across all ranks")
    num_epochs: int = flag(1, "passes over the mixture when --num_iterations is -1")
    compile: bool | None = flag(False, "torch.compile the model (rows are padded to power-of-two length "
                                       "buckets, each compiled once); off by default: a short stage rarely "
                                       "earns back the compile time")
    init_lr_frac: float = flag(0.02, "starting LR as a fraction of the base LRs")
    eval_every: int = flag(100, "steps between val-loss evaluations; -1 = off")
    chat_eval_every: int = flag(200, "steps between accuracy evals on the synthetic val tasks; -1 = off")
    chat_eval_max: int = flag(64, "problems per task in each accuracy eval")

    def __post_init__(self):
        super().__post_init__()
        if self.num_epochs < 1:
            raise UserError(f"--num_epochs must be >= 1, got {self.num_epochs}")
        if self.chat_eval_every == 0 or self.chat_eval_every < -1:
            raise UserError(f"--chat_eval_every must be >= 1 or -1 (off), got {self.chat_eval_every}")


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(SFTFlags, argv)
    started = time.time()
    stage = start_stage(flags, flags.source, "sft")
    dist, model, tokenizer, seq_len = stage.dist, stage.model, stage.tokenizer, stage.seq_len
    accum = grad_accum_steps(flags.target_examples_per_step, flags.device_batch_size, None, dist.world_size,
                             "target_examples_per_step")
    chat_data = resolve_chat_data(flags.chat_data)
    train_task = chat_mixture(flags, "train", chat_data, SFT_FRACTIONS, mixture_task_sets)
    val_task = chat_mixture(flags, "val", chat_data, SFT_FRACTIONS)
    num_iterations = flags.num_iterations
    if num_iterations == -1:
        num_iterations = max(1, len(train_task) * flags.num_epochs // flags.target_examples_per_step)
        print0(f"{flags.num_epochs} epoch(s) of {len(train_task):,} conversations = {num_iterations} steps")

    batches = PaddedChatBatches(tokenizer, train_task, flags.device_batch_size, seq_len, dist.device,
                                dist.rank, dist.world_size)
    val_loss = chat_val_loss(stage, flags, val_task, PaddedChatBatches)

    def accuracies(eval_model, step):
        # answers get at most half the context, as chat_eval allows (it would otherwise print a note each time)
        greedy = SamplingParams(max_tokens=min(256, eval_model.config.max_seq_len // 2))
        engine = Engine(eval_model, tokenizer)
        metrics = {}
        for task in val_task.tasks:
            if isinstance(task, tuple(SYNTHETIC.values())):
                solved, total = run_generative(engine, tokenizer, task, greedy, flags.chat_eval_max,
                                               dist.rank, dist.world_size)
                metrics[f"{type(task).__name__}_acc"] = solved / max(total, 1)
        return metrics

    result = train(model, stage_optimizers(model, flags), batches,
                   schedule=training_schedule(flags, num_iterations, warmup_warmdown(num_iterations, 0, 1.0, 0.0)),
                   flags=flags, checkpoint_dir=stage.out_dir, dist=dist, num_iterations=num_iterations,
                   grad_accum_steps=accum,
                   evals=[Eval("val", flags.eval_every, val_loss), Eval("chat", flags.chat_eval_every, accuracies)],
                   meta={"source": flags.source, "source_step": stage.source_meta["step"]},
                   flops_per_token=model.estimate_flops(seq_len))
    totals = loader_totals(batches)
    print0(f"chat_sft: {result.step} steps, {totals['conversations']:,} conversations ({batches.epoch:.2f} epochs), "
           f"{totals['overlong']:,} cropped to {seq_len + 1} tokens; checkpoint {result.checkpoint}")
    report.log_section("Chat SFT", [{
        "source": f"{flags.source}/{stage.tag} step {stage.source_meta['step']}", "chat data": chat_data,
        "steps": result.step, "conversations per step": flags.target_examples_per_step,
        "train conversations": len(train_task), "epochs done": round(batches.epoch, 3),
        "overlong cropped": totals["overlong"], **result.metrics,
    }], source="sft", wall_time_s=time.time() - started)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
