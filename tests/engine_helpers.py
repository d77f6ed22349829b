"""Real tiny components for the engine, base_complete and chat_cli tests: a tokenizer trained on a few dozen
strings, random depth-1/2 GPTs, a GPT with known logits, and a saved checkpoint in a test base dir."""
from __future__ import annotations

from pathlib import Path

import torch

from nanochat.checkpoint import CHECKPOINT_DIRS, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 6 times 7? It is 42.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "the cat sat on the mat; the dog sat on the log.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 100 1000",
    "hello world, hello there, hello again",
    "A strawberry has three r letters in it.",
    "def add(a, b): return a + b",
] * 4


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    return Tokenizer.train_from_iterator(TRAINING_TEXTS, vocab_size)


def random_gpt(vocab_size: int, num_kv_heads: int = 2, depth: int = 2, max_seq_len: int = 128,
               seed: int = 0) -> GPT:
    """A random GPT whose blocks do real work: zero-initialised projections are perturbed."""
    torch.manual_seed(seed)
    config = GPTConfig(depth=depth, model_dim=32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8,
                       max_seq_len=max_seq_len, vocab_size=vocab_size)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
        model.lm_head.weight.normal_(std=0.3)
    return model.eval()


def known_logits_gpt(vocab_size: int, logits_by_token: dict[int, float], max_seq_len: int = 64) -> GPT:
    """A GPT whose next-token logits are the same at every position: `logits_by_token` (pre soft-cap), 0 else.

    Every token embeds to the same vector and each block is the identity (zero output projections), so the final
    hidden state is all ones after RMSNorm; lm_head row j = logit_j / dim makes logit j exactly logit_j.
    """
    config = GPTConfig(depth=1, model_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=max_seq_len,
                       vocab_size=vocab_size)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.wte.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for token, logit in logits_by_token.items():
            model.lm_head.weight[token].fill_(logit / config.model_dim)
    return model.eval()


def save_tiny_checkpoint(base_dir: Path, source: str = "base", tag: str = "d1", step: int = 5,
                         max_seq_len: int = 128) -> tuple[GPT, Tokenizer]:
    """A tokenizer in base_dir/tokenizer and a random depth-1 model saved where `load_model(source)` finds it."""
    tokenizer = train_tokenizer()
    tokenizer.save(base_dir / "tokenizer")
    model = random_gpt(tokenizer.vocab_size, depth=1, max_seq_len=max_seq_len)
    save_checkpoint(base_dir / CHECKPOINT_DIRS[source] / tag, step, model, optimizers=[], meta={},
                    rank_state={}, keep_last=-1)
    return model, tokenizer
