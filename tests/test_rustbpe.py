"""The rustbpe crate through Python: merges equal a pure-Python reference trainer and the reference package,
encode/decode, errors, logging, Ctrl-C, memory, and parity with the reference package's behaviour."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import venv
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import regex
import rustbpe
import tiktoken

from nanochat.tokenizer import SPLIT_PATTERN


GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
REFERENCE_VERSION = "0.1.0"  # the PyPI `rustbpe` the golden digests below were computed with

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


@pytest.fixture(scope="module")
def shard_texts(shard) -> list[str]:
    """All of a real pretraining shard: 1226 documents, 7.8M characters."""
    return pq.read_table(shard, columns=["text"]).column("text").to_pylist()


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
    tok = trained(texts, vocab_size)  # pattern=None: GPT-4's, as in the reference package
    assert tok.get_pattern() == GPT4_PATTERN == rustbpe.GPT4_PATTERN
    expected = reference_merges(texts, vocab_size, GPT4_PATTERN)
    assert len(expected) > 30
    assert [token for token, _ in tok.get_mergeable_ranks()] == merged_tokens(expected)
    assert tok.vocab_size == 256 + len(expected)


def test_merges_equal_reference_on_real_text_with_nanochat_pattern(real_texts):
    texts = real_texts[:12]
    pattern = SPLIT_PATTERN
    assert pattern == GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
    tok = trained(texts, 400, pattern=pattern)
    assert tok.get_pattern() == pattern
    tokens = [token for token, _ in tok.get_mergeable_ranks()]
    assert tokens == merged_tokens(reference_merges(texts, 400, pattern))


def test_nanochat_passes_its_own_pattern():
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.train_from_iterator(TRICKY_TEXTS, 300)
    assert tok.pattern == SPLIT_PATTERN
    assert tok.encode("12345") == tok.encode("12") + tok.encode("34") + tok.encode("5")


def test_untrained_tokenizer_is_the_references():
    # The reference starts with an empty pattern, which matches no text: encode gives no ids until training.
    tok = rustbpe.Tokenizer()
    assert tok.vocab_size == 256
    assert tok.get_pattern() == ""
    assert tok.encode("hello world") == []
    assert tok.decode([104, 105]) == "hi"


def test_ranks_layout():
    tok = trained(TRICKY_TEXTS, 280)
    ranks = tok.get_mergeable_ranks()
    assert [rank for _, rank in ranks] == list(range(280))
    assert all(isinstance(token, bytes) for token, _ in ranks)
    assert [token for token, _ in ranks[:256]] == [bytes([b]) for b in range(256)]


@pytest.mark.parametrize("buffer_size", [3, 200])
def test_streamed_batches_give_the_same_merges(shard_texts, buffer_size):
    # 3: batches small enough to count on the calling thread; 200 (~1 MB): each counted on other threads
    # while the next is pulled from the generator.
    whole = trained(shard_texts, 600)
    streamed = trained((t for t in shard_texts), 600, buffer_size=buffer_size)
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


def test_decode_of_partial_utf8_raises_unicode_decode_error():
    # The reference means to raise UnicodeDecodeError here (a bug makes its exception a TypeError).
    tok = rustbpe.Tokenizer()
    with pytest.raises(UnicodeDecodeError) as caught:
        tok.decode([104] + list("é".encode())[:1])
    assert (caught.value.object, caught.value.start, caught.value.end) == (b"h\xc3", 1, 2)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(UnicodeDecodeError):
        tok.batch_decode([[104], [0xff]])


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
    (lambda t: t.train_from_iterator(iter(["a", "lone \ud800"]), 300), UnicodeEncodeError, "surrogates not allowed"),
    (lambda t: t.train_from_iterator(iter(["a"]), 300, buffer_size=0), ValueError, "buffer_size"),
    (lambda t: t.train_from_iterator(42, 300), TypeError, "not iterable"),
    (lambda t: t.train_from_iterator(exploding(), 300), Boom, "from the iterator"),
    (lambda t: t.decode([256]), ValueError, "^Unknown token id: 256$"),
    (lambda t: t.decode([-1]), OverflowError, "out of range"),
    (lambda t: t.batch_decode([[1], [999]]), ValueError, "^Unknown token id: 999$"),
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



def test_progress_goes_to_python_logging(caplog):
    with caplog.at_level(logging.INFO, logger="rustbpe"):
        trained(TRICKY_TEXTS, 300)
    messages = [r.getMessage() for r in caplog.records if r.name == "rustbpe"]
    assert messages[0] == "Processing sequences from iterator (buffer_size: 8192)"
    assert f"Processed {len(TRICKY_TEXTS)} sequences total" in messages[1]
    assert "Starting BPE training: 44 merges to compute" in messages
    assert any(m.startswith("Progress: 50% (22/44 merges) - Last merge: (") for m in messages)
    assert messages[-1] == "Finished training: 44 merges completed"


def run_child(script: str, *args: str, timeout: float = 300) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


# One chunk of 2M random letters: every merge rescans all of it, so the merge loop would run for many minutes.
ENDLESS_TRAINING = """
import logging, random, sys, rustbpe
class Ready(logging.Handler):
    def emit(self, record):
        if record.getMessage() == "Starting merge loop":
            print("merging", flush=True)
logger = logging.getLogger("rustbpe")
logger.addHandler(Ready())
logger.setLevel(logging.INFO)
rng = random.Random(0)
text = "".join(rng.choices("abcdefghij", k=2_000_000))
tok = rustbpe.Tokenizer()
try:
    tok.train_from_iterator([text], 2**31)
except KeyboardInterrupt:
    print("interrupted", tok.vocab_size, flush=True)
    sys.exit(0)
print("finished", flush=True)
"""


def test_ctrl_c_stops_training_promptly():
    child = run_child(ENDLESS_TRAINING)
    try:
        assert child.stdout.readline() == "merging\n", child.stderr.read()
        time.sleep(0.5)  # into the merge loop proper
        child.send_signal(signal.SIGINT)
        sent = time.perf_counter()
        out, err = child.communicate(timeout=120)
        stopped_after = time.perf_counter() - sent
    finally:
        child.kill()
    assert out == "interrupted 256\n", err[-2000:]
    # The loop looks every 0.1 s; the bound is loose only for a loaded machine.
    assert stopped_after < 10, stopped_after


# Peak memory (MB above the loaded corpus) of a training on ~5 MB of distinct words; vocab_size 2**40 is
# interrupted 0.2 s into its merge loop.
PEAK_MEMORY = """
import base64, logging, os, random, signal, sys, threading, rustbpe
def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e3 for line in f if line.startswith(field + ":"))
letters = base64.b32encode(random.Random(0).randbytes(3_000_000)).decode().lower()
texts = [" ".join(letters[i:i + 8] for i in range(start, start + 48_000, 8))
         for start in range(0, len(letters), 48_000)]
class StopSoon(logging.Handler):
    def emit(self, record):
        if record.getMessage() == "Starting merge loop":
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
logger = logging.getLogger("rustbpe")
logger.addHandler(StopSoon())
logger.setLevel(logging.INFO)
base = rss_mb("VmRSS")
try:
    rustbpe.Tokenizer().train_from_iterator(texts, int(sys.argv[1]))
except KeyboardInterrupt:
    pass
print(rss_mb("VmHWM") - base)
"""


@pytest.mark.slow
def test_memory_is_bounded_by_the_data_not_the_vocab_size():
    peaks = {}
    for vocab_size in (300, 2**40):
        child = run_child(PEAK_MEMORY, str(vocab_size))
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
        peaks[vocab_size] = float(out)
    # Tables sized by the request (or by the ~5M ids it could merge) would add hundreds of MB.
    assert peaks[2**40] < peaks[300] + 60, peaks


def ranks_digest(ranks) -> str:
    """sha256 of the ranks as tiktoken's file lists them (`base64 rank` per line), the bench's digest."""
    digest = hashlib.sha256()
    for token, rank in sorted(ranks, key=lambda item: item[1]):
        digest.update(base64.b64encode(token) + b" %d\n" % rank)
    return digest.hexdigest()


# The reference package's merges on all of shard_00000, pattern=None (GPT-4's), computed with rustbpe==0.1.0:
# `RUSTBPE_REFERENCE_PYTHON=/path/to/python pytest tests/test_rustbpe.py -k reference_package` recomputes them.
GOLDEN_DIGESTS = {
    8192: "24ca1aa419b729f8b3e7b1c74e408fff32a8204e349bf221a8c2356dbb328359",
    32768: "87230507ba22cb6db4f4422707f68a741335a29701e75fa98eb548b7b56b029c",
    65536: "dcd99dcfac117bb6693d5e9427822b87e4ab0d0a8f827eda62f2e0504b9d54aa",
}


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", sorted(GOLDEN_DIGESTS))
def test_merges_equal_the_reference_packages_golden_digests(shard_texts, vocab_size):
    assert ranks_digest(trained(shard_texts, vocab_size).get_mergeable_ranks()) == GOLDEN_DIGESTS[vocab_size]


REFERENCE_SCRIPT = """
import base64, hashlib, importlib.metadata, json, sys
import rustbpe
texts = json.load(open(sys.argv[1]))
print(importlib.metadata.version("rustbpe"))
for vocab_size in json.loads(sys.argv[2]):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size)
    digest = hashlib.sha256()
    for token, rank in sorted(tok.get_mergeable_ranks(), key=lambda item: item[1]):
        digest.update(base64.b64encode(token) + b" %d\\n" % rank)
    print(vocab_size, digest.hexdigest(), flush=True)
"""


@pytest.mark.slow
def test_merges_equal_the_reference_package_live(shard_texts, tmp_path):
    # The reference's module is also called rustbpe, so it runs in its own interpreter: RUSTBPE_REFERENCE_PYTHON,
    # or a venv made here with the pinned version from the package index
    python = os.environ.get("RUSTBPE_REFERENCE_PYTHON")
    if not python:
        venv.create(tmp_path / "reference", with_pip=True)
        python = str(tmp_path / "reference" / "bin" / "python")
        install = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  f"rustbpe=={REFERENCE_VERSION}"], capture_output=True, text=True, timeout=600)
        if install.returncode != 0:
            pytest.skip(f"package index not reachable for rustbpe=={REFERENCE_VERSION}: "
                        f"{(install.stderr.strip().splitlines() or ['no output'])[-1]}")
    corpus = tmp_path / "texts.json"
    corpus.write_text(json.dumps(shard_texts))
    result = subprocess.run([python, "-c", REFERENCE_SCRIPT, str(corpus), json.dumps(sorted(GOLDEN_DIGESTS))],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900, env={})
    assert result.returncode == 0, result.stderr[-2000:]
    version, *lines = result.stdout.splitlines()
    assert version == REFERENCE_VERSION
    reference = {int(size): digest for size, digest in (line.split() for line in lines)}
    assert reference == GOLDEN_DIGESTS
