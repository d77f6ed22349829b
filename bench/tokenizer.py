"""Tokenizer training and encoding speed: our rustbpe against the reference `rustbpe` package (PyPI) and
HuggingFace `tokenizers`, same corpus, same split pattern, same vocab sizes, in one run.

    python -m bench.tokenizer                      # 50M chars of ../shared/data/pretrain, vocab 8192/32768/65536
    python -m bench.tokenizer --min_chars 5000000 --vocab_sizes 4096
    python -m bench.tokenizer --pretrain_dir PATH/TO/shared/data/pretrain   # from a checkout elsewhere

Every trainer runs in its own interpreter (the reference's module is also called `rustbpe`; separate processes
also give each its own peak RSS). Prints wall and CPU seconds, peak RSS above the loaded corpus, the ratio
reference/ours, and whether our merges equal the reference's. Then encoding throughput: our `encode` /
`batch_encode` against tiktoken built from the same ranks, one thread and all threads.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT.parent / "shared" / "data" / "pretrain"
TRAINERS = ("ours", "reference", "hf")
REFERENCE_VERSION = "0.1.0"  # the PyPI `rustbpe` whose merges tests/test_rustbpe.py pins
HF_VERSION = "0.23.3"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) from /proc: unlike ru_maxrss, the peak is not inherited over fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e3
    raise RuntimeError(f"{field} not in /proc/self/status")


def read_corpus(path: str) -> list[str]:
    # one JSON string per line: reading never holds a second copy of the corpus, so the peak RSS
    # measured after loading belongs to the trainer
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def ranks_digest(ranks) -> str:
    digest = hashlib.sha256()
    for token, rank in sorted(ranks, key=lambda item: item[1]):
        digest.update(base64.b64encode(token) + b" %d\n" % rank)
    return digest.hexdigest()


def train_worker(trainer: str, corpus: str, vocab_size: int, pattern: str) -> dict:
    """Runs in a fresh interpreter: one training run, measured."""
    texts = read_corpus(corpus)
    base_rss = memory_mb("VmRSS")
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    if trainer == "hf":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf_trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, hf_trainer)
        digest, size = "-", tok.get_vocab_size()
    else:
        import rustbpe
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
        ranks = tok.get_mergeable_ranks()
        digest, size = ranks_digest(ranks), len(ranks)
    return {"wall_s": time.perf_counter() - start_wall, "cpu_s": cpu_seconds() - start_cpu,
            "peak_rss_mb": memory_mb("VmHWM") - base_rss, "vocab": size, "digest": digest}


def encode_worker(corpus: str, vocab_size: int, pattern: str) -> dict:
    """Our encode vs tiktoken's with the same ranks, on the whole corpus; training time not counted."""
    import rustbpe
    import tiktoken
    texts = read_corpus(corpus)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts[: len(texts) // 4]), vocab_size, pattern=pattern)
    enc = tiktoken.Encoding("bench", pat_str=pattern, mergeable_ranks=dict(tok.get_mergeable_ranks()),
                            special_tokens={})
    threads = os.cpu_count() or 1
    runs = {
        "tiktoken 1 thread": lambda: [enc.encode_ordinary(t) for t in texts],
        "ours 1 thread": lambda: [tok.encode(t) for t in texts],
        f"tiktoken {threads} threads": lambda: enc.encode_ordinary_batch(texts, num_threads=threads),
        f"ours {threads} threads": lambda: tok.batch_encode(texts),
    }
    results, reference, identical = {}, None, True
    for name, run in runs.items():
        start = time.perf_counter()
        ids = run()
        results[name] = num_bytes / (time.perf_counter() - start) / 1e6
        # keep one output only: four copies of the corpus as Python ints would crowd later runs
        if reference is None:
            reference = ids
        identical = identical and ids == reference
        del ids
    return {"mb_per_s": results, "identical": identical, "threads": threads}


def run_worker(args: list[str], env: dict | None = None) -> dict:
    result = subprocess.run([sys.executable, "-m", "bench.tokenizer", *args], capture_output=True, text=True,
                            cwd=ROOT if env is None else tempfile.gettempdir(), env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"error: worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def install(requirement: str, deps_dir: Path) -> Path:
    """pip-install a pinned package into its own directory (the reference's module name clashes with ours)."""
    target = deps_dir / requirement.replace("==", "-")
    if not target.is_dir():
        print(f"installing {requirement} into {target}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), requirement],
                       check=True)
    return target


def write_corpus(pretrain_dir: Path, min_chars: int, path: Path) -> tuple[int, int]:
    """Documents of the pretraining shards (repeated if needed) until min_chars, one JSON string a line."""
    import pyarrow.parquet as pq
    shards = sorted(pretrain_dir.glob("shard_*.parquet"))
    if not shards:
        sys.exit(f"error: no shards in {pretrain_dir}; pass --pretrain_dir")
    docs, total = [], 0
    while total < min_chars:
        for shard in shards:
            for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
                docs.append(text)
                total += len(text)
            if total >= min_chars:
                break
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    return len(docs), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min_chars", type=int, default=50_000_000, help="corpus size in characters")
    parser.add_argument("--pretrain_dir", default=str(PRETRAIN), help="folder of shard_*.parquet files")
    parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--encode_vocab_size", type=int, default=32768, help="0 = skip the encoding benchmark")
    parser.add_argument("--deps_dir", default=str(Path(tempfile.gettempdir()) / "nanochat_bench_deps"))
    parser.add_argument("--worker", choices=("train", "encode"), help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--vocab_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "train":
        print(json.dumps(train_worker(args.trainer, args.corpus, args.vocab_size, args.pattern)))
        return
    if args.worker == "encode":
        print(json.dumps(encode_worker(args.corpus, args.vocab_size, args.pattern)))
        return

    from nanochat.tokenizer import SPLIT_PATTERN as pattern
    deps_dir = Path(args.deps_dir)
    paths = {"ours": None, "reference": install(f"rustbpe=={REFERENCE_VERSION}", deps_dir),
             "hf": install(f"tokenizers=={HF_VERSION}", deps_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        num_docs, num_chars = write_corpus(Path(args.pretrain_dir), args.min_chars, corpus)
        print(f"corpus: {num_docs:,} documents, {num_chars / 1e6:.1f}M chars; {os.cpu_count()} CPUs; "
              f"pattern {pattern}", flush=True)
        print("| vocab | trainer | wall s | cpu s | peak RSS MB | reference/ours wall | merges = reference |")
        print("|---:|---|---:|---:|---:|---:|---|")
        for vocab_size in args.vocab_sizes:
            results = {}
            for trainer in args.trainers:
                env = None if paths[trainer] is None else {"PYTHONPATH": f"{paths[trainer]}:{ROOT}"}
                results[trainer] = run_worker(["--worker", "train", "--trainer", trainer, "--corpus", str(corpus),
                                               "--vocab_size", str(vocab_size), "--pattern", pattern], env)
            for trainer, r in results.items():
                ratio = same = ""
                if trainer == "ours" and "reference" in results:
                    ratio = f"{results['reference']['wall_s'] / r['wall_s']:.2f}x"
                    same = str(r["digest"] == results["reference"]["digest"])
                print(f"| {vocab_size} | {trainer} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                      f"{ratio} | {same} |", flush=True)
        if args.encode_vocab_size:
            r = run_worker(["--worker", "encode", "--corpus", str(corpus), "--vocab_size",
                            str(args.encode_vocab_size), "--pattern", pattern])
            speeds = r["mb_per_s"]
            print(f"\nencoding ({num_chars / 1e6:.0f}M chars, vocab {args.encode_vocab_size}), identical ids: "
                  f"{r['identical']}")
            for name, mb_per_s in speeds.items():
                print(f"- {name}: {mb_per_s:.1f} MB/s")
            one = speeds["ours 1 thread"] / speeds["tiktoken 1 thread"]
            many = speeds[f"ours {r['threads']} threads"] / speeds[f"tiktoken {r['threads']} threads"]
            print(f"- ours/tiktoken: {one:.2f}x at 1 thread, {many:.2f}x at {r['threads']} threads")


if __name__ == "__main__":
    main()
