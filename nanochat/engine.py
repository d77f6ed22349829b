"""Generation: the model's inference cache (`model.new_cache`), sampling, stop rules, the calculator tool, and streaming text.

    engine = Engine(model, tokenizer)
    generation = engine.generate(prompt_ids, num_samples=2, max_tokens=64, temperature=0.8, seed=1)
    for token_column, mask_column in generation:   # one entry per sample row, one step at a time
        ...
    generation.finish_reasons                      # per row: "stop" or "length"

The prompt is prefilled once with batch 1; its cache is then copied into every sample row, and each step feeds
one token per row. A row stops on its own at `<|assistant_end|>`, `<|bos|>` or a user stop string; the
generation ends when every row has stopped or `max_tokens` (or the context) is reached. Stopping early is just
not iterating any further: the generation holds the cache, so dropping it (or calling `close()`) frees it.

Tool use: tokens sampled between `<|python_start|>` and `<|python_end|>` are decoded and handed to the
calculator; its answer is then forced into that row as `<|output_start|>…<|output_end|>`, one token per step,
with mask 0 so RL and SFT can tell forced tokens from sampled ones.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.attention import KVCache
from nanochat.calculator import calculate
from nanochat.common import UserError

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
# A UTF-8 character is at most 4 bytes and every token carries at least one byte, so an incomplete character
# never spans more than this many tokens; longer undecodable tails are invalid bytes and are emitted as U+FFFD.
MAX_TOKENS_PER_CHAR = 4
FINISHED = -1  # token and mask value a row reports after it has stopped


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Temperature 0 is greedy; top-k then top-p narrow the support."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # keep the smallest prefix reaching top_p; the most likely token always survives (mass_before = 0)
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StreamDecoder:
    """Token ids in, finished text out: never half a UTF-8 character, never text past a stop string.

    `push(token_id)` returns the text that became final with this token (often ""); text that might still turn
    out to be the start of a stop string is held back. Once a stop string appears, `stopped` is True and the
    text ends right before it. `flush()` returns whatever is held back when the stream ends without a stop.
    The server streams with this class too, so the CLIs and the API cut text at the same place.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.pending: list[int] = []  # tokens whose bytes may end mid-character
        self.text = ""  # decoded text, ending on a character boundary
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending.append(token_id)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < MAX_TOKENS_PER_CHAR:
            self.commit_clean_prefix()
        else:
            self.text += piece
            self.pending = []
        return self.release()

    def commit_clean_prefix(self) -> None:
        """Keep only the tokens of the unfinished character pending; decode the ones before it now."""
        for cut in range(len(self.pending) - 1, 0, -1):
            head = self.tokenizer.decode(self.pending[:cut])
            if not head.endswith("\ufffd"):
                self.text += head
                self.pending = self.pending[cut:]
                return

    def release(self, final: bool = False) -> str:
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            end = len(self.text) if final else len(self.text) - self.stop_prefix_length()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that a stop string starts with (that tail is held back)."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        if self.stopped:
            return ""
        if self.pending:
            self.text += self.tokenizer.decode(self.pending)
            self.pending = []
        return self.release(final=True)


@dataclass
class RowState:
    """What one sample row carries between steps."""
    decoder: StreamDecoder | None
    forced: deque = field(default_factory=deque)  # calculator output waiting to be fed
    python_tokens: list[int] | None = None  # the tool call being written; None outside a python block
    finish_reason: str | None = None


class Generation:
    """One request: iterate for `(token_column, mask_column)`, one entry per row per step.

    `token_column[i]` is row i's token this step and `mask_column[i]` is 1 if it was sampled, 0 if the
    calculator forced it. The token that stops a row (`<|assistant_end|>` or `<|bos|>`) is yielded; after
    that the row reports `FINISHED` (-1) with mask 0 until the others stop. `finish_reasons[i]` is None while
    row i runs, then "stop" (stop token or stop string) or "length" (max_tokens or the context is full).
    """

    def __init__(self, engine: Engine, tokens: list[int], num_samples: int, max_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int, stop: list[str] | None):
        prompt = [int(t) for t in tokens]
        max_seq_len, vocab_size = engine.model.config.max_seq_len, engine.model.config.vocab_size
        if not prompt:
            raise UserError("the prompt is empty; pass at least one token (e.g. <|bos|>)")
        if len(prompt) > max_seq_len:
            raise UserError(f"the prompt has {len(prompt)} tokens but the model's context is {max_seq_len}; "
                            "shorten it")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise UserError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt)}..{max(prompt)}")
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be >= 1 or None (off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] or None (off), got {top_p}")
        self.engine = engine
        self.num_prompt_tokens = len(prompt)
        self.num_generated = [0] * num_samples  # tokens yielded per row, stop token included
        self.finish_reasons: list[str | None] = [None] * num_samples
        # the last sampled token is never fed back, so a prompt of P tokens leaves room for max_seq_len - P + 1
        num_steps = min(max_tokens, max_seq_len - len(prompt) + 1)
        self.steps = self.run(prompt, num_samples, num_steps, temperature, top_k, top_p, seed, stop or [])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[int], list[int]]:
        return next(self.steps)

    def close(self) -> None:
        """Stop early and free the KV cache now rather than when the generation is garbage-collected."""
        self.steps.close()

    def run(self, prompt, num_samples, num_steps, temperature, top_k, top_p, seed, stop):
        engine = self.engine
        generator = torch.Generator(device=engine.device)
        generator.manual_seed(seed)
        capacity = len(prompt) + num_steps - 1
        logits, cache = engine.prefill(prompt, num_samples, capacity)
        rows = [RowState(StreamDecoder(engine.tokenizer, stop) if stop else None) for _ in range(num_samples)]
        for step in range(num_steps):
            sampled = engine.sample(logits, generator, temperature, top_k, top_p)
            tokens, masks = [], []
            for i, row in enumerate(rows):
                if row.finish_reason is not None:
                    tokens.append(FINISHED)
                    masks.append(0)
                    continue
                token, mask = (row.forced.popleft(), 0) if row.forced else (sampled[i], 1)
                engine.advance_row(row, token, mask)
                if row.finish_reason is None and step == num_steps - 1:
                    row.finish_reason = "length"
                self.num_generated[i] += 1
                self.finish_reasons[i] = row.finish_reason
                tokens.append(token)
                masks.append(mask)
            yield tokens, masks
            if all(row.finish_reason is not None for row in rows):
                return
            logits = engine.decode_step(cache, [max(t, 0) for t in tokens])


@dataclass
class SamplingParams:
    """How to sample completions: the one settings type the server, the terminal CLIs, chat_eval and RL pass
    around. "Off" is spelled one way here and in every flag and API field: temperature 0 = greedy, top_k 0 = off,
    top_p 1.0 = off."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 42
    num_samples: int = 1
    stop: list[str] = field(default_factory=list)

    def engine_kwargs(self) -> dict:
        """The keywords of `Engine.generate` / `generate_batch` (whose Python API spells off as None)."""
        return {"num_samples": self.num_samples, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_k": self.top_k or None, "top_p": self.top_p if self.top_p < 1 else None, "seed": self.seed,
                "stop": self.stop or None}


class Engine:
    """Wraps a GPT and its tokenizer for generation; stateless between requests, so one engine serves many."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        special = tokenizer.encode_special
        self.stop_token_ids = {special(name) for name in STOP_TOKENS}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 42,
                 stop: list[str] | None = None) -> Generation:
        """Stream a completion of `tokens`; bad arguments raise UserError here, before the first step."""
        return Generation(self, tokens, num_samples, max_tokens, temperature, top_k, top_p, seed, stop)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 64,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 42, stop: list[str] | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Run to the end. `results[i]` is the prompt followed by row i's tokens, without a final stop token;
        `masks[i]` is 0 over the prompt and forced tokens, 1 over sampled ones."""
        prompt = [int(t) for t in tokens]
        results = [list(prompt) for _ in range(num_samples)]
        masks = [[0] * len(prompt) for _ in range(num_samples)]
        for token_column, mask_column in self.generate(prompt, num_samples, max_tokens, temperature, top_k, top_p,
                                                       seed, stop):
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                if token != FINISHED and not (mask and token in self.stop_token_ids):
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    @torch.inference_mode()
    def prefill(self, prompt: list[int], num_samples: int, capacity: int) -> tuple[torch.Tensor, KVCache]:
        """One forward pass over the prompt; returns last-position logits (num_samples, V) and the row cache."""
        prefill_cache = self.model.new_cache(1, len(prompt))
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]
        cache = self.model.new_cache(num_samples, capacity)
        cache.fill_from(prefill_cache)
        return logits.expand(num_samples, -1), cache

    @torch.inference_mode()
    def decode_step(self, cache: KVCache, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        return self.model(ids, kv_cache=cache)[:, -1, :]

    @torch.inference_mode()
    def sample(self, logits, generator, temperature, top_k, top_p) -> list[int]:
        return sample_next_token(logits, generator, temperature, top_k, top_p).tolist()

    def advance_row(self, row: RowState, token: int, mask: int) -> None:
        """Apply one token to a row: tool-call bookkeeping, then the stop rules."""
        if token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            result = calculate(self.tokenizer.decode(row.python_tokens))
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.python_tokens = None
        elif row.python_tokens is not None:
            row.python_tokens.append(token)
        if mask and token in self.stop_token_ids:
            row.finish_reason = "stop"
        elif row.decoder is not None:
            row.decoder.push(token)
            if row.decoder.stopped:
                row.finish_reason = "stop"


def assistant_parts(tokenizer, tokens: list[int]) -> list[dict]:
    """Split generated tokens into conversation parts: text, python (the call) and python_output (its result),
    the shape `render_conversation` takes for an assistant message. A trailing stop token is dropped."""
    kinds = {tokenizer.encode_special("<|python_start|>"): ("python", "<|python_end|>"),
             tokenizer.encode_special("<|output_start|>"): ("python_output", "<|output_end|>")}
    stop_ids = {tokenizer.encode_special(name) for name in STOP_TOKENS}
    parts, current, kind, closer = [], [], "text", None

    def close_part():
        if current:
            parts.append({"type": kind, "text": tokenizer.decode(current)})
        current.clear()

    for token in tokens:
        if token in stop_ids:
            break
        if kind == "text" and token in kinds:
            close_part()
            kind, closer = kinds[token][0], tokenizer.encode_special(kinds[token][1])
        elif closer is not None and token == closer:
            close_part()
            kind, closer = "text", None
        else:
            current.append(token)
    close_part()
    return parts


def fit_prompt(prompt: list[int], max_seq_len: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Crop a long prompt to leave room to answer: the one cropping rule every caller shares.

    Room is `max_new_tokens` or half the context, whichever is less (0 for a forward pass that only reads the
    last position). A longer prompt keeps its first token (the BOS every training row starts with) and drops
    the oldest ones after it. Returns (prompt, new-token budget); the answer's last token is never fed back,
    so prompt + budget may be max_seq_len + 1.
    """
    keep = max_seq_len - min(max_new_tokens, max_seq_len // 2)
    if len(prompt) > keep:
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]
    return prompt, min(max_new_tokens, max_seq_len - len(prompt) + 1)


# Fixed prompts for a quick look at what a base model has learned (base_train's samples, base_loss's report).
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def greedy_samples(model, tokenizer, max_tokens: int = 16, prompts: list[str] = SAMPLE_PROMPTS) -> list[str]:
    """Each prompt followed by its greedy continuation; a tiny context crops the prompt (fit_prompt)."""
    engine = Engine(model, tokenizer)
    samples = []
    for prompt in prompts:
        tokens, budget = fit_prompt(tokenizer.encode(prompt, prepend=tokenizer.bos_token_id),
                                    model.config.max_seq_len, max_tokens)
        results, _ = engine.generate_batch(tokens, max_tokens=budget, temperature=0.0)
        samples.append(prompt + tokenizer.decode(results[0][len(tokens):]))
    return samples
