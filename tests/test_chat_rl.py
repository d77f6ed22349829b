"""chat_rl: the policy-gradient loss, resumable rollouts, and the mid -> sft -> rl chain on shared data."""
from __future__ import annotations

import json

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, complete_steps, create_model, load_checkpoint
from nanochat.engine import SamplingParams
from nanochat.rl import RolloutBatches, pass_at_k, policy_gradient_loss
from scripts import chat_rl, chat_sft, mid_train
from tasks.arithmetic import Arithmetic
from tests.chat_fixtures import make_base_checkpoint, one_thread, train_tiny_tokenizer  # noqa: F401
from tests.model_cases import tiny_config
from tests.test_tasks_chat import WORDS
from tests.training_fixtures import read_losses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(400)


def tiny_model(tokenizer):
    torch.manual_seed(0)
    return create_model(tiny_config(tokenizer.vocab_size, depth=1, max_seq_len=96), "cpu")


def test_policy_gradient_step_favours_positive_advantage():
    torch.manual_seed(0)
    model = create_model(tiny_config(64, depth=1, max_seq_len=8), "cpu")
    inputs = torch.tensor([[1, 2, 3], [1, 2, 3]])
    targets = torch.tensor([[-1, 5, 6], [-1, 7, 8]])  # two sampled answers to the same prompt
    advantages = torch.tensor([0.5, -0.5])

    def log_probs():
        with torch.no_grad():
            return -model(inputs, targets, loss_reduction="none").sum(dim=1)

    before = log_probs()
    loss = policy_gradient_loss(model, (inputs, targets, advantages))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = log_probs()
    assert after[0] > before[0] and after[1] < before[1]
    # No sampled tokens, or equal rewards: a zero loss and no gradient, never NaN.
    model.zero_grad()
    nothing = policy_gradient_loss(model, (inputs, torch.full_like(targets, -1), advantages))
    equal = policy_gradient_loss(model, (inputs, targets, torch.zeros(2)))
    (nothing + equal).backward()
    assert nothing.item() == 0.0 and equal.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_rollouts_mask_the_prompt_and_resume_exactly(tokenizer):
    model = tiny_model(tokenizer)
    task = Arithmetic(20)
    sampling = SamplingParams(max_tokens=12, temperature=1.0, seed=5, num_samples=3)
    rollouts = RolloutBatches(model, tokenizer, task, sampling, device=torch.device("cpu"))
    inputs, targets, advantages = next(rollouts)
    prompt = tokenizer.render_for_completion(task[0])
    assert inputs.shape[0] == 3 and torch.equal(inputs[0, :len(prompt)], torch.tensor(prompt))
    assert (targets[:, :len(prompt) - 1] == -1).all() and (targets[:, len(prompt) - 1:] != -1).any()
    assert advantages.shape == (3,) and abs(advantages.sum().item()) < 1e-6
    state = rollouts.state_dict()
    expected = next(rollouts)
    resumed = RolloutBatches(model, tokenizer, task, sampling, device=torch.device("cpu"))
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, next(resumed)))
    metrics = pass_at_k(model, tokenizer, Arithmetic(4, split="val"), 4,
                        SamplingParams(max_tokens=8, temperature=1.0, seed=0, num_samples=2))
    assert set(metrics) == {"pass@1", "pass@2"} and metrics["pass@1"] <= metrics["pass@2"]


@pytest.mark.slow
def test_mid_sft_rl_chain_on_shared_data(base_dir, shared_data):
    make_base_checkpoint(base_dir, train_tiny_tokenizer(400), seq_len=64)
    words = base_dir / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    data = ["--chat_data", str(shared_data / "chat"), "--words_file", str(words), "--eval_batches", "1",
            "--chat_examples", "40"]
    mid_train.main(data + ["--device_batch_size", "2", "--total_batch_size", "128", "--num_iterations", "2",
                           "--eval_every", "-1"])
    chat_sft.main(data + ["--device_batch_size", "2", "--target_examples_per_step", "4", "--num_iterations", "2",
                          "--chat_eval_every", "2", "--chat_eval_max", "2", "--eval_every", "2"])
    rl = ["--task", "arithmetic", "--train_examples", "20", "--num_samples", "2", "--examples_per_step", "2",
          "--max_new_tokens", "8", "--eval_examples", "2", "--eval_samples", "2", "--num_iterations", "2",
          "--eval_every", "1", "--save_every", "1", "--keep_last", "-1"]
    chat_rl.main(rl)
    out = checkpoint_dir("rl", "d2")
    assert complete_steps(out) == [1, 2]
    losses = read_losses(out / "train_log.jsonl")
    chat_rl.main(rl + ["--resume_from_step", "1"])
    assert read_losses(out / "train_log.jsonl") == losses  # on-policy sampling resumes exactly too
    sft_meta = load_checkpoint(checkpoint_dir("sft", "d2"), 2, "cpu", load_optimizer=False).meta
    assert sft_meta["source"] == "mid" and "SimpleSpelling_acc" in sft_meta and "val_loss" in sft_meta
    rl_meta = load_checkpoint(out, 2, "cpu", load_optimizer=False).meta
    assert rl_meta["source"] == "sft" and {"pass@1", "pass@2", "train_reward"} <= set(rl_meta)
    sections = {p.stem for p in (base_dir / "report").glob("*.json")}
    assert {"midtraining", "chat-sft", "chat-rl"} <= sections
    assert json.loads((base_dir / "report" / "chat-rl.json").read_text())


def test_gsm8k_task_for_rl_uses_train_split_and_scores_the_final_answer(base_dir, shared_data):
    """GSM8K train comes from chat_data/ (a few real rows stand in for the fetched split), val from eval_data/."""
    import gzip

    from nanochat.flags import parse_flags

    with gzip.open(shared_data / "eval" / "gsm8k.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = handle.readlines()[:6]
    for directory, name in (("chat_data", "gsm8k_train"), ("eval_data", "gsm8k")):
        (base_dir / directory).mkdir(exist_ok=True)
        with gzip.open(base_dir / directory / f"{name}.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(rows)
    flags = parse_flags(chat_rl.RLFlags, ["--train_examples", "4"])
    train, val = chat_rl.rl_task(flags, "train"), chat_rl.rl_task(flags, "val")
    assert len(train) == 4 and len(val) == 6
    example = train[0]
    parts = example["messages"][-1]["content"]
    assert {"type": "python", "text": "16-3-4"} in parts
    assert train.evaluate(example, "She makes 9 * 2 = 18 dollars.\n#### 18")
    assert not train.evaluate(example, "#### 17")
