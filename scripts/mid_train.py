"""Mid-training: teach a base model the chat format, tool use and spelling on a packed conversation mixture.

    python -m scripts.mid_train                                   # newest base checkpoint, one epoch
    python -m scripts.mid_train --chat_data ../shared/data/chat --num_iterations 200
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size 32

Conversations (chat + identity + spelling + arithmetic) are packed into full BOS-aligned rows; the loss is on
what the assistant writes. The LR holds, then decays linearly to zero (it never rises).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from nanochat import report
from nanochat.chat_data import PackedChatBatches, estimate_packed_rows, loader_totals
from nanochat.chat_stage import (ChatTrainFlags, chat_mixture, chat_val_loss, resolve_chat_data, stage_optimizers,
                                 start_stage)
from nanochat.common import UserError, cleanup_distributed, print0
from nanochat.flags import flag, parse_flags, run_main
from nanochat.optim import training_schedule
from nanochat.schedules import warmup_warmdown
from nanochat.trainer import Eval, grad_accum_steps, train
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU

# Synthetic examples per chat conversation in the mixture (about smol-smoltalk : 200k/80k/40k at full size).
MID_FRACTIONS = {"simple_spelling": 0.4, "spelling_bee": 0.2, "arithmetic": 0.1}


def mixture_task_sets() -> list:
    """Multiple-choice format and calculator use, from the train splits of MMLU and GSM8K."""
    return [MMLU(split="auxiliary_train"), GSM8K(split="train")]


@dataclass
class MidFlags(ChatTrainFlags):
    """Mid-training: packed chat + tool + spelling conversations from a base checkpoint."""
    source: str = flag("base", "checkpoint to start from", choices=("base", "mid"))
    num_epochs: float = flag(1.0, "passes over the mixture when --num_iterations is -1")
    warmdown_ratio: float = flag(0.2, "fraction of the steps over which the LR decays linearly to zero")

    def __post_init__(self):
        super().__post_init__()
        if self.num_epochs <= 0:
            raise UserError(f"--num_epochs must be > 0, got {self.num_epochs}")


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(MidFlags, argv)
    started = time.time()
    stage = start_stage(flags, flags.source, "mid")
    dist, model, tokenizer, seq_len = stage.dist, stage.model, stage.tokenizer, stage.seq_len
    accum = grad_accum_steps(flags.total_batch_size, flags.device_batch_size, seq_len, dist.world_size)
    chat_data = resolve_chat_data(flags.chat_data)
    train_task = chat_mixture(flags, "train", chat_data, MID_FRACTIONS, mixture_task_sets)
    val_task = chat_mixture(flags, "val", chat_data, MID_FRACTIONS)
    rows_per_step = flags.device_batch_size * accum * dist.world_size
    num_iterations = flags.num_iterations
    if num_iterations == -1:
        rows = estimate_packed_rows(tokenizer, train_task, seq_len) * flags.num_epochs
        num_iterations = max(1, math.ceil(rows / rows_per_step))
        print0(f"{flags.num_epochs:g} epoch(s) ≈ {rows:,.0f} rows of {seq_len + 1} tokens = {num_iterations} steps")

    batches = PackedChatBatches(tokenizer, train_task, flags.device_batch_size, seq_len, dist.device,
                                dist.rank, dist.world_size)
    val_loss = chat_val_loss(stage, flags, val_task, PackedChatBatches)

    result = train(model, stage_optimizers(model, flags), batches,
                   schedule=training_schedule(flags, num_iterations,
                                              warmup_warmdown(num_iterations, 0, flags.warmdown_ratio, 0.0)),
                   flags=flags, checkpoint_dir=stage.out_dir, dist=dist, num_iterations=num_iterations,
                   grad_accum_steps=accum, evals=[Eval("val", flags.eval_every, val_loss)],
                   meta={"source": flags.source, "source_step": stage.source_meta["step"]},
                   flops_per_token=model.estimate_flops(seq_len))
    totals = loader_totals(batches)
    print0(f"mid_train: {result.step} steps, {totals['conversations']:,} conversations "
           f"({batches.epoch:.2f} epochs), {totals['overlong']:,} cropped to {seq_len + 1} tokens; "
           f"checkpoint {result.checkpoint}")
    report.log_section("Midtraining", [{
        "source": f"{flags.source}/{stage.tag} step {stage.source_meta['step']}", "chat data": chat_data,
        "steps": result.step, "rows per step": rows_per_step, "tokens per row": seq_len + 1,
        "train conversations": len(train_task), "epochs done": round(batches.epoch, 3),
        "overlong cropped": totals["overlong"], "val loss": result.metrics.get("val_loss"),
    }], source="mid", wall_time_s=time.time() - started)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
