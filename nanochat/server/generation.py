"""Generation for one request on one worker: the engine's token columns become text deltas (through the
engine's StreamDecoder, so stop strings and split UTF-8 characters are cut exactly as the CLIs cut them), and a
cancel flag (set when the client goes away) ends the loop within one engine step.

The engine loop runs in a worker thread; each step's deltas are handed to the event loop as one `Step`.
Tool-use tokens the model emits are rendered as markdown code fences, so a reply shows its calculator calls.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from nanochat.engine import FINISHED, STOP_TOKENS, SamplingParams, StreamDecoder

TOOL_TOKEN_TEXT = {
    "<|python_start|>": "\n```python\n",
    "<|python_end|>": "\n```\n",
    "<|output_start|>": "\n```output\n",
    "<|output_end|>": "\n```\n",
}
logger = logging.getLogger("nanochat.server")
OTHER_SPECIAL_TOKENS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>")


@dataclass
class Step:
    """What one or more engine steps produced: text per row (may be empty) and rows that finished, with reasons."""
    deltas: list[str]
    finished: dict[int, str] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.finished and not any(self.deltas)

    def merge(self, later: Step) -> None:
        self.deltas = [a + b for a, b in zip(self.deltas, later.deltas)]
        self.finished.update(later.finished)


@dataclass
class Outcome:
    completion_tokens: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    error: BaseException | None = None


class ReplyText:
    """The decoder StreamDecoder uses for replies: ordinary ids as text, tool markers as code fences, other
    chat markers as nothing (a half-trained model may emit them mid-reply)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = special_token_text(tokenizer)

    def decode(self, ids: list[int]) -> str:
        pieces, run = [], []
        for token in ids:
            if token in self.special:
                if run:
                    pieces.append(self.tokenizer.decode(run))
                    run = []
                pieces.append(self.special[token])
            else:
                run.append(token)
        if run:
            pieces.append(self.tokenizer.decode(run))
        return "".join(pieces)


def special_token_text(tokenizer) -> dict[int, str]:
    """How each special id is shown in a reply: tool markers as code fences, chat markers as nothing."""
    shown = {tokenizer.encode_special(name): text for name, text in TOOL_TOKEN_TEXT.items()}
    shown.update({tokenizer.encode_special(name): "" for name in OTHER_SPECIAL_TOKENS})
    return shown


def run_generation(engine, tokenizer, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
                   emit: Callable[[Step], None]) -> Outcome:
    """Drive `engine.generate` until every row finished or `cancel` was set (checked once per step).

    Runs in a worker thread; `emit` receives one Step per engine step. Rows end with the engine's
    finish_reason: "stop" (end token or stop string) or "length".
    """
    outcome = Outcome()
    start = time.perf_counter()
    generation = None
    try:
        end_ids = {tokenizer.encode_special(name) for name in STOP_TOKENS}
        reply_text = ReplyText(tokenizer)
        decoders = [StreamDecoder(reply_text, params.stop) for _ in range(params.num_samples)]
        generation = engine.generate(prompt_ids, **params.engine_kwargs())
        done: set[int] = set()
        for token_column, _mask_column in generation:
            if cancel.is_set():
                outcome.cancelled = True
                break
            step = Step(deltas=[""] * len(decoders))
            for i, token in enumerate(token_column):
                if token == FINISHED or i in done:
                    continue
                if token not in end_ids:
                    step.deltas[i] = decoders[i].push(token)
                reason = generation.finish_reasons[i]
                if reason is not None:
                    step.deltas[i] += decoders[i].flush()
                    step.finished[i] = reason
                    done.add(i)
            emit(step)
        outcome.completion_tokens = sum(generation.num_generated)
    except Exception as exc:  # the client gets an error naming its type; the worker must survive it
        logger.exception("generation failed")
        outcome.error = exc
    finally:
        if generation is not None:
            generation.close()
        outcome.seconds = time.perf_counter() - start
    return outcome
