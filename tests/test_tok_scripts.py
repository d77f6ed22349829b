"""scripts.tok_train and scripts.tok_eval on real shards in a temporary base dir."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.tokenizer import Tokenizer
from scripts import tok_eval, tok_train


def write_shard(path, texts):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1024)


@pytest.fixture
def real_shards(base_dir, shared_data):
    """Two sources side by side: two real training shards and the real validation shard under climbmix/, one
    other training shard and a validation shard under fineweb/."""
    for source, indexes in (("climbmix", (0, 1, 12)), ("fineweb", (2, 3))):
        data = base_dir / "base_data" / source
        data.mkdir(parents=True)
        for index in indexes:
            shutil.copy(shared_data / "pretrain" / f"shard_{index:05d}.parquet", data)
    return base_dir / "base_data"


def test_tok_train_then_tok_eval(real_shards, base_dir, capsys):
    with pytest.raises(UserError, match=r"several sources \(climbmix, fineweb\); pick one with --data_source"):
        tok_train.main(["--vocab_size=700"])
    tok_train.main(["--vocab_size=700", "--max_chars=400000", "--doc_cap=5000", "--data_source=climbmix"])
    tok = Tokenizer.load(base_dir / "tokenizer")
    assert tok.vocab_size == 700
    meta = json.loads((base_dir / "tokenizer" / "tokenizer.json").read_text())
    assert meta["stats"]["train_chars"] == 400000 and meta["stats"]["data"] == "base_data/climbmix"
    assert meta["stats"]["chars_per_s"] > 0 and meta["stats"]["peak_rss_mb"] > 0
    section = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert "chars_per_s" in section and "wall_time_s" in section

    tok_train.main(["--vocab_size=300", "--max_chars=100000", f"--output_dir={base_dir / 'tokenizer_small'}",
                    "--data_source=climbmix"])
    capsys.readouterr()
    tok_eval.main(["--max_chars=50000"])
    out = capsys.readouterr().out
    assert "ours (700) bytes/token" in out and "tokenizer_small (300) bytes/token" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert {"climbmix train", "climbmix val", "fineweb train", "fineweb val", "prose", "code", "math",
            "non-English"} <= set(rows)
    # a bigger vocabulary packs more bytes into each token of the same text
    for label in ("climbmix train", "fineweb val"):
        cells = [float(cell) for cell in rows[label].strip("| ").split(" | ")[2:4]]
        assert cells[0] > cells[1] > 1.0
    for name in ("gpt2", "cl100k_base"):
        assert f"{name} bytes/token" in out or f"{name} left out" in out
    assert (base_dir / "report" / "tokenizer-evaluation.md").is_file()


def test_tok_train_reads_only_the_train_split_of_an_old_flat_base_data(base_dir):
    data = base_dir / "base_data"
    data.mkdir()
    write_shard(data / "shard_00000.parquet", ["the cat sat on the mat"] * 50)
    write_shard(data / "shard_00001.parquet", ["qqqq zzzz qqqq zzzz"] * 500)
    tok_train.main(["--vocab_size=300", "--max_chars=-1", "--doc_cap=-1"])
    tokens = Tokenizer.load(base_dir / "tokenizer").mergeable_ranks
    assert b" mat" in tokens
    assert not any(b"qq" in token or b"zz" in token for token in tokens)


def run_cli(module: str, *args: str, base_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={"NANOCHAT_BASE_DIR": str(base_dir), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(base_dir):
    result = run_cli("scripts.tok_train", "--vocab_size=100", base_dir=base_dir)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --vocab_size must be >= 265 (256 bytes + 9 special tokens), got 100"
    result = run_cli("scripts.tok_train", "--vocab_size=300", base_dir=base_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nanochat.dataset" in result.stderr and "%" not in result.stdout
    result = run_cli("scripts.tok_eval", base_dir=base_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "python -m scripts.tok_train" in result.stderr
