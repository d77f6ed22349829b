"""On-policy RL on word problems (GSM8K, or the synthetic arithmetic task) from the SFT model.

    python -m scripts.chat_rl                                    # newest sft checkpoint, GSM8K train, one epoch
    python -m scripts.chat_rl --task arithmetic --num_iterations 50

Per question the engine samples `--num_samples` answers; reward 1 for a correct final answer, advantage =
reward - the group's mean, and a policy-gradient step on the sampled tokens (nanochat/rl.py). pass@1..k on the
val split every `--eval_every` steps; checkpoints every `--save_every`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from nanochat import report
from nanochat.chat_stage import StageFlags, stage_optimizers, start_stage
from nanochat.common import UserError, cleanup_distributed, print0, resolve_dtype
from nanochat.engine import SamplingParams
from nanochat.flags import flag, parse_flags, run_main
from nanochat.optim import training_schedule
from nanochat.rl import RolloutBatches, pass_at_k, policy_gradient_loss
from nanochat.schedules import warmup_warmdown
from nanochat.trainer import Eval, grad_accum_steps, train
from tasks.arithmetic import Arithmetic
from tasks.common import Task
from tasks.gsm8k import GSM8K


@dataclass
class RLFlags(StageFlags):
    """Chat RL: on-policy policy gradient on word problems with a final numeric answer."""
    source: str = flag("sft", "checkpoint to start from", choices=("sft", "mid"))
    task: str = flag("gsm8k", "problems to learn from", choices=("gsm8k", "arithmetic"))
    train_examples: int = flag(-1, "questions in the train split; -1 = all (arithmetic: 8000)")
    num_samples: int = flag(16, "answers sampled per question")
    examples_per_step: int = flag(16, "questions per optimizer step across all ranks (one per micro-step)")
    max_new_tokens: int = flag(256, "longest sampled answer in tokens")
    temperature: float = flag(1.0, "sampling temperature for rollouts and pass@k")
    top_k: int = flag(50, "sample from the k most likely tokens; 0 = off")
    compile: bool | None = flag(False, "torch.compile the model (rows are padded to power-of-two length "
                                       "buckets, each compiled once); off by default: a short stage rarely "
                                       "earns back the compile time")
    init_lr_frac: float = flag(0.05, "starting LR as a fraction of the base LRs")
    eval_every: int = flag(60, "steps between pass@k evaluations; -1 = off")
    eval_examples: int = flag(400, "val questions per pass@k evaluation")
    eval_samples: int = flag(4, "k of pass@k: samples per val question")
    save_every: int = flag(60, "steps between checkpoints; -1 = only the final step")

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_samples", "examples_per_step", "max_new_tokens", "eval_examples", "eval_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0 for sampling, got {self.temperature}")


def rl_task(flags: RLFlags, split: str) -> Task:
    if flags.task == "arithmetic":
        size = 8000 if flags.train_examples == -1 else flags.train_examples
        return Arithmetic(size if split == "train" else max(1, size // 10), split=split)
    if split == "train":
        return GSM8K(split="train", stop=None if flags.train_examples == -1 else flags.train_examples)
    return GSM8K(split="test")  # scored only, never trained on


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(RLFlags, argv)
    started = time.time()
    stage = start_stage(flags, flags.source, "rl")
    dist, model, tokenizer = stage.dist, stage.model, stage.tokenizer
    train_task, val_task = rl_task(flags, "train"), rl_task(flags, "val")
    accum = grad_accum_steps(flags.examples_per_step, 1, None, dist.world_size, "examples_per_step")
    num_iterations = flags.num_iterations
    if num_iterations == -1:
        num_iterations = max(1, len(train_task) // flags.examples_per_step)
    print0(f"chat_rl: {flags.task}, {len(train_task):,} train questions, {num_iterations} steps of "
           f"{flags.examples_per_step} questions × {flags.num_samples} samples")
    sampling = SamplingParams(max_tokens=flags.max_new_tokens, temperature=flags.temperature, top_k=flags.top_k,
                              seed=flags.seed, num_samples=flags.num_samples)
    batches = RolloutBatches(model, tokenizer, train_task, sampling, dist.device, dist.rank, dist.world_size,
                             resolve_dtype(dist.device.type, flags.dtype))

    def evaluate(eval_model, step):
        metrics = pass_at_k(eval_model, tokenizer, val_task, flags.eval_examples,
                            replace(sampling, num_samples=flags.eval_samples), dist.rank, dist.world_size)
        return {**metrics, "train_reward": batches.mean_reward}

    result = train(model, stage_optimizers(model, flags), batches,
                   schedule=training_schedule(flags, num_iterations, warmup_warmdown(num_iterations, 0, 1.0, 0.0)),
                   flags=flags,
                   checkpoint_dir=stage.out_dir, dist=dist, num_iterations=num_iterations, grad_accum_steps=accum,
                   evals=[Eval("pass@k", flags.eval_every, evaluate)],
                   meta={"source": flags.source, "source_step": stage.source_meta["step"], "task": flags.task},
                   loss_fn=policy_gradient_loss)
    print0(f"chat_rl: {result.step} steps, mean train reward {batches.mean_reward:.4f}; "
           f"checkpoint {result.checkpoint}")
    report.log_section("Chat RL", [{
        "source": f"{flags.source}/{stage.tag} step {stage.source_meta['step']}", "task": flags.task,
        "steps": result.step, "samples per question": flags.num_samples,
        "mean train reward": round(batches.mean_reward, 4), **result.metrics,
    }], source="rl", wall_time_s=time.time() - started)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main)
