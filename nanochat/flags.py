"""The one flags path: a dataclass per stage becomes argparse, with help, types and one-line errors.

    @dataclass
    class SFTFlags(TrainFlags):
        init_lr_frac: float = flag(0.02, "starting LR as a fraction of the base LR")

    def main(argv=None):
        flags = parse_flags(SFTFlags, argv)
        ...

    if __name__ == "__main__":
        run_main(main)

Flag names are field names (`--model_dim`). Bool flags accept `--resume`, `--resume=true` and `--resume=0`.
A field typed `X | None` accepts `none` for None (None usually means "derive it", stated in the help).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch

from nanochat.common import UserError

T = TypeVar("T")


def flag(default: Any, help: str, choices: tuple | None = None, short: str | None = None) -> Any:
    """A dataclass field carrying its help text (optional choices, optional short alias like "-n")."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if short is not None:
        meta["short"] = short
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(base: Any, optional: bool) -> Callable[[str], Any]:
    convert = parse_bool if base is bool else base

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from exc

    parse.__name__ = base.__name__
    return parse


class RepeatableList(argparse.Action):
    """A list flag: the first `--x a b` replaces the default, a repeated `--x c` adds to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(self, "given", False)
        setattr(namespace, self.dest, (getattr(namespace, self.dest) if given else []) + list(values))
        self.given = True


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message on a bad flag; we want one line that names the fix."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def describe(cls: type) -> str:
    """The flags class's own docstring, else the running script's; never dataclass's generated signature."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):
        doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
    return doc.strip().split("\n\n")[0]


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(description=description or describe(cls),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        base, optional = _unwrap_optional(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs: dict[str, Any] = {"default": default, "help": field.metadata.get("help", "").replace("%", "%%")}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            kwargs.update(nargs="*", type=_converter(item, False), action=RepeatableList)
        elif base is bool:
            kwargs.update(nargs="?", const=True, type=_converter(bool, optional))
        else:
            kwargs["type"] = _converter(base, optional)
        names = [field.metadata["short"]] if "short" in field.metadata else []
        parser.add_argument(*names, f"--{field.name}", **kwargs)
    return parser


def recipe_defaults(cls: type, argv: list[str] | None) -> dict[str, Any]:
    """The table of the `--recipe` in argv (else the class's default recipe), for a class with a `recipe` field,
    limited to the class's own fields; {} for other classes."""
    from nanochat.recipes import RECIPES

    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "recipe" not in fields:
        return {}
    pre = OneLineParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", default=fields["recipe"].default, choices=tuple(RECIPES))
    name = pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].recipe
    return {"recipe": name, **{key: value for key, value in RECIPES[name].items() if key in fields}}


def parse_flags(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse argv into the dataclass; its `__post_init__` validates and raises UserError. A `--recipe`'s table
    becomes the parser's defaults first, so --help shows the effective values and explicit flags win."""
    parser = build_parser(cls, description)
    parser.set_defaults(**recipe_defaults(cls, argv))
    namespace = parser.parse_args(argv)
    return cls(**vars(namespace))


def run_main(main: Callable[[], Any]) -> None:
    """Entry-point wrapper: user errors become `error: ...` and exit 2, never a traceback."""
    try:
        result = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print("error: out of memory; lower --device_batch_size (or add --activation_checkpointing)",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


# ---------------------------------------------------------------------------------------------------------
# Flags every training stage (base, mid, sft, rl) spells the same way

@dataclass
class RuntimeFlags:
    device_type: str = flag("auto", "auto|cuda|mps|cpu (auto: cuda > mps > cpu)")
    dtype: str = flag("auto", "auto|float32|bfloat16|float16 (auto: bfloat16 on GPUs with native bf16, else "
                              "float32; float16 for inference only)")


@dataclass
class CheckpointFlags:
    """Which checkpoint an inference, eval or export script loads: the newest tag and step unless given."""
    model_tag: str = flag("", "checkpoint tag (e.g. d20); empty = the newest")
    step: int = flag(-1, "checkpoint step; -1 = the newest")

    def __post_init__(self):
        if self.step < -1:
            raise UserError(f"--step must be >= 0 or -1 (newest), got {self.step}")

    def checkpoint_choice(self) -> tuple[str | None, int | None]:
        """(tag, step) for checkpoint.load_model, None meaning the newest."""
        return self.model_tag or None, None if self.step == -1 else self.step


@dataclass
class TrainFlags(RuntimeFlags):
    run: str = flag("dummy", "wandb run name; 'dummy' turns wandb off")
    device_batch_size: int = flag(32, "rows per device per micro-step; lower it if you run out of memory")
    total_batch_size: int = flag(524288, "tokens per optimizer step across all ranks (grad accumulation fills it)")
    num_iterations: int = flag(-1, "optimizer steps; -1 = derive from the stage's defaults")
    eval_every: int = flag(250, "steps between val evaluations; -1 = off")
    save_every: int = flag(-1, "steps between checkpoints; -1 = only the final step")
    keep_last: int = flag(2, "complete checkpoints to keep; -1 = keep all")
    resume: bool = flag(False, "continue from the newest complete checkpoint of this --model_tag")
    resume_from_step: int = flag(-1, "continue from this step's checkpoint; -1 = off")
    model_tag: str = flag("", "checkpoint directory name; empty = d<depth>")
    compile: bool | None = flag(None, "torch.compile the model; none = auto (on for cuda, and on cpu for runs of "
                                      ">= 500 steps)")
    grad_clip: float = flag(0.0, "clip the global gradient norm to this before each update; 0 = off")
    seed: int = flag(42, "random seed for init and data order")
    auto_total_batch: ClassVar[bool] = False  # whether the stage derives --total_batch_size -1 itself

    def __post_init__(self):
        if self.device_batch_size < 1:
            raise UserError(f"--device_batch_size must be >= 1, got {self.device_batch_size}")
        if self.total_batch_size < 1 and not (self.total_batch_size == -1 and self.auto_total_batch):
            auto = " or -1 (auto)" if self.auto_total_batch else ""
            raise UserError(f"--total_batch_size must be >= 1{auto}, got {self.total_batch_size}")
        if self.keep_last == 0 or self.keep_last < -1:
            raise UserError(f"--keep_last must be >= 1 or -1 (keep all), got {self.keep_last}")
        if self.save_every == 0 or self.save_every < -1:
            raise UserError(f"--save_every must be >= 1 or -1 (off), got {self.save_every}")
        if self.grad_clip < 0:
            raise UserError(f"--grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.eval_every == 0 or self.eval_every < -1:
            raise UserError(f"--eval_every must be >= 1 or -1 (off), got {self.eval_every}")
        if self.dtype == "float16":
            # without a gradient scaler, float16 gradients underflow to zero and training silently stalls
            raise UserError("--dtype float16 is for inference only; train with --dtype bfloat16 (GPUs with compute "
                            "capability >= 8.0) or --dtype float32")
