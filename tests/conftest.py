"""Fixtures every test file may use: an isolated base dir, the shared real data, a loopback file server."""
from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.http_fixtures import FileServer

# A suite started in the background by a non-interactive shell (`bash tests/run.sh &` in a script, nohup) inherits
# SIGINT ignored, and so would every process it starts; the Ctrl-C tests need Ctrl-C delivered. A handler (unlike
# SIG_IGN) is reset to the default in children, so this restores it for them too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """One line at the end (after pytest's own summary) that groups the skips by reason, so a skip that should
    not happen on this machine stands out."""
    yield
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_line("skipped: " + "; ".join(f"{count} × {reason}"
                                                            for reason, count in reasons.most_common()))
