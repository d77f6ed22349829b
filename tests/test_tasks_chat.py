"""Chat-training tasks: tool-use conversion, CustomJSON validation, SmolTalk sources, synthetic tasks."""
from __future__ import annotations

import gzip
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.calculator import calculate
from nanochat.common import UserError
import tasks.spellingbee as spellingbee
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON, conversation_problem, read_conversations
from tasks.identity import Identity
from tasks.smoltalk import SMOLTALK_REPO, SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee, split_words, words_from_texts
from tasks.tooluse import answers_match, extract_answer, tool_parts

WORDS = ["apple", "banana", "cherry", "strawberry", "grape", "melon", "lemon", "peach", "plum", "kiwi", "mango",
         "orange", "papaya", "quince", "raisin", "tomato", "walnut", "almond", "carrot", "pepper"]


# ---------------------------------------------------------------------------------------------------------
# GSM8K annotations -> tool parts

def test_tool_parts_on_real_gsm8k_rows(shared_data):
    with gzip.open(shared_data / "eval" / "gsm8k.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(50), handle)]
    for row in rows:
        parts = tool_parts(row["answer"])
        pythons = [p["text"] for p in parts if p["type"] == "python"]
        outputs = [p["text"] for p in parts if p["type"] == "python_output"]
        annotations = re.findall(r"<<([^=]*)=([^>]*)>>", row["answer"])
        assert pythons == [a.strip() for a, _ in annotations]
        assert outputs == [b.strip() for _, b in annotations]
        # Text parts are exactly the solution with the annotations cut out.
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        assert text == re.sub(r"<<[^>]*>>", "", row["answer"])
        assert all(p["text"] for p in parts)
    first = tool_parts(rows[0]["answer"])
    assert first[:3] == [{"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
                         {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"}]


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_answer("#### 1,250") == "1250"
    assert extract_answer("#### -3.5 then #### 12") == "12"
    assert extract_answer("the answer is 7") is None
    assert answers_match("#### 7.0", "#### 7") and not answers_match("#### 8", "#### 7")


# ---------------------------------------------------------------------------------------------------------
# CustomJSON

def test_custom_json_accepts_both_line_forms_and_gzip(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "who made you?"},
                          {"role": "assistant", "content": "The nanochat project."}], "source": "identity"},
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "text", "text": "2+2="}, {"type": "python", "text": "2+2"},
                                               {"type": "python_output", "text": "4"}]}]]
    path = tmp_path / "identity.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    task = CustomJSON(path)
    assert len(task) == 2
    assert task[0] == {"messages": rows[0]["messages"]}  # extra keys dropped
    assert task[1] == {"messages": rows[1]}


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('{"text": "hello"}', 'expected an object with a "messages" list'),
    ('[{"role": "user", "content": "hi"}]', "at least one user and one assistant"),
    ('[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]',
     "message 0 has role 'assistant', expected 'user'"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]',
     "message 1 (assistant): content is empty"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]',
     "the last message must be from the assistant"),
    ('[{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "b"}]',
     "only assistant content may be a list of parts"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "1"}]}]',
     "bad part"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_custom_json_bad_line_names_line_and_problem(tmp_path, line, problem):
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    path = tmp_path / "mine.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        CustomJSON(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message


def test_custom_json_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_conversations(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------------
# SmolTalk: local files and the Hub (over a loopback server)

def test_smoltalk_reads_shared_chat_dir(shared_data):
    val = SmolTalk("val", data=str(shared_data / "chat"))
    assert len(val) == 360
    assert all(set(val[i]) == {"messages"} for i in range(len(val)))
    assert SmolTalk("val", data=str(shared_data / "chat"), stop=10).num_examples() == 360
    assert len(SmolTalk("val", data=str(shared_data / "chat"), stop=10)) == 10


def test_smoltalk_demo_without_data_says_how_to_build(base_dir):
    (base_dir / "chat_data" / "demo").mkdir(parents=True)
    with pytest.raises(UserError, match="nanochat.dataset --source demo"):
        SmolTalk("train", data="demo")


def test_smoltalk_hub_download_is_cached_and_skips_bad_rows(base_dir, tmp_path, file_server, monkeypatch):
    site = tmp_path / "site"
    data = site / "datasets" / SMOLTALK_REPO / "resolve" / "main" / "data"
    data.mkdir(parents=True)
    good = [{"role": "user", "content": f"question {i}"} if j == 0 else {"role": "assistant", "content": f"answer {i}"}
            for i in range(5) for j in range(2)]
    messages = [good[i:i + 2] for i in range(0, 10, 2)]
    messages.append([{"role": "assistant", "content": "no user turn"}])  # not in chat format: skipped
    pq.write_table(pa.table({"messages": messages, "source": ["x"] * 6}), data / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"messages": messages[:2], "source": ["x"] * 2}), data / "train-00000-of-00001.parquet")
    listing = site / "api" / "datasets" / SMOLTALK_REPO / "tree" / "main" / "data"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"type": "file", "path": "data/train-00000-of-00001.parquet"},
                                   {"type": "file", "path": "data/test-00000-of-00001.parquet"}]))
    server = file_server(site)
    server.add_faults(f"datasets/{SMOLTALK_REPO}/resolve/main/data/test-00000-of-00001.parquet", "503")
    monkeypatch.setenv("HF_ENDPOINT", server.url().rstrip("/"))
    val = SmolTalk("val", data="hub")
    assert len(val) == 5
    assert val[3] == {"messages": [{"role": "user", "content": "question 3"},
                                   {"role": "assistant", "content": "answer 3"}]}
    assert (base_dir / "chat_data" / "HuggingFaceTB__smol-smoltalk" / "test-00000-of-00001.parquet").is_file()
    requests_before = len(server.requests)
    assert len(SmolTalk("val", data="hub")) == 5
    assert len(server.requests) == requests_before  # cached: no network on the second load


# ---------------------------------------------------------------------------------------------------------
# Synthetic tasks

def test_words_from_real_pretraining_text(shared_data):
    batch = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet").read_row_group(0).column("text")
    words = words_from_texts(batch.to_pylist()[:200], min_count=2)
    assert len(words) > 200 and "the" in words and words == sorted(words)
    assert all(re.fullmatch(r"[a-z]{3,12}", w) for w in words)


def test_word_list_falls_back_to_shards_when_several_sources_are_present(shared_data, base_dir, monkeypatch):
    monkeypatch.setattr(spellingbee, "SYSTEM_WORDLIST", base_dir / "no_such_wordlist")
    for source, shards in (("climbmix", ("00000", "00012")), ("fineweb", ("00001", "00012"))):
        (base_dir / "base_data" / source).mkdir(parents=True)
        for index, shard in enumerate(shards):
            shutil.copy(shared_data / "pretrain" / f"shard_{shard}.parquet",
                        base_dir / "base_data" / source / f"shard_{index:05d}.parquet")
    words = spellingbee.load_words()
    assert len(words) > 200 and "the" in words
    assert (base_dir / "chat_data" / "words.txt").read_text().split() == words


def test_spelling_word_splits_are_disjoint():
    train, val = split_words(WORDS, "train"), split_words(WORDS, "val")
    assert not set(train) & set(val) and set(train) | set(val) == set(WORDS) and len(val) == 2


def tool_calls(conversation):
    content = conversation["messages"][-1]["content"]
    parts = content if isinstance(content, list) else []
    return [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]


def test_spelling_bee_answers_are_right_and_evaluate_checks_them():
    task = SpellingBee(200, words=WORDS)
    with_tool = 0
    for i in range(len(task)):
        example = task[i]
        prompt = example["messages"][0]["content"]
        word = next(w for w in WORDS if w in prompt.split("'") or re.search(rf"\b{w}\b", prompt))
        reply = example["messages"][-1]["content"]
        text = "".join(p["text"] for p in reply)
        assert f"Spelling out {word}: {','.join(word)}" in text
        assert task.evaluate(example, text)
        assert not task.evaluate(example, text.replace(f"#### {example['answer']}", f"#### {example['answer'] + 1}"))
        for expression, output in tool_calls(example):
            assert calculate(expression) == output  # the engine's calculator gives what training shows
            with_tool += 1
    assert 50 < with_tool < 150
    assert task[7] == SpellingBee(200, words=WORDS)[7]  # reproducible from the index
    assert {task[i]["answer"] for i in range(len(task))} >= {0, 1, 2}


def test_simple_spelling_exact_match():
    task = SimpleSpelling(20, split="val", words=WORDS)
    example = task[0]
    word = example["messages"][-1]["content"].replace(",", "")
    assert word in split_words(WORDS, "val")
    assert task.evaluate(example, ",".join(word)) and task.evaluate(example, f" {','.join(word)}\n")
    assert not task.evaluate(example, ",".join(word[:-1]))


def test_arithmetic_problems_match_the_calculator_and_splits_differ():
    train, val = Arithmetic(100), Arithmetic(100, split="val")
    for i in range(len(train)):
        example = train[i]
        calls = tool_calls(example)
        assert calls and all(calculate(e) == out for e, out in calls)
        final = example["messages"][-1]["content"][-1]["text"]
        assert train.evaluate(example, final) and not train.evaluate(example, "#### -1")
    assert [train[i] for i in range(10)] != [val[i] for i in range(10)]


def test_identity_conversations_are_valid_and_varied():
    task = Identity(200)
    assert all(conversation_problem(task[i]) is None for i in range(len(task)))
    assert len({task[i]["messages"][0]["content"] for i in range(len(task))}) > 50
    assert any(len(task[i]["messages"]) == 4 for i in range(len(task)))
    assert "nanochat" in task[0]["messages"][1]["content"] or "nanochat" in task[1]["messages"][1]["content"]


def test_mixture_of_chat_tasks_is_deterministic(shared_data):
    parts = [SmolTalk("val", data=str(shared_data / "chat"), stop=30), Arithmetic(20), SpellingBee(10, words=WORDS)]
    mixture = TaskMixture(parts, seed=3)
    assert len(mixture) == 60
    assert [mixture[i] for i in range(60)] == [TaskMixture(parts, seed=3)[i] for i in range(60)]
