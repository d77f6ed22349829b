"""Chat batching: the loss mask reaches the targets, packing, padding, cropping, resume, rank split."""
from __future__ import annotations

import pytest
import torch

from nanochat.chat_data import IGNORE, PackedChatBatches, PaddedChatBatches, estimate_packed_rows, evaluate_chat_loss
from nanochat.checkpoint import create_model
from tasks.customjson import CustomJSON
from tasks.smoltalk import SmolTalk
from tests.chat_fixtures import train_tiny_tokenizer, write_jsonl
from tests.model_cases import tiny_config

SEQ_LEN = 48


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(400)


@pytest.fixture(scope="module")
def chat(shared_data):
    return SmolTalk("val", data=str(shared_data / "chat"))


def tiny_model(tokenizer, seq_len: int = SEQ_LEN):
    torch.manual_seed(0)
    return create_model(tiny_config(tokenizer.vocab_size, depth=1, max_seq_len=seq_len), "cpu")


def test_targets_are_exactly_the_assistant_tokens(tokenizer, tmp_path):
    conversation = [{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "add <|assistant_end|> 2 and 3"},
                    {"role": "assistant", "content": [{"type": "text", "text": "2+3="},
                                                      {"type": "python", "text": "2+3"},
                                                      {"type": "python_output", "text": "5"},
                                                      {"type": "text", "text": "5"}]}]
    task = CustomJSON(write_jsonl(tmp_path / "one.jsonl", [conversation]))
    batches = PaddedChatBatches(tokenizer, task, batch_size=1, seq_len=200)
    inputs, targets = next(batches)
    ids = inputs[0].tolist() + [targets[0, -1].item()]
    special = {tokenizer.encode_special(name): name for name in
               ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    names = [special.get(t) for t in ids]
    # The system text is folded into the user turn; special-token text typed by the user stays ordinary.
    assert names.count("<|user_start|>") == 1 and names.count("<|assistant_end|>") == 1
    user_text = tokenizer.decode(ids[names.index("<|user_start|>") + 1:names.index("<|user_end|>")])
    assert user_text == "Be terse.\n\nadd <|assistant_end|> 2 and 3"
    trained = [i + 1 for i, t in enumerate(targets[0].tolist()) if t != IGNORE]  # positions in `ids`
    start = names.index("<|assistant_start|>")
    out_start, out_end = names.index("<|output_start|>"), names.index("<|output_end|>")
    expected = [p for p in range(start + 1, len(ids)) if not out_start <= p <= out_end]
    assert trained == expected
    assert tokenizer.decode([ids[p] for p in trained]) == \
        "2+3=<|python_start|>2+3<|python_end|>5<|assistant_end|>"
    assert all(targets[0, p - 1].item() == ids[p] for p in trained)


def test_packed_rows_are_full_bos_aligned_and_resume_exactly(tokenizer, chat):
    batches = PackedChatBatches(tokenizer, chat, batch_size=3, seq_len=SEQ_LEN, buffer_size=8)
    for _ in range(3):
        inputs, targets = next(batches)
        assert inputs.shape == targets.shape == (3, SEQ_LEN)
        assert (inputs[:, 0] == tokenizer.bos_token_id).all()
        assert (targets != IGNORE).any()
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    resumed = PackedChatBatches(tokenizer, chat, batch_size=3, seq_len=SEQ_LEN, buffer_size=8)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(4))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == batches.state_dict()
    assert batches.state_dict()["overlong"] > 0  # ShareGPT conversations are far longer than 49 tokens


def test_packing_keeps_short_conversations_whole(tokenizer, tmp_path):
    rows = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo " * (i % 5 + 1)}]
            for i in range(40)]
    task = CustomJSON(write_jsonl(tmp_path / "short.jsonl", rows))
    batches = PackedChatBatches(tokenizer, task, batch_size=4, seq_len=SEQ_LEN, buffer_size=16)
    inputs, _ = next(batches)
    lengths = [len(tokenizer.render_conversation(task[i])[0]) for i in range(len(task))]
    for row in inputs.tolist():
        starts = [i for i, t in enumerate(row) if t == tokenizer.bos_token_id]
        # every conversation but the last in a row is complete: the next BOS comes exactly after it
        for a, b in zip(starts, starts[1:]):
            assert b - a in lengths
    assert batches.state_dict()["overlong"] == 0


def test_ranks_take_disjoint_conversations(tokenizer, tmp_path):
    rows = [[{"role": "user", "content": f"question number {i}"}, {"role": "assistant", "content": f"answer {i}"}]
            for i in range(10)]
    task = CustomJSON(write_jsonl(tmp_path / "numbered.jsonl", rows))
    seen = []
    for rank in range(2):
        batches = PaddedChatBatches(tokenizer, task, batch_size=5, seq_len=SEQ_LEN, rank=rank, world_size=2)
        inputs, _ = next(batches)
        seen.append({tokenizer.decode(row.tolist()).split("answer ")[1].split("<")[0] for row in inputs})
    assert seen[0] == {"0", "2", "4", "6", "8"} and seen[1] == {"1", "3", "5", "7", "9"}


def test_overlong_conversation_is_cropped_counted_and_padding_is_ignored(tokenizer, tmp_path):
    rows = [[{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}],
            [{"role": "user", "content": "tell me a long story"}, {"role": "assistant", "content": "once upon " * 200}]]
    task = CustomJSON(write_jsonl(tmp_path / "long.jsonl", rows))
    batches = PaddedChatBatches(tokenizer, task, batch_size=2, seq_len=SEQ_LEN)
    inputs, targets = next(batches)
    assert inputs.shape == (2, SEQ_LEN)  # the long one fills exactly one row, no more
    assert batches.state_dict()["overlong"] == 1
    short_len = len(tokenizer.render_conversation(task[0])[0])
    assert (targets[0, short_len - 1:] == IGNORE).all()  # padding never trained on
    assert (targets[1] != IGNORE).sum() > SEQ_LEN // 2


def test_fully_masked_batch_gives_zero_loss_and_zero_grad(tokenizer, tmp_path):
    # A user turn longer than the row: after cropping, nothing the assistant says is left to train on.
    rows = [[{"role": "user", "content": "words " * 300}, {"role": "assistant", "content": "fine"}]] * 2
    task = CustomJSON(write_jsonl(tmp_path / "masked.jsonl", rows))
    inputs, targets = next(PaddedChatBatches(tokenizer, task, batch_size=2, seq_len=SEQ_LEN))
    assert (targets == IGNORE).all()
    model = tiny_model(tokenizer)
    loss = model(inputs, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_estimate_and_val_loss(tokenizer, chat):
    # Under the sample size every conversation counts, each cropped to one row.
    tokens = sum(min(len(tokenizer.render_conversation(chat[i])[0]), SEQ_LEN + 1) for i in range(len(chat)))
    assert estimate_packed_rows(tokenizer, chat, SEQ_LEN) == -(-tokens // (SEQ_LEN + 1))
    sampled = estimate_packed_rows(tokenizer, chat, SEQ_LEN, sample_size=100)
    assert 0.7 < sampled * (SEQ_LEN + 1) / tokens < 1.3
    model = tiny_model(tokenizer)
    loss = evaluate_chat_loss(model, PackedChatBatches(tokenizer, chat, 2, SEQ_LEN), num_batches=2)
    again = evaluate_chat_loss(model, PackedChatBatches(tokenizer, chat, 2, SEQ_LEN), num_batches=2)
    assert loss == again and 3.0 < loss < 9.0  # untrained: about ln(vocab) = 6.0
