"""atheris harness over the server's request parsing and the chat-rendering path.

Each input becomes a structured request (roles, contents with special-token text and odd Unicode, parameters of
right and wrong types) sent to the real app in process, plus a conversation rendered by the real tokenizer. A 5xx
reply, a stream that does not end with [DONE], or any exception but the documented `UserError`, is a crash.
Bounded: `python -m tests.reliability.fuzz_server -runs=N -seed=S` (libFuzzer flags); test_fuzz_harnesses.py runs it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import atheris

from fastapi.testclient import TestClient

with atheris.instrument_imports(include=["nanochat"]):  # coverage for our code only: instrumenting torch takes minutes
    from nanochat.common import UserError
    from nanochat.server import ServerSettings, create_app
    from nanochat.server.completions import sse_failure
    from nanochat.tokenizer import Tokenizer

from tests.server_fixtures import build_server_base_dir, checkpoint_loader

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
ROLES = ["system", "user", "assistant", "tool", "", "USER"]
VALUES = [None, True, -1, 0, 3, 1e308, float("nan"), "x", [], {}]


def fuzzed_text(fdp: atheris.FuzzedDataProvider) -> str:
    pieces = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        choice = fdp.ConsumeIntInRange(0, 2)
        if choice == 0:
            pieces.append(fdp.PickValueInList(SPECIALS))
        elif choice == 1:
            pieces.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40)))
        else:
            pieces.append(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 8)))  # lone surrogates too
    return "".join(pieces)


def fuzzed_content(fdp: atheris.FuzzedDataProvider):
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return fuzzed_text(fdp)
    if kind == 1:
        return [{"type": fdp.PickValueInList(["text", "image_url", ""]), "text": fuzzed_text(fdp)}
                for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return fdp.PickValueInList(VALUES)


def fuzzed_messages(fdp: atheris.FuzzedDataProvider) -> list:
    return [{"role": fdp.PickValueInList(ROLES), "content": fuzzed_content(fdp)}
            for _ in range(fdp.ConsumeIntInRange(0, 5))]


def fuzzed_params(fdp: atheris.FuzzedDataProvider) -> dict:
    params = {"max_tokens": fdp.PickValueInList([1, 2, 4, 0, -3, "4", None, 10**9])}
    for name in ("temperature", "top_p", "top_k", "n", "stream", "stop", "seed"):
        if fdp.ConsumeBool():
            params[name] = fdp.PickValueInList([*VALUES, fuzzed_text(fdp)])
    return params


def encode(body) -> bytes:
    try:
        return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"{"


class Target:
    def __init__(self):
        # libFuzzer exits the process itself, so the caller's directory ($NANOCHAT_FUZZ_DIR) is cleaned by the caller
        root = build_server_base_dir(Path(os.environ.get("NANOCHAT_FUZZ_DIR") or tempfile.mkdtemp(prefix="fuzz_")))
        self.client = TestClient(create_app(checkpoint_loader(root, "sft"),
                                            ServerSettings(max_queue=4, default_max_tokens=2)),
                                 base_url="http://localhost")  # a loopback Host: the server refuses others
        self.client.__enter__()
        deadline = time.monotonic() + 60
        while self.client.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the fuzz target's model never loaded")
            time.sleep(0.05)
        self.tokenizer = Tokenizer.load(root / "tokenizer")

    def __call__(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        messages = fuzzed_messages(fdp)
        if fdp.ConsumeBool():
            path, body = "/v1/chat/completions", {"messages": messages, **fuzzed_params(fdp)}
        else:
            path, body = "/v1/completions", {"prompt": fuzzed_content(fdp), **fuzzed_params(fdp)}
        raw = encode(body) if fdp.ConsumeIntInRange(0, 9) else fdp.ConsumeBytes(64)
        response = self.client.post(path, content=raw, headers={"content-type": "application/json"})
        if response.status_code >= 500:
            raise AssertionError(f"{path} answered {response.status_code} to {raw[:300]!r}: {response.text[:300]}")
        if "text/event-stream" in response.headers.get("content-type", ""):
            failure = sse_failure(response.text.splitlines())
            if failure:
                raise AssertionError(f"{path} stream for {raw[:300]!r} did not complete: {failure}")

        try:
            self.tokenizer.render_conversation({"messages": messages}, max_tokens=64)
            self.tokenizer.render_for_completion({"messages": messages})
        except UserError:
            pass  # the documented refusal of a malformed conversation


def main() -> None:
    target = Target()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
