"""Raw text completion from any checkpoint (a base model by default).

    python -m scripts.base_complete                          # interactive: type, end with ### to complete
    python -m scripts.base_complete --prompt "The capital of France is"
    echo "Once upon a time" | python -m scripts.base_complete --max_tokens 64

Interactive mode: the prompt may span lines; `###` at the end of a line sends it. The prompt is redrawn in
gray and the completion streams after it. Ctrl-C stops a completion (or discards a half-typed prompt), Ctrl-D
quits.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from nanochat.engine import Engine
from nanochat.flags import flag, parse_flags, run_main
from nanochat.terminal import (DIM, GRAY, TerminalFlags, crop_to_context, erase_rows, load_engine, paint,
                               screen_rows, stream_completion, typed_inputs)

TRIGGER = "###"
FIRST_PROMPT, NEXT_PROMPT = "> ", ". "


@dataclass
class CompleteFlags(TerminalFlags):
    prompt: str = flag("", "complete this text and exit; empty = interactive, or read stdin when it is piped")


def complete(engine: Engine, flags: CompleteFlags, text: str, seed: int, show_prompt: bool) -> None:
    tokens = engine.tokenizer.encode(text, prepend=engine.tokenizer.bos_token_id)
    tokens, notice = crop_to_context(tokens, engine.model.config.max_seq_len, flags.max_tokens)
    if notice:
        print(paint(notice, DIM, sys.stderr), file=sys.stderr)
    if show_prompt:
        sys.stdout.write(paint(text, GRAY, sys.stdout))
    stream_completion(engine, tokens, flags, seed)
    print()


def read_prompt() -> tuple[str, list[str]]:
    """Lines up to the one ending in ###; returns the prompt text and the lines as typed (for redrawing)."""
    lines: list[str] = []
    while True:
        line = input(NEXT_PROMPT if lines else FIRST_PROMPT)
        lines.append(line)
        if line.rstrip().endswith(TRIGGER):
            typed = list(lines)
            lines[-1] = line.rstrip()[:-len(TRIGGER)]
            return "\n".join(lines), typed


def interactive(engine: Engine, flags: CompleteFlags) -> None:
    print(paint(f"Type a prompt and end it with {TRIGGER} to complete it. Ctrl-C stops a completion, "
                "Ctrl-D quits.", DIM, sys.stdout))
    seed = flags.seed
    for text, typed in typed_inputs(read_prompt):
        erase_rows(screen_rows(typed, len(FIRST_PROMPT)), sys.stdout)
        complete(engine, flags, text, seed, show_prompt=True)
        seed += 1


def main(argv: list[str] | None = None) -> int:
    flags = parse_flags(CompleteFlags, argv)
    engine = load_engine(flags)
    if flags.prompt or not sys.stdin.isatty():
        text = flags.prompt or sys.stdin.read()
        complete(engine, flags, text, flags.seed, show_prompt=sys.stdout.isatty())
        return 0
    import readline  # noqa: F401  imported for its side effect: line editing and history in input()

    interactive(engine, flags)
    return 0


if __name__ == "__main__":
    run_main(main)
