"""The README's layout and docs/internals.md keep up with the tree: every module of nanochat/ is named in both,
and no module either names is missing from the tree."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "nanochat").glob("*.py") if p.stem != "__init__")


def readme_layout() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 1)]


def test_readme_layout_names_every_module_and_no_other():
    layout = readme_layout()
    unlisted = [m for m in MODULES if f"{m}.py" not in layout]
    assert not unlisted, f"add {unlisted} to the Layout block of README.md"
    stale = sorted(set(re.findall(r"\b(\w+)\.py\b", layout)) - set(MODULES))
    assert not stale, f"README.md's Layout names {stale}, which nanochat/ does not have"


def test_internals_names_every_module():
    internals = (REPO / "docs" / "internals.md").read_text(encoding="utf-8")
    names = set(re.findall(r"nanochat[./](\w+)", internals)) | set(re.findall(r"\b(\w+)\.py\b", internals))
    unlisted = [m for m in MODULES if m not in names]
    assert not unlisted, f"say what {unlisted} offer in docs/internals.md (as nanochat.NAME or NAME.py)"
