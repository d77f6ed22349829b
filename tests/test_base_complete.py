"""base_complete driven as a user would: typed in tmux with the ### trigger, one-shot --prompt, piped stdin."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from nanochat.engine import Engine
from nanochat.flags import run_main
from nanochat.terminal import crop_to_context
from scripts import base_complete
from tests.engine_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from tests.engine_helpers import SUBPROCESS_ENV, Tmux, printable_gpt, save_model, train_tokenizer

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A base dir with a tokenizer, a long-context model (tag d1) and a 32-token-context one (tag small)."""
    base_dir = tmp_path_factory.mktemp("nanochat_base")
    tokenizer = train_tokenizer()
    tokenizer.save(base_dir / "tokenizer")
    model = printable_gpt(tokenizer, max_seq_len=8192)
    save_model(base_dir, model, tag="d1")
    save_model(base_dir, printable_gpt(tokenizer, max_seq_len=32, seed=1), tag="small")
    return base_dir, Engine(model, tokenizer)


def greedy_completion(engine, text, max_tokens):
    prompt = engine.tokenizer.encode(text, prepend="<|bos|>")
    results, _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return engine.tokenizer.decode(results[0][len(prompt):])


@pytest.mark.slow
def test_interactive_trigger_gray_prompt_ctrl_c_and_ctrl_d(checkpoint):
    base_dir, engine = checkpoint
    session = Tmux(f"{sys.executable} -m scripts.base_complete --model_tag d1 --temperature 0 --max_tokens 8000",
                   {"NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": os.getcwd()})
    try:
        session.wait_for("end it with ###")
        session.type_line("The quick")
        session.type_line("brown fox###")
        # the typed lines are redrawn as a gray prompt (no "> " any more) and the completion streams after it
        session.wait_for(r"The quick\nbrown fox.{10}")
        session.send("C-c")
        screen = session.wait_for(r"\[stopped\]\n>\Z").string
        streamed = screen[screen.index("brown fox") + len("brown fox"):screen.index(" [stopped]")]
        streamed = streamed.removesuffix("^C")  # the terminal echoes the keypress
        expected = greedy_completion(engine, "The quick\nbrown fox", 40)
        assert len(streamed) >= 10 and (streamed.startswith(expected) or expected.startswith(streamed))
        assert "> The quick" not in screen
        colored = session.screen(escapes=True)
        assert re.search(r"\x1b\[90m(\x1b\[[0-9;]*m)*The quick\nbrown fox\x1b\[39m", colored)  # gray, then default
        # Ctrl-C while typing discards the half-typed prompt; Ctrl-D quits cleanly
        session.tmux("send-keys", "-t", "main", "-l", "half typed")
        session.send("C-c")
        session.wait_for(r"half typed\n>\Z")
        session.send("C-d")
        session.wait_for("EXIT=0")
    finally:
        session.close()


def run_in_process(base_dir, monkeypatch, capsys, *args):
    """The entry point as `python -m` runs it, in this process: exit code, stdout, stderr."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: base_complete.main(["--model_tag", "d1", *args]))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_one_shot_prompt(checkpoint, monkeypatch, capsys):
    base_dir, engine = checkpoint
    code, out, err = run_in_process(base_dir, monkeypatch, capsys, "--prompt", "hello world", "--temperature", "0",
                                    "--max_tokens", "12")
    assert code == 0
    assert out == greedy_completion(engine, "hello world", 12) + "\n"  # not a terminal: no prompt, no colour
    assert "loading base checkpoint d1" in err


@pytest.mark.slow
def test_piped_stdin(checkpoint):
    base_dir, engine = checkpoint
    env = {**os.environ, **SUBPROCESS_ENV, "NANOCHAT_BASE_DIR": str(base_dir)}
    command = [sys.executable, "-m", "scripts.base_complete", "--model_tag", "d1", "--temperature", "0",
               "--max_tokens", "12"]
    result = subprocess.run(command, input="hello world", env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_completion(engine, "hello world", 12) + "\n"


def test_long_prompt_is_cropped_with_a_notice(checkpoint, monkeypatch, capsys):
    base_dir, _ = checkpoint
    code, out, err = run_in_process(base_dir, monkeypatch, capsys, "--model_tag", "small", "--prompt",
                                    "the cat sat on the mat " * 20, "--max_tokens", "8")
    assert code == 0 and out
    assert "kept the first and the last 23 to fit the 32-token context" in err


def test_crop_keeps_bos_and_the_newest_tokens():
    tokens = list(range(100))
    kept, notice = crop_to_context(tokens, max_seq_len=32, max_tokens=8)
    assert kept == [0] + list(range(77, 100)) and "100 tokens" in notice
    assert crop_to_context(tokens[:24], max_seq_len=32, max_tokens=8) == (tokens[:24], None)
    kept, _ = crop_to_context(tokens, max_seq_len=32, max_tokens=1000)  # room is capped at half the context
    assert len(kept) == 16


@pytest.mark.parametrize("args, message", [
    (["--top_p", "1.5"], "error: --top_p must be in (0, 1]"),
    (["--source", "nope"], "error: --source must be one of base, mid, sft, rl"),
    (["--model_tag", "missing"], "error: no complete checkpoints in"),
    (["--max_tokens", "many"], "error: argument --max_tokens: expected int"),
])
def test_bad_input_is_one_line(checkpoint, monkeypatch, capsys, args, message):
    code, _, err = run_in_process(checkpoint[0], monkeypatch, capsys, *args, "--prompt", "x")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in err
