"""What the terminal front ends (base_complete, chat_cli) share: sampling flags, loading a checkpoint into an
Engine, cropping a prompt to the context, and streaming a completion to the screen.

Streaming shows tool calls readably (`[calculator: 6*7 → 42]` in a dim colour) and turns Ctrl-C into "stop this
completion" rather than "quit": the caller gets the tokens produced so far and carries on.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO, TypeVar

from nanochat.checkpoint import CHECKPOINT_DIRS, load_model
from nanochat.common import UserError, autodetect_device_type, resolve_dtype
from nanochat.engine import Engine, SamplingParams, StreamDecoder, fit_prompt
from nanochat.flags import CheckpointFlags, RuntimeFlags, flag

T = TypeVar("T")
GRAY, DIM, BOLD, RESET = "\x1b[90m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


@dataclass
class TerminalFlags(RuntimeFlags, CheckpointFlags):
    source: str = flag("base", f"checkpoint to load: {'|'.join(CHECKPOINT_DIRS)}")
    max_tokens: int = flag(256, "most new tokens per completion")
    temperature: float = flag(0.8, "sampling temperature; 0 = greedy")
    top_k: int = flag(50, "sample among the k most likely tokens; 0 = off")
    top_p: float = flag(1.0, "sample from the smallest set of tokens holding this much probability; 1.0 = off")
    seed: int = flag(42, "seed of the first completion; each later one uses the next seed")

    def __post_init__(self):
        super().__post_init__()
        if self.source not in CHECKPOINT_DIRS:
            raise UserError(f"--source must be one of {', '.join(CHECKPOINT_DIRS)}, got {self.source!r}")
        if self.max_tokens < 1:
            raise UserError(f"--max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1] (1.0 = off), got {self.top_p}")

    def sampling(self, seed: int) -> SamplingParams:
        """One completion's settings; `seed` changes per completion."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed)


def load_engine(flags: TerminalFlags) -> Engine:
    """Load the checkpoint the flags name; the loader's progress lines go to stderr so stdout stays the text."""
    device_type = autodetect_device_type(flags.device_type)
    dtype = resolve_dtype(device_type, flags.dtype)
    device = "cuda" if device_type == "cuda" else device_type
    with contextlib.redirect_stdout(sys.stderr):
        tag, step = flags.checkpoint_choice()
        model, tokenizer, _ = load_model(flags.source, device, tag=tag, step=step, dtype=dtype)
    return Engine(model, tokenizer)


def crop_to_context(tokens: list[int], max_seq_len: int, max_tokens: int) -> tuple[list[int], str | None]:
    """The prompt cropped by `engine.fit_prompt`, and a notice for the screen (None when nothing was cut)."""
    kept, _ = fit_prompt(tokens, max_seq_len, max_tokens)
    if len(kept) == len(tokens):
        return tokens, None
    notice = (f"(the prompt is {len(tokens)} tokens; kept the first and the last {len(kept) - 1} to fit the "
              f"{max_seq_len}-token context)")
    return kept, notice


def typed_inputs(read: Callable[[], T]) -> Iterator[T]:
    """What the user types, one `read()` at a time: Ctrl-C at the prompt starts a fresh one, Ctrl-D ends."""
    while True:
        try:
            yield read()
        except KeyboardInterrupt:
            print()
        except EOFError:
            print()
            return


def use_color(out: TextIO) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ


def paint(text: str, color: str, out: TextIO) -> str:
    return f"{color}{text}{RESET}" if use_color(out) and text else text


def input_prompt(text: str, color: str) -> str:
    """A coloured prompt for input(); \\001 and \\002 tell readline the codes take no width on screen."""
    return f"\001{color}\002{text}\001{RESET}\002" if use_color(sys.stdout) else text


class TokenPrinter:
    """Writes completion tokens as text: UTF-8 safe, tool calls shown as `[calculator: expr → result]`."""

    def __init__(self, engine: Engine, out: TextIO):
        self.out = out
        self.tokenizer = engine.tokenizer
        self.decoder = StreamDecoder(self.tokenizer)
        dim = DIM if use_color(out) else ""
        self.reset = RESET if use_color(out) else ""
        self.markers = {engine.python_start: f"{dim}[calculator: ", engine.python_end: "",
                        engine.output_start: " → ", engine.output_end: f"]{self.reset}"}

    def write(self, token: int) -> None:
        if token in self.markers:
            self.out.write(self.decoder.flush() + self.markers[token])
            self.decoder = StreamDecoder(self.tokenizer)
        else:
            self.out.write(self.decoder.push(token))
        self.out.flush()

    def finish(self) -> None:
        # reset: a completion cut inside a tool call must not leave the terminal dim
        self.out.write(self.decoder.flush() + self.reset)
        self.out.flush()


def stream_completion(engine: Engine, tokens: list[int], flags: TerminalFlags, seed: int,
                      out: TextIO | None = None) -> tuple[list[int], bool]:
    """Print a completion (to stdout by default) as it is sampled. Returns (completion tokens without the stop
    token, interrupted); Ctrl-C stops this completion only."""
    out = out or sys.stdout
    generation = engine.generate(tokens, **flags.sampling(seed).engine_kwargs())
    printer = TokenPrinter(engine, out)
    completion: list[int] = []
    try:
        for token_column, _ in generation:
            token = token_column[0]
            if token in engine.stop_token_ids:
                break
            completion.append(token)
            printer.write(token)
    except KeyboardInterrupt:
        generation.close()
        printer.finish()
        out.write(paint(" [stopped]", DIM, out))
        out.flush()
        return completion, True
    printer.finish()
    return completion, False


def screen_rows(lines: list[str], prefix_width: int) -> int:
    """Terminal rows the typed lines took, wrapping included, so they can be erased and redrawn."""
    columns = max(1, shutil.get_terminal_size().columns)
    return sum(max(1, math.ceil((prefix_width + len(line)) / columns)) for line in lines)


def erase_rows(rows: int, out: TextIO) -> None:
    """Move the cursor up over `rows` rows and clear from there down."""
    if use_color(out) and rows > 0:
        out.write(f"\x1b[{rows}F\x1b[J")
