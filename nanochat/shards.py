"""Pretraining shards on disk: where they live, listing and reading them, and writing new ones.

A shard is parquet with one string column `text`, one document per row, row groups of 1024 documents, zstd,
page checksums. The highest-numbered shard of a directory is the validation split; every other one is training
data. `nanochat.dataset` is the command line that fills `$NANOCHAT_BASE_DIR/base_data/`.

Each source has its own directory, so two sources never mix in one split:

    base_data/climbmix/shard_NNNNN.parquet    base_data/fineweb/...    base_data/demo/...    base_data/custom/...

`data_dir(source)` names one; `data_dir()` (every stage's `--data_source ""`) picks the only source present.
Shards written before sources had directories (`base_data/shard_*.parquet`) are that only source, named "".
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import UserError, atomic_path, get_base_dir
from nanochat.flags import flag

MAKE_SHARDS_HINT = ("make shards with `python -m nanochat.dataset -n 8` (download), "
                    "`--from_text PATH` (your own text) or `--source demo` (offline)")
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ROW_GROUP_DOCS = 1024
MAX_DOC_CHARS = 20_000
CORPUS_SHARD_MB = 64.0


@dataclass
class DataSourceFlags:
    """The flag of every stage that reads pretraining shards."""
    data_source: str = flag("", "pretraining data under base_data/ (climbmix, fineweb, demo, custom); "
                                "empty = the only one there")


def sources_present() -> list[str]:
    """Sources with shards under base_data/, sorted; "" is the old flat layout (shards right in base_data/)."""
    root = get_base_dir() / "base_data"
    if not root.is_dir():
        return []
    flat = [""] if list_shards(root) else []
    return flat + sorted(d.name for d in root.iterdir() if d.is_dir() and list_shards(d))


def data_dir(source: str = "") -> Path:
    """base_data/<source>/; with no source, the directory of the only source present."""
    root = get_base_dir() / "base_data"
    if source:
        if not SOURCE_NAME.match(source):
            raise UserError(f"--data_source must be a plain name such as climbmix or fineweb, got {source!r}")
        return root / source
    present = sources_present()
    if len(present) > 1:
        names = ", ".join(name or "base_data/ itself (old layout)" for name in present)
        raise UserError(f"base_data holds several sources ({names}); pick one with --data_source NAME")
    return root / present[0] if present else root


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def list_shards(directory: Path | None = None) -> list[Path]:
    """All complete shards, sorted; temp files from interrupted writes never match the pattern."""
    directory = directory or data_dir()
    return sorted(directory.glob("shard_*.parquet")) if directory.is_dir() else []


def split_shards(split: str, directory: Path | None = None) -> list[Path]:
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    shards = list_shards(directory)
    if len(shards) < 2:
        where = directory or data_dir()
        raise UserError(f"need at least 2 shards in {where} (train + val), found {len(shards)}; {MAKE_SHARDS_HINT}")
    return shards[:-1] if split == "train" else shards[-1:]


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard for reading; a damaged or empty one is a one-line error that says how to remake it."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise UserError(f"{path} is not a readable parquet shard ({exc}); delete it and {MAKE_SHARDS_HINT}") from exc
    if parquet.metadata.num_rows == 0 or "text" not in parquet.schema_arrow.names:
        raise UserError(f"{path} is empty or has no `text` column; delete it and {MAKE_SHARDS_HINT}")
    return parquet


def row_groups(split: str, directory: Path | None = None) -> list[tuple[Path, int]]:
    """Every (shard, row group) of the split in reading order; rank r of w takes entries r, r+w, ..."""
    return [(path, group) for path in split_shards(split, directory)
            for group in range(open_shard(path).num_row_groups)]


def read_row_group(path: Path, group: int) -> list[str]:
    # pages written with checksums (write_shard) are verified: a flipped byte is an error, never garbage text
    parquet = pq.ParquetFile(path, page_checksum_verification=True)
    return parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()


def iter_text_batches(split: str, start: int = 0, step: int = 1,
                      directory: Path | None = None) -> Iterator[list[str]]:
    """Yield the `text` column of row groups start, start+step, ... across the split's shards, in order."""
    for path, group in row_groups(split, directory)[start::step]:
        yield read_row_group(path, group)



# ---------------------------------------------------------------------------------------------------------
# Writing

def split_long_document(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Pieces of at most max_chars, cut at paragraph breaks, else line breaks, else hard; the loader crops
    what does not fit a row, so very long documents would otherwise mostly go unread."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for separator_unit in split_units(text, max_chars):
        if current and len(current) + len(separator_unit) > max_chars:
            pieces.append(current)
            current = ""
        current += separator_unit
    if current:
        pieces.append(current)
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def split_units(text: str, max_chars: int) -> Iterator[str]:
    for paragraph in text.split("\n\n"):
        paragraph += "\n\n"
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        for line in paragraph.splitlines(keepends=True):
            for start in range(0, len(line), max_chars):
                yield line[start:start + max_chars]


def prepare_output_dir(directory: Path, overwrite: bool) -> None:
    existing = list_shards(directory)
    if existing and not overwrite:
        raise UserError(f"{directory} already has {len(existing)} shards; pass --overwrite to replace them "
                        "(or point NANOCHAT_BASE_DIR elsewhere)")
    for path in existing:
        path.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def write_shard(texts: list[str], path: Path) -> Path:
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_DOCS, compression="zstd", write_page_checksum=True)
    return path


def write_corpus_shards(documents: Iterable[str], directory: Path, shard_mb: float = CORPUS_SHARD_MB,
                        seed: int = 42, val_fraction: float = 0.1, overwrite: bool = False) -> list[Path]:
    """Split long documents, shuffle with `seed`, and write train shards of ~shard_mb MB of UTF-8 text each
    plus a last validation shard of min(one shard, val_fraction of the corpus), into `directory`."""
    docs = [piece for doc in tqdm(documents, desc="reading", unit="doc") if doc.strip()
            for piece in split_long_document(doc)]
    if len(docs) < 2:
        raise UserError(f"the corpus has {len(docs)} non-empty documents; need at least 2 (train + val)")
    random.Random(seed).shuffle(docs)
    sizes = [len(doc.encode("utf-8")) for doc in docs]
    shard_bytes = max(1, int(shard_mb * 1e6))
    val_target = min(shard_bytes, sum(sizes) * val_fraction)
    val_count, val_bytes = 0, 0
    while val_count < len(docs) - 1 and (val_count == 0 or val_bytes < val_target):
        val_bytes += sizes[val_count]
        val_count += 1
    groups, current, current_bytes = [], [], 0
    for doc, size in zip(docs[val_count:], sizes[val_count:]):
        current.append(doc)
        current_bytes += size
        if current_bytes >= shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
    if current:
        groups.append(current)
    groups.append(docs[:val_count])
    prepare_output_dir(directory, overwrite)
    return [write_shard(group, directory / shard_name(i)) for i, group in
            enumerate(tqdm(groups, desc="writing shards", unit="shard"))]
