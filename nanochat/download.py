"""The one download helper: every shard, eval set, chat file and bundle the project fetches goes through it.

    download_file(url, dest, validate=validate_parquet, desc="shard 3")
    download_shards(8, "climbmix")   # shards 0..7 + the validation shard, in parallel, into base_data/climbmix/

A download streams into a hidden temp file next to `dest`, checks its size against Content-Length, runs the
optional validator, fsyncs, and only then renames onto `dest`. It asks for the body unencoded
(`Accept-Encoding: identity`), refuses a file larger than `max_bytes` and gives up `deadline_s` after it began;
`HF_TOKEN` is sent only over https. Timeouts, connection errors, cut bodies, 5xx/429
and files that fail validation are retried with exponential backoff; other HTTP errors fail at once. Ctrl-C
(or any error) removes the temp file, so `dest` is either absent, the old file, or complete and valid.
"""
from __future__ import annotations

import os
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import requests
import urllib3
from tqdm import tqdm

from nanochat.common import UserError, fsync_dir
from nanochat.flags import flag
from nanochat.shards import data_dir, shard_name

CHUNK_BYTES = 1 << 20
MAX_FILE_BYTES = 2 << 30  # larger than any file the project fetches (a shard is ~100 MB); callers may set less
DEADLINE_S = 3600.0  # per file, all attempts together
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# HF_TOKEN goes only to Hugging Face hosts and the $HF_ENDPOINT mirror: a mirror named by --url_template or
# NANOCHAT_DATA_URL must never receive it.
TOKEN_HOSTS = ("huggingface.co", "hf.co")


class DownloadError(UserError):
    """A download that did not produce a complete, valid file after every retry."""


# Process-wide: a stage run with --offline must not reach the network from any of its downloads.
offline = False
OFFLINE_HINT = ("fetch it once with the network (`python -m scripts.prefetch`: task files and the CORE bundle; "
                "`python -m nanochat.dataset`: shards) or drop --offline")


@dataclass
class OfflineFlags:
    """The switch of every stage that may download something."""
    offline: bool = flag(False, "never touch the network: a file that is not here yet is an error naming it")

    def __post_init__(self):
        global offline
        offline = self.offline
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


class RetryableError(Exception):
    """One attempt failed in a way that may succeed on the next try."""


def hf_endpoint() -> str:
    """`$HF_ENDPOINT` (the Hub's own mirror variable), default https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def hub_file_url(repo: str, path: str) -> str:
    """URL of a file in a Hub dataset repo, e.g. hub_file_url("openai/gsm8k", "main/test-00000-of-00001.parquet")."""
    return f"{hf_endpoint()}/datasets/{repo}/resolve/main/{path}"


def auth_headers(url: str) -> dict[str, str]:
    token = os.environ.get("HF_TOKEN")
    parsed = urlparse(url)
    host = parsed.hostname or ""
    endpoint = urlparse(hf_endpoint())
    to_endpoint = (host, parsed.port) == (endpoint.hostname, endpoint.port)
    # only over https: on plain http anyone on the path reads the token
    to_hub = any(host == h or host.endswith("." + h) for h in TOKEN_HOSTS)
    if token and parsed.scheme == "https" and (to_endpoint or to_hub):
        return {"Authorization": f"Bearer {token}"}
    return {}


def temp_path_for(dest: Path) -> Path:
    """Hidden and suffixed, so shard globs (`shard_*.parquet`) and loaders never pick up a partial file."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.tmp")


def validate_parquet(path: Path, columns: tuple[str, ...] = ("text",)) -> None:
    """Raises ValueError unless the file opens as parquet (footer intact), has rows and the given columns."""
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise ValueError(f"not a valid parquet file ({exc})") from exc
    names = set(meta.schema.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"parquet file lacks column(s) {missing}; has {sorted(names)}")
    if meta.num_rows == 0:
        raise ValueError("parquet file has no rows")


def validate_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a valid zip file ({exc})") from exc
    if bad is not None:
        raise ValueError(f"zip member {bad} is corrupt")


def download_file(url: str, dest: Path | str, validate: Callable[[Path], None] | None = None,
                  desc: str | None = None, retries: int = 5, timeout: float = 30.0, backoff_s: float = 1.0,
                  overwrite: bool = False, progress: bool = True,
                  on_bytes: Callable[[int], None] | None = None, max_bytes: int = MAX_FILE_BYTES,
                  deadline_s: float = DEADLINE_S) -> Path:
    """Fetch `url` to `dest` atomically and return `dest`.

    An existing `dest` is kept when it passes `validate` (or when there is no validator) unless `overwrite`;
    a damaged one is downloaded again. `validate(path)` raises (any exception) to reject a file. `retries` is
    the number of extra attempts; attempt k waits `backoff_s * 2**k` seconds (capped at 60) before it starts.
    `on_bytes(n)` is called per received chunk, for callers that draw one bar over many files.
    A file over `max_bytes` is refused (by its Content-Length before the body, or as soon as the body passes it),
    and all attempts together end `deadline_s` after the first began (plus at most one `timeout` for a read
    already waiting): a server that trickles bytes cannot hold a download forever.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        if validate is None:
            return dest
        try:
            validate(dest)
            return dest
        except Exception:
            pass  # damaged: fall through and fetch it again
    if offline:
        raise DownloadError(f"offline: {dest} is missing or damaged (it comes from {url}); {OFFLINE_HINT}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    deadline = time.monotonic() + deadline_s
    last_error = ""
    try:
        for attempt in range(retries + 1):
            if attempt:
                wait = min(backoff_s * 2 ** (attempt - 1), 60.0)
                if time.monotonic() + wait >= deadline:
                    raise DownloadError(f"could not download {url} within {deadline_s:g}s ({attempt} tries): "
                                        f"{last_error}")
                time.sleep(wait)
            try:
                fetch_once(url, tmp, Limits(timeout, deadline, deadline_s, max_bytes), desc or dest.name, progress,
                           on_bytes)
                if validate is not None:
                    try:
                        validate(tmp)
                    except Exception as exc:
                        raise RetryableError(f"downloaded file failed validation: {exc}") from exc
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
                return dest
            except RetryableError as exc:
                last_error = str(exc)
    finally:
        tmp.unlink(missing_ok=True)
    raise DownloadError(f"could not download {url} after {retries + 1} tries: {last_error}")


@dataclass
class Limits:
    timeout: float  # seconds per connect or read
    deadline: float  # time.monotonic() by which the whole download must be done
    deadline_s: float  # the same, as given (for messages)
    max_bytes: int

    def check_time(self, url: str, received: int) -> None:
        if time.monotonic() > self.deadline:
            raise DownloadError(f"could not download {url} within {self.deadline_s:g}s (got {received} bytes); "
                                "the server is too slow, try again later or use a closer mirror")

    def too_large(self, url: str, size: str) -> DownloadError:
        return DownloadError(f"refusing {url}: {size}, more than the {self.max_bytes} bytes expected at most for "
                             "this file; check the URL (or its mirror setting)")


def fetch_once(url: str, tmp: Path, limits: Limits, desc: str, progress: bool,
               on_bytes: Callable[[int], None] | None) -> None:
    """One attempt: stream the body into `tmp`, fsync it, and check the byte count against Content-Length."""
    limits.check_time(url, 0)
    # identity: Content-Length then counts the bytes written, and no decompression can grow a body past max_bytes
    headers = {"Accept-Encoding": "identity", **auth_headers(url)}
    try:
        with requests.get(url, stream=True, timeout=limits.timeout, headers=headers) as response:
            if response.status_code in RETRY_STATUS:
                raise RetryableError(f"HTTP {response.status_code}")
            if response.status_code != 200:
                raise DownloadError(f"HTTP {response.status_code} for {url}; check the URL (or its mirror setting)")
            encoding = response.headers.get("Content-Encoding", "identity")
            if encoding != "identity":
                raise DownloadError(f"{url} came {encoding}-encoded although identity was asked for; "
                                    "use another mirror")
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected is not None and expected.isdigit() else None
            if expected is not None and expected > limits.max_bytes:
                raise limits.too_large(url, f"Content-Length {expected}")
            received = 0
            with open(tmp, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=desc, disable=not progress, leave=False) as bar:
                # read1: whatever has arrived, so the deadline is checked between reads even at a trickle
                while chunk := response.raw.read1(CHUNK_BYTES, decode_content=False):
                    received += len(chunk)
                    if received > limits.max_bytes:
                        raise limits.too_large(url, f"a body past {limits.max_bytes} bytes")
                    out.write(chunk)
                    bar.update(len(chunk))
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    limits.check_time(url, received)
                out.flush()
                os.fsync(out.fileno())
    except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as exc:
        raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
    if expected is not None and received != expected:
        raise RetryableError(f"got {received} bytes, Content-Length said {expected}")


# ---------------------------------------------------------------------------------------------------------
# Pretraining shards

@dataclass(frozen=True)
class PretrainSource:
    repo: str       # Hub dataset with shard_{index:05d}.parquet files, `text` column
    val_index: int  # the last shard, held out for validation


PRETRAIN_SOURCES = {
    # NVIDIA ClimbMix 400B, shuffled and re-sharded (6,543 shards); the public speedrun record's data
    "climbmix": PretrainSource("karpathy/climbmix-400b-shuffle", 6542),
    # FineWeb-Edu 100B, shuffled (1,823 shards)
    "fineweb": PretrainSource("karpathy/fineweb-edu-100b-shuffle", 1822),
}
DEFAULT_SOURCE = "climbmix"


def resolve_url_template(url_template: str = "", source: str = DEFAULT_SOURCE) -> str:
    """--url_template, else $NANOCHAT_DATA_URL, else the source's shards on the Hub ($HF_ENDPOINT);
    `{index}` is the shard."""
    template = (url_template or os.environ.get("NANOCHAT_DATA_URL")
                or hub_file_url(PRETRAIN_SOURCES[source].repo, "shard_{index:05d}.parquet"))
    try:
        template.format(index=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--url_template must contain {{index}} (e.g. .../shard_{{index:05d}}.parquet), "
                        f"got {template!r}") from exc
    if template.format(index=0) == template.format(index=1):
        raise UserError(f"--url_template must contain {{index}}, got {template!r}")
    return template


def download_shards(num_train: int, source: str = DEFAULT_SOURCE, url_template: str = "", num_workers: int = 4,
                    val_index: int = -1, directory: Path | None = None,
                    retries: int = 5, backoff_s: float = 1.0) -> list[Path]:
    """Download a source's train shards 0..num_train-1 plus its validation shard (`val_index`, -1 = the
    source's last) into base_data/<source>/, in parallel; valid ones are skipped."""
    if source not in PRETRAIN_SOURCES:
        raise UserError(f"no pretraining source {source!r}; pick one of {', '.join(PRETRAIN_SOURCES)}")
    val_index = PRETRAIN_SOURCES[source].val_index if val_index == -1 else val_index
    if not 1 <= num_train <= val_index:
        raise UserError(f"-n must be between 1 and {val_index} (the validation shard's index), got {num_train}")
    template = resolve_url_template(url_template, source)
    directory = directory or data_dir(source)
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
