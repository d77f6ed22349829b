"""nanochat.download against a real loopback server, with faults injected per request."""
from __future__ import annotations

import shutil
import time
import zipfile

import pyarrow.parquet as pq
import pytest

from nanochat.download import (DownloadError, auth_headers, download_file, hub_file_url, validate_parquet,
                               validate_zip)

SHARD = "shard_00000.parquet"


@pytest.fixture
def served(tmp_path, shared_data, file_server):
    source = tmp_path / "served"
    source.mkdir()
    shutil.copy(shared_data / "pretrain" / SHARD, source / SHARD)
    return file_server(source), source / SHARD


@pytest.fixture
def out_dir(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def fetch(server, dest, **kwargs):
    kwargs.setdefault("validate", validate_parquet)
    return download_file(server.url(SHARD), dest, backoff_s=0.01, progress=False, **kwargs)


def test_plain_download_is_byte_identical(served, out_dir):
    server, original = served
    dest = out_dir / SHARD
    assert fetch(server, dest) == dest
    assert dest.read_bytes() == original.read_bytes()
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("fault", ["503", "cut", "truncate", "bad_length"])
def test_fault_then_success_gives_valid_file(served, out_dir, fault):
    server, original = served
    server.add_faults(SHARD, fault)
    dest = out_dir / SHARD
    fetch(server, dest)
    assert dest.read_bytes() == original.read_bytes()
    assert server.requests_for(SHARD) == 2
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("fault, reason", [("truncate", "failed validation"), ("bad_length", "Error"),
                                           ("503", "HTTP 503"), ("cut", "Error")])
def test_persistent_fault_is_a_clear_error_and_leaves_nothing(served, out_dir, fault, reason):
    server, _ = served
    server.add_faults(SHARD, *[fault] * 3)
    dest = out_dir / SHARD
    with pytest.raises(DownloadError, match=f"after 3 tries: .*{reason}"):
        fetch(server, dest, retries=2)
    assert not dest.exists()
    assert leftovers(out_dir) == []


def test_truncated_body_without_validator_is_caught_by_content_length(served, out_dir):
    server, _ = served
    server.add_faults(SHARD, "cut", "cut")
    with pytest.raises(DownloadError, match="after 2 tries"):
        fetch(server, out_dir / SHARD, validate=None, retries=1)
    assert list(out_dir.iterdir()) == []


def test_not_found_fails_at_once(served, out_dir):
    server, _ = served
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url("missing.parquet"), out_dir / "missing.parquet", backoff_s=0.01, progress=False)
    assert server.requests_for("missing.parquet") == 1


def test_existing_valid_file_is_kept_and_damaged_one_replaced(served, out_dir):
    server, original = served
    dest = out_dir / SHARD
    shutil.copy(original, dest)
    fetch(server, dest)
    assert server.requests_for(SHARD) == 0
    dest.write_bytes(original.read_bytes()[:1000])
    fetch(server, dest)
    assert server.requests_for(SHARD) == 1
    assert pq.ParquetFile(dest).metadata.num_rows > 0


def test_interrupt_mid_body_leaves_no_partial_file(served, out_dir):
    server, _ = served

    def interrupt(_):
        raise KeyboardInterrupt

    dest = out_dir / SHARD
    with pytest.raises(KeyboardInterrupt):
        fetch(server, dest, on_bytes=interrupt)
    assert list(out_dir.iterdir()) == []


def test_hf_token_goes_only_to_hugging_face_over_https(served, out_dir, monkeypatch):
    server, _ = served
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert auth_headers("https://huggingface.co/datasets/x/resolve/main/a.parquet") == {
        "Authorization": "Bearer secret"}
    assert auth_headers("https://cdn-lfs.hf.co/a") == {"Authorization": "Bearer secret"}
    assert auth_headers("https://evilhuggingface.co/a") == {}
    assert auth_headers("http://huggingface.co/datasets/x/resolve/main/a.parquet") == {}
    fetch(server, out_dir / SHARD)
    (_, headers), = server.requests
    assert "Authorization" not in headers
    # the $HF_ENDPOINT mirror gets the token over https only; this loopback mirror speaks http
    monkeypatch.setenv("HF_ENDPOINT", server.url().rstrip("/"))
    assert hub_file_url("a/b", "x.parquet") == server.url("datasets/a/b/resolve/main/x.parquet")
    fetch(server, out_dir / SHARD, overwrite=True)
    assert "Authorization" not in server.requests[-1][1]
    https_mirror = server.url().rstrip("/").replace("http://", "https://")
    monkeypatch.setenv("HF_ENDPOINT", https_mirror)
    assert auth_headers(f"{https_mirror}/datasets/a/b/resolve/main/x.parquet") == {"Authorization": "Bearer secret"}


def test_asks_for_an_unencoded_body(served, out_dir):
    server, _ = served
    fetch(server, out_dir / SHARD)
    (_, headers), = server.requests
    assert headers["Accept-Encoding"] == "identity"


def test_content_length_over_max_bytes_is_refused_without_retries(served, out_dir):
    server, original = served
    with pytest.raises(DownloadError, match=f"refusing .*Content-Length {original.stat().st_size}, more than"):
        fetch(server, out_dir / SHARD, max_bytes=original.stat().st_size - 1)
    assert server.requests_for(SHARD) == 1
    assert list(out_dir.iterdir()) == []
    fetch(server, out_dir / SHARD, max_bytes=original.stat().st_size)  # exactly the cap is fine
    assert (out_dir / SHARD).read_bytes() == original.read_bytes()


def test_body_growing_past_max_bytes_is_cut_and_refused(served, out_dir):
    server, original = served
    server.add_faults(SHARD, "no_length", "no_length")
    with pytest.raises(DownloadError, match="a body past 100000 bytes"):
        fetch(server, out_dir / SHARD, max_bytes=100_000)
    assert server.requests_for(SHARD) == 1
    assert list(out_dir.iterdir()) == []
    fetch(server, out_dir / SHARD)  # without a length but under the cap: read to the end and validated
    assert (out_dir / SHARD).read_bytes() == original.read_bytes()


@pytest.mark.parametrize("fault", ["trickle", "slow"])
def test_a_download_that_outlasts_its_deadline_stops(served, out_dir, fault):
    """A trickle (one byte per 20 ms) never trips the per-read timeout; only the overall deadline ends it."""
    server, _ = served
    server.add_faults(SHARD, fault, fault)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="within 1s"):
        fetch(server, out_dir / SHARD, deadline_s=1.0)
    assert time.monotonic() - started < 10
    assert server.requests_for(SHARD) == 1
    assert list(out_dir.iterdir()) == []


def test_retries_stop_at_the_deadline(served, out_dir):
    server, _ = served
    server.add_faults(SHARD, *["503"] * 6)
    with pytest.raises(DownloadError, match=r"within 0.5s \(\d tries\): HTTP 503"):
        download_file(server.url(SHARD), out_dir / SHARD, backoff_s=0.2, progress=False, deadline_s=0.5)
    assert server.requests_for(SHARD) < 6
    assert list(out_dir.iterdir()) == []


def test_zip_validator(out_dir):
    good = out_dir / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        archive.writestr("core.yaml", "icl_tasks: []\n")
    validate_zip(good)
    bad = out_dir / "bad.zip"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match="not a valid zip"):
        validate_zip(bad)
