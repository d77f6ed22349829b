"""Fixtures every test file may use: an isolated base dir, the shared real data, a loopback file server."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.http_fixtures import FileServer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    """A fresh `$NANOCHAT_BASE_DIR` under tmp_path, so no test touches ~/.cache/nanochat."""
    directory = tmp_path / "nanochat_base"
    directory.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data in ../shared/data (pretrain shards, chat, eval, core); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def file_server():
    """Factory: `server = file_server(directory)` starts a FileServer on 127.0.0.1, stopped after the test."""
    servers = []

    def start(directory: Path) -> FileServer:
        server = FileServer(directory).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
