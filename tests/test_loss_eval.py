"""Bits per byte: by hand on known distributions, against a direct computation on a real tiny GPT, and
summed over two torchrun ranks."""
import math
import subprocess
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.core_eval import evaluate_task
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer
from tests.model_cases import tiny_config
from tests.training_fixtures import REPO, subprocess_env, torchrun_cmd


class FixedDistribution(nn.Module):
    """Predicts the same next-token distribution everywhere; losses follow GPT's API (0 where target is -1)."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.tensor(probs, dtype=torch.float64).log()

    def forward(self, idx, targets, loss_reduction="none"):
        losses = -self.log_probs[targets.clamp(min=0)]
        return torch.where(targets >= 0, losses, torch.zeros_like(losses))


def test_bpb_by_hand():
    # p = (1/2, 1/4, 1/8, 1/8) -> 1, 2, 3, 3 bits; bytes per token = 1, 2, 3, 3: exactly one bit per byte
    model = FixedDistribution([0.5, 0.25, 0.125, 0.125])
    token_bytes = torch.tensor([1, 2, 3, 3])
    batch = (torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 2, 3]]))
    assert evaluate_bpb(model, iter([batch]), 1, token_bytes) == pytest.approx(1.0)


def test_special_and_ignored_tokens_count_in_neither_sum():
    # uniform over 4: 2 bits per token. Token 3 is special (0 bytes), -1 is ignored: only tokens 0 and 1 count,
    # 4 bits over 1 + 2 bytes
    model = FixedDistribution([0.25] * 4)
    token_bytes = torch.tensor([1, 2, 3, 0])
    batches = iter([(None, torch.tensor([[0, 1, 3, -1]])), (None, torch.tensor([[-1, 3, 3, 3]]))])
    assert evaluate_bpb(model, batches, 2, token_bytes) == pytest.approx(4 / 3)


def test_bpb_matches_a_direct_computation_on_a_real_model():
    texts = ["the cat sat on the mat", "a dog ran in the park", "bits per byte compare tokenizers"] * 10
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, depth=1, max_seq_len=16))
    model.init_weights()
    model.eval()
    ids = [t for text in texts[:6] for t in tokenizer.encode(text, prepend=tokenizer.bos_token_id)]
    rows = torch.tensor(ids[:2 * 17]).view(2, 17)
    batches = [(rows[:1, :-1], rows[:1, 1:]), (rows[1:, :-1], rows[1:, 1:])]
    token_bytes = tokenizer.token_bytes()
    nats = num_bytes = 0.0
    for inputs, targets in batches:
        log_probs = F.log_softmax(model(inputs), dim=-1)
        for t, target in enumerate(targets[0].tolist()):
            if target != tokenizer.bos_token_id:  # BOS is special: no bytes, not counted
                nats -= log_probs[0, t, target].item()
                num_bytes += len(tokenizer.decode([target]).encode("utf-8"))
    assert tokenizer.bos_token_id in rows.tolist()[0][1:] + rows.tolist()[1]
    expected = nats / (math.log(2) * num_bytes)
    assert evaluate_bpb(model, iter(batches), 2, token_bytes) == pytest.approx(expected, rel=1e-5)


WORKER = textwrap.dedent("""
    import sys
    import torch
    from nanochat.common import cleanup_distributed, init_distributed
    from nanochat.core_eval import evaluate_task
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import Tokenizer
    from tests.test_core_eval import half_known_oracle, mc_task
    from tests.test_loss_eval import FixedDistribution

    dist = init_distributed("cpu")
    model = FixedDistribution([0.5, 0.25, 0.125, 0.125])
    # rank 0 scores token 0 (1 bit, 1 byte), rank 1 token 1 (2 bits, 4 bytes)
    token_bytes = torch.tensor([1, 4, 3, 3])
    target = 0 if dist.rank == 0 else 1
    batches = iter([(None, torch.full((1, 4), target))])
    bpb = evaluate_bpb(model, batches, 1, token_bytes)
    tokenizer = Tokenizer.load(sys.argv[1])
    task = mc_task()
    accuracy = evaluate_task(half_known_oracle(tokenizer, task), tokenizer, task, "cpu", 512,
                             rank=dist.rank, world_size=dist.world_size)
    print(f"rank {dist.rank} BPB {bpb:.6f} CORE-ACC {accuracy:.6f}")
    cleanup_distributed()
""")


@pytest.mark.slow
def test_bpb_and_core_sum_over_ranks(tmp_path):
    # bpb, rank 0: 4 tokens × 1 bit over 4 bytes; rank 1: 4 tokens × 2 bits over 16 bytes.
    # Summed: 12 bits / 20 bytes = 0.6 (a mean of the per-rank values would give (1 + 0.5) / 2 = 0.75).
    # CORE: every rank must report the accuracy over all items, as one process computes it.
    from tests.test_core_eval import WORDS, half_known_oracle, mc_task

    tokenizer = Tokenizer.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3,
                                              vocab_size=400)
    tokenizer.save(tmp_path / "tokenizer")
    task = mc_task()
    expected = evaluate_task(half_known_oracle(tokenizer, task), tokenizer, task, "cpu", 512)
    per_rank = [evaluate_task(half_known_oracle(tokenizer, task), tokenizer, task, "cpu", 512, rank=r, world_size=2)
                for r in range(2)]
    assert per_rank[0] != expected or per_rank[1] != expected  # without the all-reduce the ranks would disagree
    script = tmp_path / "eval_worker.py"
    script.write_text(WORKER)
    result = subprocess.run(torchrun_cmd(2, str(script), str(tmp_path / "tokenizer")), cwd=REPO,
                            env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in range(2):
        assert f"rank {rank} BPB 0.600000 CORE-ACC {expected:.6f}" in result.stdout
