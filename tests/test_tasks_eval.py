"""Eval tasks on the shared real data: prompt format, answer extraction, HumanEval in the sandbox, Hub fetch."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval, build_program, extract_code
from tasks.mmlu import MMLU


@pytest.fixture(scope="module")
def eval_dir(shared_data):
    return shared_data / "eval"


def test_arc_conversation_and_letters(eval_dir):
    easy, challenge = ARC("ARC-Easy", data_dir=eval_dir), ARC("ARC-Challenge", data_dir=eval_dir)
    assert (len(easy), len(challenge)) == (2376, 1172)
    example = easy[0]
    user, assistant = example["messages"]
    assert user["content"].startswith("Question: Which statement best explains why photosynthesis")
    assert "\nA. Sunlight is the source of energy for nearly all ecosystems.\n" in user["content"]
    assert assistant["content"] == "A" and example["letters"] == "ABCD"
    assert easy.evaluate(example, " A\n") and not easy.evaluate(example, "B")
    odd = next(challenge[i] for i in range(len(challenge)) if len(challenge[i]["letters"]) != 4)
    assert odd["messages"][1]["content"] in odd["letters"]


def test_mmlu_rows_and_slicing(eval_dir):
    mmlu = MMLU(data_dir=eval_dir, start=10, stop=20)
    assert len(mmlu) == 10
    assert MMLU(data_dir=eval_dir)[10] == mmlu[0]
    assert len(MMLU("dev", data_dir=eval_dir)) == 285


def test_gsm8k_answer_extraction(eval_dir):
    gsm = GSM8K(data_dir=eval_dir)
    example = gsm[0]
    parts = example["messages"][1]["content"]
    assert [p["type"] for p in parts][:3] == ["text", "python", "python_output"]
    assert gsm.evaluate(example, "She makes 9 * 2 = 18 dollars.\n#### 18")
    assert gsm.evaluate(example, "#### 18.0")
    assert not gsm.evaluate(example, "#### 19")
    assert not gsm.evaluate(example, "the answer is 18")  # no final #### line: not extracted
    assert gsm.evaluate(example, "#### 5\nwait, no.\n#### 18")  # the last #### wins


def test_humaneval_code_extraction():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"
    prompt = "from typing import List\n\n\ndef f(x: List[int]) -> int:\n"
    program = build_program(prompt, "```python\ndef f(x):\n    return sum(x)\n```", "def check(c):\n    pass", "f")
    assert program.startswith("from typing import List\n\ndef f(x):") and program.endswith("check(f)\n")
    body_only = build_program(prompt, "    return sum(x)\n", "def check(c):\n    pass", "f")
    assert body_only.startswith(prompt + "    return sum(x)\n")


def test_humaneval_canonical_passes_and_wrong_fails(eval_dir):
    humaneval = HumanEval(data_dir=eval_dir, stop=6)
    for i in range(len(humaneval)):
        example = humaneval[i]
        canonical = example["messages"][1]["content"]
        assert humaneval.evaluate(example, canonical), example["task_id"]
        assert humaneval.evaluate(example, f"```python\n{canonical}```")
    example = humaneval[0]
    assert not humaneval.evaluate(example, "    return not True\n")
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert not humaneval.evaluate(example, wrong)


def test_missing_data_dir_file_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="arc_easy.jsonl.gz not found"):
        ARC(data_dir=tmp_path)


def test_arc_fetched_from_the_hub_once(base_dir, tmp_path, file_server, monkeypatch):
    site = tmp_path / "site"
    repo = "allenai/ai2_arc"
    data = site / "datasets" / repo / "resolve" / "main" / "ARC-Easy"
    data.mkdir(parents=True)
    table = pa.table({"id": ["q1", "q2"], "question": ["Pick b", "Pick 3"],
                      "choices": [{"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                                  {"text": ["1", "2", "3", "4"], "label": ["1", "2", "3", "4"]}],
                      "answerKey": ["B", "3"]})
    pq.write_table(table, data / "test-00000-of-00001.parquet")
    listing = site / "api" / "datasets" / repo / "tree" / "main" / "ARC-Easy"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"type": "file", "path": "ARC-Easy/test-00000-of-00001.parquet"},
                                   {"type": "file", "path": "ARC-Easy/train-00000-of-00001.parquet"}]))
    server = file_server(site)
    monkeypatch.setenv("HF_ENDPOINT", server.url().rstrip("/"))
    arc = ARC("ARC-Easy")
    assert len(arc) == 2
    assert arc[0]["messages"][1]["content"] == "B" and arc[1]["messages"][1]["content"] == "C"
    with gzip.open(base_dir / "eval_data" / "arc_easy.jsonl.gz", "rt") as f:
        assert json.loads(f.readline()) == {"id": "q1", "question": "Pick b", "choices": ["a", "b", "c"], "answer": 1}
    requests = len(server.requests)
    assert len(ARC("ARC-Easy")) == 2
    assert len(server.requests) == requests
