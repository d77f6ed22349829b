"""Fuzz the live server from its own OpenAPI schema with schemathesis: valid and invalid inputs for every
operation, a bounded number of cases each. No 5xx, every error in OpenAI's shape, no request hangs."""
from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from nanochat.server.completions import sse_failure
from tests.server_fixtures import serve_checkpoint, shared_server_base_dir

EXAMPLES_PER_OPERATION = 12
REQUEST_TIMEOUT = 20

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = shared_server_base_dir(tmp_path_factory)
    # a short default reply keeps generated requests quick; explicit max_tokens is still capped by the context
    with serve_checkpoint(root, "sft", max_queue=8, default_max_tokens=8) as server:
        yield server


def check_response(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    elif "text/event-stream" in str(response.headers.get("content-type")):
        assert sse_failure(response.text.splitlines()) is None, response.text[-300:]
    else:
        json.loads(response.text)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_every_operation(live, mode):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/stats"} <= paths
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters: nothing to make invalid

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            check_response(case.call(base_url=live.url, timeout=REQUEST_TIMEOUT))

        run()
