"""Chat with a checkpoint in the terminal (the SFT model by default), answers streaming as they are sampled.

    python -m scripts.chat_cli                      # interactive
    python -m scripts.chat_cli -p "What is 6*7?"    # one question, one answer, exit

Commands: /clear starts a new conversation, /temperature X and /topk K change sampling (/topk 0 = off),
quit or exit leaves (as does Ctrl-D). Ctrl-C stops an answer. Calculator calls show as [calculator: … → …].
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from nanochat.engine import Engine, assistant_parts
from nanochat.flags import flag, parse_flags, run_main
from nanochat.terminal import (BOLD, DIM, TerminalFlags, crop_to_context, input_prompt, load_engine, paint,
                               stream_completion, typed_inputs)

HELP = ("/clear new conversation · /temperature X · /topk K (0 = off) · quit or exit to leave · "
        "Ctrl-C stops an answer")


@dataclass
class ChatFlags(TerminalFlags):
    source: str = flag("sft", "checkpoint to load: base|mid|sft|rl")
    temperature: float = flag(0.6, "sampling temperature; 0 = greedy")
    prompt: str = flag("", "ask this one question (also -p), print the answer and exit; empty = interactive")


def reply(engine: Engine, flags: ChatFlags, messages: list[dict], seed: int) -> None:
    """Stream the assistant's answer to `messages` and append it (partial if interrupted) to the history."""
    tokens = engine.tokenizer.render_for_completion({"messages": messages})
    tokens, notice = crop_to_context(tokens, engine.model.config.max_seq_len, flags.max_tokens)
    if notice:
        print(paint(notice, DIM, sys.stderr), file=sys.stderr)
    completion, _ = stream_completion(engine, tokens, flags, seed)
    print()
    messages.append({"role": "assistant", "content": assistant_parts(engine.tokenizer, completion) or ""})


def apply_setting(command: str, flags: ChatFlags) -> str:
    """Handle /temperature and /topk; returns the line to show."""
    name, _, value = command.partition(" ")
    try:
        if name == "/temperature":
            temperature = float(value)
            if temperature < 0:
                raise ValueError
            flags.temperature = temperature
            return f"temperature = {temperature:g}"
        top_k = int(value)
        if top_k < 0:
            raise ValueError
        flags.top_k = top_k
        return f"top_k = {top_k}" + (" (off)" if top_k == 0 else "")
    except ValueError:
        example = "/temperature 0.7 (>= 0)" if name == "/temperature" else "/topk 50 (>= 0, 0 = off)"
        return f"error: {command!r} needs a number, e.g. {example}"


def interactive(engine: Engine, flags: ChatFlags) -> None:
    print(paint(HELP, DIM, sys.stdout))
    messages: list[dict] = []
    seed = flags.seed
    for text in typed_inputs(lambda: input(input_prompt("You: ", BOLD))):
        command = text.strip()
        if command in ("quit", "exit"):
            return
        if not command:
            continue
        if command == "/clear":
            messages.clear()
            print(paint("(new conversation)", DIM, sys.stdout))
            continue
        if command.split(" ")[0] in ("/temperature", "/topk"):
            print(paint(apply_setting(command, flags), DIM, sys.stdout))
            continue
        if command.startswith("/"):
            print(paint(f"unknown command {command.split()[0]}; {HELP}", DIM, sys.stdout))
            continue
        messages.append({"role": "user", "content": text})
        sys.stdout.write(paint("Assistant: ", BOLD, sys.stdout))
        reply(engine, flags, messages, seed)
        seed += 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = parse_flags(ChatFlags, ["--prompt" if arg == "-p" else arg for arg in argv])
    engine = load_engine(flags)
    if flags.prompt:
        reply(engine, flags, [{"role": "user", "content": flags.prompt}], flags.seed)
        return 0
    import readline  # noqa: F401  imported for its side effect: line editing and history in input()

    interactive(engine, flags)
    return 0


if __name__ == "__main__":
    run_main(main)
