"""Conversations from a jsonl(.gz) file, validated line by line: a user's own data (e.g. identity chats).

Each line is one conversation, either `{"messages": [...]}` (DESIGN.md's format, extra keys ignored) or just
the messages list. Messages alternate user/assistant starting with user, after at most one leading system
message, and end with an assistant turn. Content is a non-empty string; assistant content may instead be a list
of parts `{"type": "text"|"python"|"python_output", "text": str}`. A bad line stops loading with its file,
line number and what is wrong.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from nanochat.common import UserError
from tasks.common import Task

PART_TYPES = ("text", "python", "python_output")


def conversation_problem(row: Any) -> str | None:
    """What is wrong with one conversation, or None when it is valid."""
    messages = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(messages, list):
        return 'expected an object with a "messages" list (or a list of messages)'
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        messages = messages[1:]
    if len(messages) < 2:
        return "a conversation needs at least one user and one assistant message"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            return f"message {i} has role {message.get('role')!r}, expected {expected!r} (roles must alternate)"
        problem = content_problem(message.get("content"), expected)
        if problem:
            return f"message {i} ({expected}): {problem}"
    if messages[-1]["role"] != "assistant":
        return "the last message must be from the assistant"
    return None


def content_problem(content: Any, role: str) -> str | None:
    if isinstance(content, str):
        return None if content else "content is empty"
    if not isinstance(content, list):
        return "content must be a string or a list of parts"
    if role != "assistant":
        return "only assistant content may be a list of parts"
    if not content:
        return "content has no parts"
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            return f"bad part {part!r}: need {{\"type\": one of {', '.join(PART_TYPES)}, \"text\": str}}"
    return None


def normalize(row: Any) -> dict[str, Any]:
    """A valid row as `{"messages": [...]}`, dropping extra keys such as `source`."""
    return {"messages": row["messages"] if isinstance(row, dict) else row}


def read_conversations(path: Path | str) -> list[dict[str, Any]]:
    """All conversations of a .jsonl or .jsonl.gz file; blank lines are skipped, a bad line is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"conversation file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    conversations = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{line_number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                problem = conversation_problem(row)
                if problem:
                    raise UserError(f"{path}:{line_number}: {problem}")
                conversations.append(normalize(row))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return conversations


class CustomJSON(Task):
    """A jsonl(.gz) file of conversations, loaded and validated once."""

    def __init__(self, path: Path | str, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.path = Path(path)
        self.conversations = read_conversations(self.path)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict[str, Any]:
        return self.conversations[index]
