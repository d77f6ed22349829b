"""Calculator tool-use data: GSM8K-style `<<expr=result>>` annotations become python/output parts.

A GSM8K solution writes each calculation as `48/2 = <<48/2=24>>24`. The model should learn to *call* the
calculator there, so the annotation becomes a python part (`48/2`, trained on) followed by a python_output part
(`24`, supplied by the engine at inference, so masked in training). The text after the annotation (the
visible `24`) stays ordinary text. The final `#### N` line carries the answer every word-problem task checks.
"""
from __future__ import annotations

import re

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def tool_parts(solution: str) -> list[dict[str, str]]:
    """Split a worked solution into text / python / python_output parts (empty text parts dropped)."""
    parts: list[dict[str, str]] = []
    cursor = 0
    for match in ANNOTATION.finditer(solution):
        if match.start() > cursor:
            parts.append({"type": "text", "text": solution[cursor:match.start()]})
        parts.append({"type": "python", "text": match.group(1).strip()})
        parts.append({"type": "python_output", "text": match.group(2).strip()})
        cursor = match.end()
    if cursor < len(solution):
        parts.append({"type": "text", "text": solution[cursor:]})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, with thousands separators removed; None when there is none."""
    matches = FINAL_ANSWER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def answers_match(completion: str, reference: str) -> bool:
    """True when the completion's `#### N` equals the reference's, numerically (so 3 == 3.0)."""
    predicted, expected = extract_answer(completion), extract_answer(reference)
    if predicted is None or expected is None:
        return False
    try:
        return float(predicted) == float(expected)
    except ValueError:
        return False
