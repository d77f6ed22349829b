"""chat_cli driven as a user would: a multi-turn tmux session with commands, and -p with a real tool call."""
import os
import re
import shutil
import sys

import pytest

from nanochat.engine import Engine, assistant_parts
from nanochat.flags import run_main
from scripts import chat_cli
from tests.engine_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from tests.engine_helpers import (TOOL_CONVERSATION, Tmux, printable_gpt, save_model, train_tokenizer,
                                  train_tool_caller)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A base dir with a tokenizer and two sft models: printable random text (d1) and a trained tool caller."""
    base_dir = tmp_path_factory.mktemp("nanochat_base")
    tokenizer = train_tokenizer()
    tokenizer.save(base_dir / "tokenizer")
    model = printable_gpt(tokenizer, max_seq_len=256)
    save_model(base_dir, model, source="sft", tag="d1")
    sequence, _ = tokenizer.render_conversation(TOOL_CONVERSATION)
    save_model(base_dir, train_tool_caller(tokenizer, sequence), source="sft", tag="tool")
    return base_dir, Engine(model, tokenizer)


def greedy_answer(engine, messages, max_tokens=12):
    prompt = engine.tokenizer.render_for_completion({"messages": messages})
    results, _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return assistant_parts(engine.tokenizer, results[0][len(prompt):])[0]["text"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_multi_turn_session_with_commands(checkpoint):
    base_dir, engine = checkpoint
    first = greedy_answer(engine, [{"role": "user", "content": "hello"}])
    second = greedy_answer(engine, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "and then"}])
    session = Tmux(f"{sys.executable} -m scripts.chat_cli --model_tag d1 --temperature 0 --max_tokens 12",
                   {"NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": os.getcwd()})
    try:
        session.wait_for(r"/clear.*You:\Z")
        session.type_line("hello")
        session.wait_for(r"You: hello\nAssistant: " + re.escape(first) + r"\nYou:\Z")
        session.type_line("and then")  # the answer depends on the first turn: history is kept
        session.wait_for(r"You: and then\nAssistant: " + re.escape(second) + r"\nYou:\Z")
        session.type_line("/clear")
        session.wait_for(r"\(new conversation\)\nYou:\Z")
        session.type_line("hello")  # a fresh conversation answers as the first turn did
        screen = session.wait_for(r"You: hello\nAssistant: " + re.escape(first) + r"\nYou:\Z").string
        assert screen.count("Assistant: " + first) == 2
        session.type_line("/topk many")
        session.wait_for(r"error: '/topk many' needs a number, e\.g\. /topk 50.*You:\Z")
        session.type_line("/temperature 0.5")
        session.wait_for(r"temperature = 0\.5\nYou:\Z")
        session.type_line("/frobnicate")
        session.wait_for(r"unknown command /frobnicate.*You:\Z")
        session.type_line("quit")
        session.wait_for(r"EXIT=0")
    finally:
        session.close()


def run_in_process(base_dir, monkeypatch, capsys, *args):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: chat_cli.main(list(args)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.slow
def test_one_prompt_shows_the_tool_call(checkpoint, monkeypatch, capsys):
    """-p asks once; the trained model calls the calculator and the answer shows the call and its real result."""
    code, out, err = run_in_process(checkpoint[0], monkeypatch, capsys, "--model_tag", "tool", "--temperature", "0",
                                    "--max_tokens", "16", "-p", "What is 6 times 7?")
    assert code == 0, err
    assert out.startswith("[calculator: 6*7 → 42]")


def test_bad_flag_is_one_line(checkpoint, monkeypatch, capsys):
    code, _, err = run_in_process(checkpoint[0], monkeypatch, capsys, "--temperature", "-1", "-p", "hi")
    assert code == 2
    assert err.strip() == "error: --temperature must be >= 0 (0 = greedy), got -1.0"
