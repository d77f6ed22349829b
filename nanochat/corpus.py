"""A user's own corpus as documents: text files and folders (one document per file), jsonl and parquet rows."""
from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import UserError


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
