"""CORE scoring on hand-made items whose right answer is known, with models whose logits the test controls."""
import csv
import json
import math
import zipfile

import pytest
import torch
import torch.nn as nn

from nanochat.common import UserError
from nanochat.core_eval import (CoreTask, Sequence, build_pairs, centered, download_bundle, evaluate_core,
                                evaluate_task, fewshot_indices, load_bundle, score_sequences, tokenize_pairs,
                                write_results_csv)
from nanochat.tokenizer import Tokenizer

WORDS = ("red green blue yellow purple orange apple banana cherry grape lemon melon sky grass sun night "
         "moon star river ocean mountain desert forest city the a is of what color fruit answer question").split()


@pytest.fixture(scope="module")
def tokenizer():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    return Tokenizer.train_from_iterator(texts, vocab_size=400)


class FixedLogProbs(nn.Module):
    """Every position predicts the same distribution `probs` over a tiny vocab."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.tensor(probs).log()

    def forward(self, idx):
        return self.log_probs.expand(*idx.shape, -1).clone()


class NGramOracle(nn.Module):
    """Predicts the next token from the last `k` tokens using a table of known continuations; otherwise every
    token is equally likely. Logits depend only on local context, so left-cropped inputs score the same."""

    def __init__(self, vocab_size, table, k=12):
        super().__init__()
        self.vocab_size, self.table, self.k = vocab_size, table, k
        self.calls = []

    @classmethod
    def from_sequences(cls, vocab_size, sequences, k=12):
        table = {}
        for seq in sequences:
            for t in range(seq.start - 1, seq.end - 1):
                table[tuple(seq.ids[max(0, t - k + 1):t + 1])] = seq.ids[t + 1]
        return cls(vocab_size, table, k)

    def forward(self, idx):
        self.calls.append(tuple(idx.shape))
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.table.get(tuple(row[max(0, t - self.k + 1):t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return logits


def mc_task(num_fewshot=0, delimiter="\nAnswer: "):
    rows = [
        {"query": "Question: what color is the sky", "choices": ["green", "blue", "red", "yellow"], "gold": 1},
        {"query": "Question: what color is the grass", "choices": ["green", "purple", "orange"], "gold": 0},
        {"query": "Question: what fruit is yellow", "choices": ["cherry", "grape", "banana", "melon", "apple"],
         "gold": 2},
        {"query": "Question: what is the sun", "choices": ["a river", "a star"], "gold": 1},
    ]
    return CoreTask("mc", "multiple_choice", num_fewshot, delimiter, 0.25, rows)


def schema_task():
    rows = [
        {"context_options": ["the sun is a star so the sun", "the sun is a star so the moon"],
         "continuation": "is bright", "gold": 0},
        {"context_options": ["the river met the ocean so the city", "the river met the ocean so the river"],
         "continuation": "is wet", "gold": 1},
    ]
    return CoreTask("schema", "schema", 0, " ", 0.5, rows)


def lm_task(num_fewshot=0):
    rows = [{"context": "the color of the sky is", "continuation": "blue"},
            {"context": "a fruit that is yellow is the", "continuation": "banana lemon"},
            {"context": "the night sky has the", "continuation": "moon"}]
    return CoreTask("lm", "language_modeling", num_fewshot, " ", 0.0, rows)


def gold_sequences(tokenizer, task, max_seq_len=10_000):
    golds = []
    for i, row in enumerate(task.rows):
        sequences = tokenize_pairs(tokenizer, build_pairs(task, i), i, max_seq_len)
        golds.append(sequences[0] if task.task_type == "language_modeling" else sequences[row["gold"]])
    return golds


def wrong_sequences(tokenizer, task):
    return [tokenize_pairs(tokenizer, build_pairs(task, i), i, 10_000)[(row["gold"] + 1) % 2]
            for i, row in enumerate(task.rows)]


def half_known_oracle(tokenizer, task):
    """Knows the answers to items 0 and 2 only; elsewhere every option ties and the first one wins."""
    golds = gold_sequences(tokenizer, task)
    return NGramOracle.from_sequences(tokenizer.vocab_size, [golds[0], golds[2]])


def test_mean_continuation_loss_by_hand():
    # p = (1/2, 1/4, 1/8, 1/8): the continuation [0, 1] costs (ln 2 + ln 4) / 2 = 1.5 ln 2 nats per token
    model = FixedLogProbs([0.5, 0.25, 0.125, 0.125])
    seqs = [Sequence(0, 0, [3, 3, 0, 1], 2, 4), Sequence(0, 1, [3, 2], 1, 2)]
    (loss_a, greedy_a), (loss_b, greedy_b) = score_sequences(model, seqs, "cpu", batch_size=8)
    assert loss_a == pytest.approx(1.5 * math.log(2))
    assert loss_b == pytest.approx(3 * math.log(2))
    assert not greedy_a and not greedy_b  # argmax is always token 0
    (_, greedy_zero), = score_sequences(model, [Sequence(0, 0, [2, 0, 0], 1, 3)], "cpu", batch_size=1)
    assert greedy_zero


@pytest.mark.parametrize("make_task", [mc_task, schema_task, lm_task])
def test_oracle_for_the_right_answers_scores_one(tokenizer, make_task):
    task = make_task()
    model = NGramOracle.from_sequences(tokenizer.vocab_size, gold_sequences(tokenizer, task))
    assert evaluate_task(model, tokenizer, task, "cpu", max_seq_len=512) == 1.0


@pytest.mark.parametrize("make_task", [mc_task, schema_task])
def test_oracle_for_wrong_answers_scores_zero(tokenizer, make_task):
    task = make_task()
    model = NGramOracle.from_sequences(tokenizer.vocab_size, wrong_sequences(tokenizer, task))
    assert evaluate_task(model, tokenizer, task, "cpu", max_seq_len=512) == 0.0


def test_language_modeling_needs_every_token(tokenizer):
    task = lm_task()
    golds = gold_sequences(tokenizer, task)
    model = NGramOracle.from_sequences(tokenizer.vocab_size, golds)
    # forget how the two-word continuation ends: that item must now fail, the others still pass
    two_word = golds[1]
    last = tuple(two_word.ids[max(0, two_word.end - 2 - model.k + 1):two_word.end - 1])
    del model.table[last]
    assert evaluate_task(model, tokenizer, task, "cpu", max_seq_len=512) == pytest.approx(2 / 3)


def test_ties_go_to_the_first_option(tokenizer):
    # items 1 (gold 0) and 3 (gold 1) are unknown to the oracle: only item 1 counts as right
    task = mc_task()
    assert evaluate_task(half_known_oracle(tokenizer, task), tokenizer, task, "cpu", max_seq_len=512) == 0.75


def test_batched_equals_one_by_one(tokenizer):
    task = mc_task(num_fewshot=2)
    sequences = [s for i in range(len(task.rows)) for s in tokenize_pairs(tokenizer, build_pairs(task, i), i, 512)]
    model = NGramOracle.from_sequences(tokenizer.vocab_size, gold_sequences(tokenizer, task))
    one = score_sequences(model, sequences, "cpu", batch_size=1)
    batched = score_sequences(model, sequences, "cpu", batch_size=7)
    assert [round(loss, 5) for loss, _ in one] == [round(loss, 5) for loss, _ in batched]
    assert [g for _, g in one] == [g for _, g in batched]
    assert max(shape[0] for shape in model.calls) == 7
    model.calls.clear()
    capped = score_sequences(model, sequences, "cpu", batch_size=7, max_batch_tokens=200)
    assert [round(loss, 5) for loss, _ in capped] == [round(loss, 5) for loss, _ in one]
    assert all(rows * width <= 200 or rows == 1 for rows, width in model.calls)
    assert max(rows for rows, _ in model.calls) > 1


def test_long_prompts_are_cropped_from_the_left(tokenizer):
    task = mc_task(num_fewshot=3)
    model = NGramOracle.from_sequences(tokenizer.vocab_size, gold_sequences(tokenizer, task))
    full = tokenize_pairs(tokenizer, build_pairs(task, 0), 0, 10_000)
    cropped = tokenize_pairs(tokenizer, build_pairs(task, 0), 0, 24)
    assert len(full[0].ids) > 24
    for f, c in zip(full, cropped):
        assert c.ids == f.ids[-24:] and c.end == 24
        assert c.ids[c.start:c.end] == f.ids[f.start:f.end]
    assert evaluate_task(model, tokenizer, task, "cpu", max_seq_len=24) == 1.0
    assert max(shape[1] for shape in model.calls) <= 24


def test_continuation_span_is_the_continuation_text(tokenizer):
    for task in (mc_task(), schema_task(), lm_task()):
        for i in range(len(task.rows)):
            for (context, continuation), seq in zip(build_pairs(task, i), tokenize_pairs(
                    tokenizer, build_pairs(task, i), i, 10_000)):
                assert tokenizer.decode(seq.ids[seq.start:seq.end]).strip() == continuation
                assert tokenizer.decode(seq.ids[1:seq.start]).rstrip() == context.rstrip()


def test_fewshot_is_fixed_and_excludes_the_item():
    draws = [fewshot_indices(50, index, 10, seed=1234) for index in range(50)]
    assert draws == [fewshot_indices(50, index, 10, seed=1234) for index in range(50)]
    assert all(index not in drawn and len(set(drawn)) == 10 for index, drawn in enumerate(draws))
    assert len({tuple(d) for d in draws}) > 1
    assert fewshot_indices(3, 0, 10, seed=1) in ([1, 2], [2, 1])
    task = lm_task(num_fewshot=2)
    prompt = build_pairs(task, 0)[0][0]
    assert prompt.endswith("the color of the sky is ") and prompt.count("\n\n") == 2
    assert "blue" not in prompt


def test_centered_and_core_mean(tokenizer):
    assert centered(0.25, 0.25) == 0.0 and centered(1.0, 0.25) == 1.0
    assert centered(0.5, 0.62) == pytest.approx(-0.12 / 0.38)
    tasks = [mc_task(), lm_task()]
    model = NGramOracle.from_sequences(tokenizer.vocab_size, gold_sequences(tokenizer, tasks[0]))
    results = evaluate_core(model, tokenizer, tasks, "cpu", max_seq_len=512, progress=False)
    assert [r["accuracy"] for r in results["tasks"]] == [1.0, 0.0]
    assert results["core"] == pytest.approx((1.0 + 0.0) / 2)


def test_results_csv(tmp_path):
    results = {"tasks": [{"label": "copa", "accuracy": 0.75, "centered": 0.5}], "core": 0.5}
    path = write_results_csv(results, tmp_path / "out" / "core.csv")
    rows = list(csv.reader(path.open()))
    assert rows == [["Task", "Accuracy", "Centered"], ["copa", "0.750000", "0.500000"], ["CORE", "", "0.500000"]]


def test_load_shared_bundle(shared_data):
    tasks = load_bundle(shared_data / "core")
    assert len(tasks) == 20
    by_label = {t.label: t for t in tasks}
    assert by_label["boolq"].baseline == pytest.approx(0.62)
    assert by_label["bigbench_language_identification"].baseline == pytest.approx(0.091)
    assert by_label["winogrande"].task_type == "schema" and by_label["jeopardy"].num_fewshot == 10
    assert by_label["jeopardy"].delimiter == "\nAnswer: "
    assert len(by_label["copa"].rows) == 100


def test_missing_bundle_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="--download_only"):
        load_bundle(tmp_path)


def write_tiny_bundle(root):
    (root / "eval_data").mkdir(parents=True)
    (root / "core.yaml").write_text("icl_tasks:\n- label: lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [0]\n"
                                    "  icl_task_type: language_modeling\n  continuation_delimiter: \" \"\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nlm,0.0\n")
    (root / "eval_data" / "lm.jsonl").write_text(json.dumps({"context": "a", "continuation": "b"}) + "\n")


def test_download_bundle_from_a_loopback_server(tmp_path, file_server, base_dir):
    write_tiny_bundle(tmp_path / "src" / "eval_bundle")
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as archive:
        for path in (tmp_path / "src").rglob("*"):
            archive.write(path, path.relative_to(tmp_path / "src"))
    server = file_server(served)
    dest = download_bundle(url=server.url("eval_bundle.zip"))
    assert dest == base_dir / "eval_bundle"
    assert [t.label for t in load_bundle()] == ["lm"]
    assert not list(base_dir.glob(".*tmp")) and not (base_dir / "eval_bundle.zip").exists()


def test_download_refuses_a_half_bundle(base_dir):
    (base_dir / "eval_bundle").mkdir()
    with pytest.raises(UserError, match="has no core.yaml; remove it"):
        download_bundle(url="http://127.0.0.1:9/never-fetched.zip")
