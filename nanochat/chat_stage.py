"""What mid_train, chat_sft and chat_rl share: flags, the starting checkpoint, optimizers, the data choice and
the task mixtures.

Each stage starts from another stage's checkpoint (`--source`, `--model_tag`, `--step`; newest by default) and
writes its own under the same tag. The training itself is `nanochat.trainer.train`, the one loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nanochat.chat_data import PackedChatBatches, PaddedChatBatches, evaluate_chat_loss
from nanochat.checkpoint import checkpoint_dir, load_model, newest_tag, source_dir
from nanochat.common import (DistInfo, UserError, autodetect_device_type, decide_on_rank0, init_distributed, print0,
                             seed_everything)
from nanochat.download import OfflineFlags
from nanochat.flags import TrainFlags, flag
from nanochat.optim import OptimFlags, setup_optimizers
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture
from tasks.customjson import CustomJSON
from tasks.identity import Identity
from tasks.smoltalk import SmolTalk, demo_chat_dir
from tasks.spellingbee import SimpleSpelling, SpellingBee, load_words


@dataclass
class StageFlags(OfflineFlags, OptimFlags, TrainFlags):
    """Where a chat stage starts and how fast it learns."""
    step: int = flag(-1, "step of the --source checkpoint to start from; -1 = newest")
    max_seq_len: int = flag(-1, "tokens per row; -1 = the model's max_seq_len")
    init_lr_frac: float = flag(1.0, "starting LR as a fraction of the LRs above")

    def __post_init__(self):
        super().__post_init__()
        if self.init_lr_frac <= 0:
            raise UserError(f"--init_lr_frac must be > 0, got {self.init_lr_frac}")
        if self.step < -1:
            raise UserError(f"--step must be >= 0 or -1 (newest), got {self.step}")


@dataclass
class ChatTrainFlags(StageFlags):
    """StageFlags plus the conversation mixture (mid and SFT)."""
    chat_data: str = flag("auto", "chat conversations: hub (smol-smoltalk), demo (chat_data/demo), or a directory "
                                  "with {train,val}.jsonl(.gz); auto = demo when built, else hub")
    identity: str = flag("builtin", "identity conversations, mixed in twice (train only): builtin (tasks/identity.py), "
                                    "off, or a jsonl file of your own (e.g. who made the model)")
    chat_examples: int = flag(-1, "chat conversations in the mixture; -1 = all; 0 = none")
    simple_spelling: int = flag(-1, "SimpleSpelling examples; -1 = the stage's share of the chat size; 0 = none")
    spelling_bee: int = flag(-1, "SpellingBee examples; -1 = the stage's share of the chat size; 0 = none")
    arithmetic: int = flag(-1, "calculator word problems; -1 = the stage's share of the chat size; 0 = none")
    words_file: str = flag("", "word list for the spelling tasks; empty = cache, /usr/share/dict or the shards")
    task_train_sets: bool | None = flag(None, "mix in the train splits of the eval tasks (mid: MMLU auxiliary_train "
                                              "+ GSM8K; SFT: ARC + GSM8K); none = only with hub chat data")
    eval_batches: int = flag(20, "val batches per val-loss evaluation")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_batches < 1:
            raise UserError(f"--eval_batches must be >= 1, got {self.eval_batches}")
        for name in ("chat_examples", *SYNTHETIC):
            if getattr(self, name) < -1:
                raise UserError(f"--{name} must be >= 0 or -1 (stage default), got {getattr(self, name)}")


@dataclass
class Stage:
    dist: DistInfo
    model: torch.nn.Module
    tokenizer: object
    source_meta: dict
    tag: str
    out_dir: Path
    seq_len: int


def start_stage(flags: StageFlags, source: str, stage: str) -> Stage:
    """Distributed init, seeds, and the starting model (float32 master weights) from `source`'s checkpoint."""
    device_type = autodetect_device_type(flags.device_type)
    dist_info = init_distributed(device_type)
    seed_everything(flags.seed + dist_info.rank)
    tag = flags.model_tag or newest_tag(source_dir(source))
    model, tokenizer, meta = load_model(source, dist_info.device, tag=tag,
                                        step=None if flags.step == -1 else flags.step)
    model.float()
    model_len = model.config.max_seq_len
    seq_len = model_len if flags.max_seq_len == -1 else flags.max_seq_len
    if not 1 <= seq_len <= model_len:
        raise UserError(f"--max_seq_len {flags.max_seq_len} must be between 1 and the model's {model_len}; "
                        "use -1 for the model's")
    out_dir = checkpoint_dir(stage, tag)
    print0(f"{stage}: from {source}/{tag} step {meta['step']} -> {out_dir}; rows of {seq_len} tokens; "
           f"{dist_info.world_size} rank(s) on {dist_info.device}")
    return Stage(dist_info, model, tokenizer, meta, tag, out_dir, seq_len)


def chat_val_loss(stage: Stage, flags: ChatTrainFlags, val_task: Task,
                  batches_class: type[PackedChatBatches] | type[PaddedChatBatches]) -> Callable[..., dict[str, float]]:
    """The trainer's val eval for mid and SFT: mean loss per trained token over `--eval_batches` batches of the
    val mixture, read from its start every time so evaluations compare."""
    def val_loss(eval_model, step: int) -> dict[str, float]:
        batches = batches_class(stage.tokenizer, val_task, flags.device_batch_size, stage.seq_len, stage.dist.device,
                                stage.dist.rank, stage.dist.world_size)
        return {"val_loss": evaluate_chat_loss(eval_model, batches, flags.eval_batches)}

    return val_loss


def stage_optimizers(model, flags: StageFlags) -> list:
    """The base optimizers with every LR scaled by --init_lr_frac (stored as each group's initial_lr)."""
    return setup_optimizers(model, flags, lr_scale=flags.init_lr_frac)


def resolve_chat_data(choice: str) -> str:
    if choice != "auto":
        return choice
    def has_demo() -> bool:
        demo = demo_chat_dir()
        return (demo / "train.jsonl.gz").is_file() or (demo / "train.jsonl").is_file()

    chosen = "demo" if decide_on_rank0(has_demo) else "hub"
    print0(f"chat data: {chosen} (--chat_data auto)")
    return chosen


SYNTHETIC = {"simple_spelling": SimpleSpelling, "spelling_bee": SpellingBee, "arithmetic": Arithmetic}


def chat_mixture(flags: ChatTrainFlags, split: str, chat_data: str, fractions: dict[str, float],
                 task_train_sets: Callable[[], list[Task]] = list) -> TaskMixture:
    """Chat conversations (+ identity conversations, twice, in train) + the eval tasks' train splits (train only,
    see --task_train_sets) + synthetic tasks, shuffled with the seed. A synthetic task's size is its flag, or
    (-1) its `fractions` entry times the chat size; val gets a tenth of train's synthetic examples."""
    tasks: list[Task] = []
    if flags.chat_examples != 0:
        tasks.append(SmolTalk(split, data=chat_data, stop=None if flags.chat_examples == -1 else flags.chat_examples))
    chat_size = len(tasks[0]) if tasks else 0
    use_task_sets = flags.task_train_sets if flags.task_train_sets is not None else chat_data == "hub"
    if use_task_sets and split == "train":
        tasks += task_train_sets()
    if flags.identity != "off" and split == "train":
        # builtin: about 1 in 40 conversations at most, and no more than 1000 distinct ones
        identity = Identity(min(1000, max(10, chat_size // 40))) if flags.identity == "builtin" \
            else CustomJSON(flags.identity)
        tasks += [identity, identity]
    words = None
    for name, task_class in SYNTHETIC.items():
        size = getattr(flags, name)
        size = math.ceil(chat_size * fractions.get(name, 0.0)) if size == -1 else size
        size = size if split == "train" else math.ceil(size / 10)
        if size == 0:
            continue
        if task_class is Arithmetic:
            tasks.append(Arithmetic(size, split=split))
            continue
        words = words if words is not None else decide_on_rank0(lambda: load_words(flags.words_file or None))
        tasks.append(task_class(size, split=split, words=words))
    if not tasks:
        raise UserError("the mixture is empty: keep --chat_examples non-zero or ask for synthetic examples")
    mixture = TaskMixture(tasks, seed=flags.seed)
    print0(f"{split} mixture: {len(mixture):,} conversations = " +
           " + ".join(f"{type(t).__name__} {len(t):,}" for t in tasks))
    return mixture
