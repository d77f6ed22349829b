"""Fetch a Hugging Face Hub dataset's parquet files into `$NANOCHAT_BASE_DIR/chat_data/` (no `datasets` package).

The repo's file tree (one JSON listing, cached next to the files) names the parquet files of a split; each is
fetched with the one download helper (atomic, retried, validated) and kept, so a second run needs no network.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir
from nanochat.download import download_file, hf_endpoint, hub_file_url, validate_parquet


def validate_tree_listing(path: Path) -> None:
    listing = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(listing, list):
        raise ValueError("file tree listing is not a JSON list")


def validate_columns(path: Path, columns: tuple[str, ...]) -> None:
    """A parquet file with rows and these top-level columns (nested columns such as `messages` included)."""
    validate_parquet(path, columns=())
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"parquet file lacks column(s) {missing}; has {names}")


def fetch_hub_parquet(repo: str, subdir: str, pattern: str, columns: tuple[str, ...],
                      dest_dir: Path | None = None) -> list[Path]:
    """Download `<repo>/<subdir>/<pattern>` parquet files (glob pattern) and return their local paths, sorted.

    The Hub is `$HF_ENDPOINT` (default huggingface.co); tests point it at a loopback server.
    """
    dest_dir = dest_dir or get_base_dir() / "chat_data" / repo.replace("/", "__")
    listing_path = dest_dir / f"tree_{subdir.replace('/', '_') or 'root'}.json"
    download_file(f"{hf_endpoint()}/api/datasets/{repo}/tree/main/{subdir}", listing_path,
                  validate=validate_tree_listing, desc=f"{repo} file list", progress=False)
    entries = json.loads(listing_path.read_text(encoding="utf-8"))
    names = sorted(e["path"] for e in entries
                   if e.get("type") == "file" and fnmatch.fnmatch(Path(e["path"]).name, pattern))
    if not names:
        raise UserError(f"{repo}/{subdir} has no files matching {pattern!r}; delete {listing_path} to list again")
    paths = []
    for name in names:
        dest = dest_dir / Path(name).name
        download_file(hub_file_url(repo, name), dest,
                      validate=lambda p: validate_columns(p, columns), desc=f"{repo} {Path(name).name}")
        paths.append(dest)
    return paths
