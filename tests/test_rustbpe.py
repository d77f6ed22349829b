"""The rustbpe crate through Python: merges equal a pure-Python reference trainer, encode/decode, errors."""
from __future__ import annotations

import base64
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
import regex
import rustbpe
import tiktoken


GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TRICKY_TEXTS = [
    "hello world aaaa hello there",
    "The year 2024 had 366 days; 1234567 is odd. don't I'll we've THEY'RE",
    "  leading spaces\n\n\ttabs\r\nand CRLF   \n trailing   ",
    "ünïcødé café naïve — 日本語のテキスト 🎉🎉 Привет мир ١٢٣",
    "x=a+b*(c-d)/e; print(f'{x!r}') # comment\n    return [i**2 for i in range(10)]",
    "aaaaaaa bbbbbbbb aaa ab ab ab ba ba",
]


@pytest.fixture(scope="module")
def shard(shared_data):
    return shared_data / "pretrain" / "shard_00000.parquet"


@pytest.fixture(scope="module")
def real_texts(shard) -> list[str]:
    """The first row group (1024 documents) of a real pretraining shard."""
    return pq.ParquetFile(shard).read_row_group(0, columns=["text"]).column("text").to_pylist()


def reference_merges(texts: list[str], vocab_size: int, pattern: str) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair each step, merge the most frequent, ties to the smaller pair."""
    chunks = Counter(chunk for text in texts for chunk in regex.findall(pattern, text))
    words = {tuple(chunk.encode("utf-8")): n for chunk, n in chunks.items()}
    merges = []
    for new_id in range(256, vocab_size):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def merged_tokens(merges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of every token, ids 0.. in order, that a merge list defines."""
    tokens = [bytes([b]) for b in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    return tokens


def trained(texts, vocab_size, **kwargs) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


@pytest.mark.parametrize("texts, vocab_size", [
    (TRICKY_TEXTS, 330),
    (TRICKY_TEXTS * 3 + ["aaaa"] * 7, 300),
])
def test_merges_equal_pure_python_reference(texts, vocab_size):
    tok = trained(texts, vocab_size)
    expected = reference_merges(texts, vocab_size, rustbpe.DEFAULT_PATTERN)
    assert len(expected) > 30
    assert [token for token, _ in tok.get_mergeable_ranks()] == merged_tokens(expected)
    assert tok.vocab_size == 256 + len(expected)


def test_merges_equal_reference_on_real_text_with_gpt4_pattern(real_texts):
    texts = real_texts[:12]
    tok = trained(texts, 400, pattern=GPT4_PATTERN)
    assert tok.get_pattern() == GPT4_PATTERN
    tokens = [token for token, _ in tok.get_mergeable_ranks()]
    assert tokens == merged_tokens(reference_merges(texts, 400, GPT4_PATTERN))


def test_ranks_layout_and_default_pattern():
    tok = rustbpe.Tokenizer()
    assert tok.vocab_size == 256
    assert r"\p{N}{1,2}" in tok.get_pattern()
    tok = trained(TRICKY_TEXTS, 280)
    ranks = tok.get_mergeable_ranks()
    assert [rank for _, rank in ranks] == list(range(280))
    assert all(isinstance(token, bytes) for token, _ in ranks)
    assert [token for token, _ in ranks[:256]] == [bytes([b]) for b in range(256)]


def test_small_buffers_stream_to_the_same_merges(real_texts):
    texts = real_texts[:40]
    whole = trained(texts, 600)
    streamed = trained((t for t in texts), 600, buffer_size=3)
    assert whole.get_mergeable_ranks() == streamed.get_mergeable_ranks()


def test_encode_decode_round_trip_and_match_tiktoken(real_texts):
    texts = real_texts[:60]
    tok = trained(texts[:40], 1000)
    enc = tiktoken.Encoding("test", pat_str=tok.get_pattern(),
                            mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
    for text in texts[40:] + TRICKY_TEXTS + [""]:
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text)
        assert tok.decode(ids) == text
    batch = texts[40:] + TRICKY_TEXTS
    encoded = tok.batch_encode(batch)
    assert encoded == [tok.encode(t) for t in batch]
    assert tok.batch_decode(encoded) == batch


def test_huge_vocab_size_stops_when_pairs_run_out():
    tok = trained(["abcabc"], 2**40)
    assert tok.vocab_size == 256 + 3


def test_decode_of_partial_utf8_is_replacement_char():
    tok = rustbpe.Tokenizer()
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


class Boom(Exception):
    pass


def exploding():
    yield "fine text"
    raise Boom("from the iterator")


@pytest.mark.parametrize("call, error, message", [
    (lambda t: t.train_from_iterator(iter(["a"]), 100), ValueError, "vocab_size must be at least 256"),
    (lambda t: t.train_from_iterator(iter(["a"]), -5), ValueError, "vocab_size must be at least 256"),
    (lambda t: t.train_from_iterator(iter(["a"]), 300, pattern="(unclosed"), ValueError, "does not compile"),
    (lambda t: t.train_from_iterator(iter(["a", 7]), 300), TypeError, "item 1 is int"),
    (lambda t: t.train_from_iterator(iter(["a"]), 300, buffer_size=0), ValueError, "buffer_size"),
    (lambda t: t.train_from_iterator(42, 300), TypeError, "not iterable"),
    (lambda t: t.train_from_iterator(exploding(), 300), Boom, "from the iterator"),
    (lambda t: t.decode([256]), ValueError, "out of range"),
    (lambda t: t.batch_decode([[1], [999]]), ValueError, "token id 999"),
])
def test_errors_are_python_exceptions(call, error, message):
    with pytest.raises(error, match=message):
        call(rustbpe.Tokenizer())


def test_failed_training_keeps_the_previous_vocabulary():
    tok = trained(TRICKY_TEXTS, 300)
    before = tok.get_mergeable_ranks()
    with pytest.raises(Boom):
        tok.train_from_iterator(exploding(), 300)
    assert tok.get_mergeable_ranks() == before


def test_encoding_releases_the_gil(real_texts):
    tok = trained(real_texts[:50], 600)
    texts = real_texts[:128]
    while True:  # enough text for one call to take a while on this machine
        start = time.perf_counter()
        tok.batch_encode(texts)
        if time.perf_counter() - start > 0.2:
            break
        texts = texts * 2
    window = {}

    def encode_all():
        window["start"] = time.perf_counter()
        tok.batch_encode(texts)
        window["end"] = time.perf_counter()

    worker = threading.Thread(target=encode_all)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    start, end = window["start"], window["end"]
    middle = [t for t in ticks if start + 0.25 * (end - start) < t < end - 0.25 * (end - start)]
    # Holding the GIL through the call would freeze this thread for the whole window.
    assert len(middle) >= 5, (end - start, len(middle))


def _encode_in_child(queue):
    tok = trained(TRICKY_TEXTS, 300)
    queue.put(tok.batch_encode(TRICKY_TEXTS * 4) == [tok.encode(t) for t in TRICKY_TEXTS * 4])


def test_parallel_work_still_runs_after_fork():
    # The parent's thread pool exists before the fork; the child must build its own instead of hanging.
    trained(TRICKY_TEXTS, 300).batch_encode(TRICKY_TEXTS * 4)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung in batch_encode")
    assert child.exitcode == 0, "the forked child crashed"
    assert queue.get(timeout=5) is True


@pytest.fixture(scope="session")
def reference_package(tmp_path_factory):
    target = tmp_path_factory.mktemp("ref_rustbpe")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "rustbpe"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"pip could not install the reference rustbpe package: {result.stderr.strip()[-300:]}")
    return target


REFERENCE_SCRIPT = """
import base64, sys
import pyarrow.parquet as pq
import rustbpe
texts = pq.ParquetFile(sys.argv[1]).read_row_group(0, columns=["text"]).column("text").to_pylist()
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(texts), int(sys.argv[2]), pattern=sys.argv[3])
for token, rank in tok.get_mergeable_ranks():
    print(base64.b64encode(token).decode(), rank)
"""


@pytest.mark.slow
def test_merges_equal_the_reference_package_on_a_real_shard(reference_package, shard, real_texts, tmp_path):
    # The reference's module is also called rustbpe, so it runs in its own interpreter.
    vocab_size = 4096
    result = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, str(shard), str(vocab_size), rustbpe.DEFAULT_PATTERN],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(reference_package)})
    assert result.returncode == 0, result.stderr[-2000:]
    ours = trained(real_texts, vocab_size)
    ours_lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ours.get_mergeable_ranks()]
    assert result.stdout.splitlines() == ours_lines
