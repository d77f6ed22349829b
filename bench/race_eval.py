"""The race's one evaluator: bits per byte of a final checkpoint on fixed texts, each encoded alone after BOS.

    python bench/race_eval.py --system ours|nanochat --texts texts.json --tag TAG     # NANOCHAT_BASE_DIR set

It runs under each system's own Python and import path (so it imports nothing from either nanochat at module
level): only loading differs per system (`load_ours`, `load_nanochat`); the scoring (`score`) is the same code for
all. bpb = summed next-token NLL over every token of the text / ln 2 / the text's UTF-8 bytes, so systems with
different tokenizers are compared on the same bytes. Texts longer than the context are scored in windows that
carry half a context of history. Prints one JSON object: {set name: bpb}.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

import torch
import torch.nn.functional as F


def load_ours(tag: str):
    from nanochat.checkpoint import load_model

    model, tokenizer, _ = load_model("base", "cpu", tag=tag)
    return model, lambda text: tokenizer.encode(text, prepend=tokenizer.bos_token_id), tokenizer.vocab_size, \
        model.config.max_seq_len


def load_nanochat(tag: str):
    """karpathy/nanochat's format: base_checkpoints/<tag>/model_NNNNNN.pt (a state dict, loaded weights-only) and
    meta_NNNNNN.json (its GPTConfig kwargs); the model is built the way its checkpoint_manager does."""
    from nanochat.common import get_base_dir
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    directory = os.path.join(get_base_dir(), "base_checkpoints", tag)
    step = max(int(re.search(r"model_(\d+)\.pt$", p).group(1)) for p in glob.glob(f"{directory}/model_*.pt"))
    state = torch.load(f"{directory}/model_{step:06d}.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    with open(f"{directory}/meta_{step:06d}.json", encoding="utf-8") as f:
        config = GPTConfig(**json.load(f)["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()  # buffers (rotary tables) the state dict does not hold
    model.load_state_dict(state, strict=True, assign=True)  # bf16 tensors were widened above, as it does on CPU
    tokenizer = get_tokenizer()
    bos = tokenizer.get_bos_token_id()
    return model, lambda text: tokenizer.encode(text, prepend=bos), tokenizer.get_vocab_size(), config.sequence_len


def windows(tokens: list[int], context: int) -> list[tuple[list[int], int]]:
    """(ids, first scored target) windows covering every token after the BOS: each window predicts ids[1:], and
    after the first it carries half a context of already-scored history."""
    result, position = [], 1  # next target to score
    while position < len(tokens):
        start = 0 if position == 1 else max(0, position - context // 2)
        end = min(len(tokens), start + context + 1)
        result.append((tokens[start:end], position - start - 1))
        position = end
    return result


@torch.no_grad()
def score(model, encode, vocab_size: int, context: int, texts: list[str], batch_size: int = 16) -> float:
    """Bits per byte over `texts` (summed NLL over summed bytes). Windows are batched, right-padded: with causal
    attention the padding never reaches a scored position."""
    model.eval()
    pending = [w for text in texts for w in windows(encode(text), context)]
    nll = 0.0
    for i in range(0, len(pending), batch_size):
        batch = pending[i:i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for row, (window, first) in enumerate(batch):
            ids[row, :len(window)] = torch.tensor(window)
            scored[row, first:len(window) - 1] = True
        logits = model(ids[:, :-1]).float()[..., :vocab_size]
        losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll += losses[scored.flatten()].sum().item()
    return nll / math.log(2) / sum(len(text.encode("utf-8")) for text in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=("ours", "nanochat"), required=True)
    parser.add_argument("--texts", required=True, help="JSON {set name: [text, ...]}")
    parser.add_argument("--tag", required=True, help="checkpoint tag under base_checkpoints/")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, encode, vocab_size, context = (load_ours if args.system == "ours" else load_nanochat)(args.tag)
    with open(args.texts, encoding="utf-8") as f:
        sets = json.load(f)
    print(json.dumps({name: score(model, encode, vocab_size, context, texts) for name, texts in sets.items()}))


if __name__ == "__main__":
    main()
