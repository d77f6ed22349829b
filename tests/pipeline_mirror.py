"""A loopback mirror of everything speedrun.sh downloads, built from ../shared/data, for the pipeline tests.

    site = build_mirror(tmp_path / "site", shared_data)
    with FileServer(site) as server:
        env = mirror_env(server.url())      # NANOCHAT_EVAL_BUNDLE_URL, HF_ENDPOINT

Layout served (paths as the real sources use them):
- `datasets/<repo>/resolve/main/shard_{index:05d}.parquet` for each pretraining source (ClimbMix, FineWeb-Edu):
  shared shards 0.. under train indexes 0.., the shared validation shard (the last one) under the source's
  validation index, the index `python -m nanochat.dataset --source NAME` asks for last;
- `eval_bundle.zip`: the shared `core/` folder under a top-level `eval_bundle/`, as the public zip has it;
- the Hub's `api/datasets/<repo>/tree/main/<subdir>` listings and `datasets/<repo>/resolve/main/<path>` parquet
  files for every dataset the chat stages and chat_eval fetch, converted from the shared jsonl rows into each
  Hub dataset's own column schema and cut to a few dozen rows so the stages stay quick.
"""
from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.download import PRETRAIN_SOURCES

CHAT_ROWS = {"train": 240, "test": 40}
EVAL_ROWS = 40
LETTERS = "ABCDEFGHIJ"


def read_jsonl_gz(path: Path, limit: int) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if len(rows) == limit:
                break
            rows.append(json.loads(line))
    return rows


def write_hub_files(site: Path, repo: str, subdir: str, tables: dict[str, pa.Table]) -> None:
    """One parquet file per split under resolve/main/<subdir>/ plus the tree listing that names them."""
    data_dir = site / "datasets" / repo / "resolve" / "main" / subdir
    data_dir.mkdir(parents=True, exist_ok=True)
    listing = []
    for split, table in tables.items():
        name = f"{split}-00000-of-00001.parquet"
        pq.write_table(table, data_dir / name)
        listing.append({"type": "file", "path": f"{subdir}/{name}", "size": (data_dir / name).stat().st_size})
    listing_path = site / "api" / "datasets" / repo / "tree" / "main" / subdir
    listing_path.parent.mkdir(parents=True, exist_ok=True)
    listing_path.write_text(json.dumps(listing), encoding="utf-8")


def smoltalk_table(rows: list[dict]) -> pa.Table:
    return pa.table({"messages": [[{"content": m["content"], "role": m["role"]} for m in row["messages"]]
                                  for row in rows]})


def mmlu_record(row: dict) -> dict:
    return {"question": row["question"], "subject": row.get("subject", ""), "choices": row["choices"],
            "answer": row["answer"]}


def arc_table(rows: list[dict]) -> pa.Table:
    return pa.table({"id": [r["id"] for r in rows], "question": [r["question"] for r in rows],
                     "choices": [{"text": r["choices"], "label": list(LETTERS[:len(r["choices"])])} for r in rows],
                     "answerKey": [LETTERS[r["answer"]] for r in rows]})


def build_hub(site: Path, shared: Path) -> None:
    chat = {split: read_jsonl_gz(shared / "chat" / f"{name}.jsonl.gz", CHAT_ROWS[split])
            for split, name in (("train", "train"), ("test", "val"))}
    write_hub_files(site, "HuggingFaceTB/smol-smoltalk", "data",
                    {split: smoltalk_table(rows) for split, rows in chat.items()})

    mmlu = read_jsonl_gz(shared / "eval" / "mmlu.jsonl.gz", EVAL_ROWS)
    mmlu_dev = read_jsonl_gz(shared / "eval" / "mmlu_dev.jsonl.gz", EVAL_ROWS)
    write_hub_files(site, "cais/mmlu", "all", {"test": pa.Table.from_pylist([mmlu_record(r) for r in mmlu]),
                                               "dev": pa.Table.from_pylist([mmlu_record(r) for r in mmlu_dev])})
    # auxiliary_train nests each row under a `train` struct column, as the Hub copy does
    write_hub_files(site, "cais/mmlu", "auxiliary_train",
                    {"train": pa.table({"train": [mmlu_record(r) for r in mmlu_dev]})})

    gsm8k = read_jsonl_gz(shared / "eval" / "gsm8k.jsonl.gz", 2 * EVAL_ROWS)
    write_hub_files(site, "openai/gsm8k", "main", {
        split: pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
        for split, rows in (("test", gsm8k[:EVAL_ROWS]), ("train", gsm8k[EVAL_ROWS:]))})

    for subset, name in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        rows = read_jsonl_gz(shared / "eval" / f"{name}.jsonl.gz", 2 * EVAL_ROWS)
        write_hub_files(site, "allenai/ai2_arc", subset,
                        {"test": arc_table(rows[:EVAL_ROWS]), "train": arc_table(rows[EVAL_ROWS:])})

    humaneval = read_jsonl_gz(shared / "eval" / "humaneval.jsonl.gz", EVAL_ROWS)
    write_hub_files(site, "openai/openai_humaneval", "openai_humaneval", {"test": pa.Table.from_pylist(humaneval)})


def build_bundle_zip(path: Path, core: Path) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(core.rglob("*")):
            if file.is_file():
                archive.write(file, Path("eval_bundle") / file.relative_to(core))


def build_shards(site: Path, pretrain: Path) -> None:
    """Per source, train shards keep their indexes; the shared validation shard is served at the source's
    validation index."""
    shards = sorted(pretrain.glob("shard_*.parquet"))
    for source in PRETRAIN_SOURCES.values():
        directory = site / "datasets" / source.repo / "resolve" / "main"
        directory.mkdir(parents=True, exist_ok=True)
        for index, shard in enumerate(shards[:-1]):
            (directory / f"shard_{index:05d}.parquet").symlink_to(shard)
        (directory / f"shard_{source.val_index:05d}.parquet").symlink_to(shards[-1])


def build_mirror(site: Path, shared: Path) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    build_shards(site, shared / "pretrain")
    build_bundle_zip(site / "eval_bundle.zip", shared / "core")
    build_hub(site, shared)
    return site


def mirror_env(url: str) -> dict[str, str]:
    """The environment that points every download at the mirror served from `url` (ending in /)."""
    return {"NANOCHAT_EVAL_BUNDLE_URL": url + "eval_bundle.zip",
            "HF_ENDPOINT": url.rstrip("/")}
