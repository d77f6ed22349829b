"""nanochat.dataset: shard download against a loopback server, shards from a user's corpus, clear errors."""
from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, download, shards
from nanochat.common import UserError
from nanochat.download import DownloadError
from tests.pipeline_mirror import build_mirror


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_download_shards_with_faults(base_dir, shared_data, file_server):
    server = file_server(shared_data / "pretrain")
    server.add_faults("shard_00000.parquet", "503")
    server.add_faults("shard_00001.parquet", "cut", "bad_length")
    server.add_faults("shard_00012.parquet", "truncate")
    template = server.url("shard_{index:05d}.parquet")
    paths = download.download_shards(2, url_template=template, num_workers=2, val_index=12, backoff_s=0.01)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00012.parquet"]
    assert names(base_dir / "base_data" / "climbmix") == [p.name for p in paths]
    for path in paths:
        assert path.read_bytes() == (shared_data / "pretrain" / path.name).read_bytes()
    assert [p.name for p in shards.split_shards("val")] == ["shard_00012.parquet"]
    # Valid shards are skipped; a damaged one is fetched again.
    paths[1].write_bytes(b"PAR1 not really")
    before = len(server.requests)
    download.download_shards(2, url_template=template, num_workers=2, val_index=12, backoff_s=0.01)
    assert [name for name, _ in server.requests[before:]] == ["shard_00001.parquet"]
    assert shard_texts(paths[1]) == shard_texts(shared_data / "pretrain" / "shard_00001.parquet")


def test_download_failure_leaves_only_complete_shards(base_dir, shared_data, file_server):
    server = file_server(shared_data / "pretrain")
    server.add_faults("shard_00001.parquet", *["truncate"] * 3)
    with pytest.raises(DownloadError, match="shard_00001.parquet after 3 tries: .*failed validation"):
        download.download_shards(2, url_template=server.url("shard_{index:05d}.parquet"), num_workers=1,
                                 val_index=12, retries=2, backoff_s=0.01)
    left = names(base_dir / "base_data" / "climbmix")
    assert "shard_00001.parquet" not in left and not [n for n in left if n.endswith(".tmp")]
    for name in left:
        pq.ParquetFile(base_dir / "base_data" / "climbmix" / name)


def test_download_cli_uses_env_mirror(base_dir, shared_data, file_server, monkeypatch, capsys):
    server = file_server(shared_data / "pretrain")
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url("shard_{index:05d}.parquet"))
    dataset.main(["-n", "1", "-w", "2", "--val_index", "12"])
    assert names(base_dir / "base_data" / "climbmix") == ["shard_00000.parquet", "shard_00012.parquet"]
    assert "validation: shard_00012.parquet" in capsys.readouterr().out


def test_both_sources_download_into_their_own_directories_from_the_hub_mirror(base_dir, shared_data, file_server,
                                                                               monkeypatch, capsys):
    server = file_server(build_mirror(base_dir.parent / "mirror", shared_data))
    monkeypatch.setenv("HF_ENDPOINT", server.url().rstrip("/"))
    dataset.main(["--source", "fineweb", "-n", "2"])
    dataset.main(["-n", "1"])  # the default source is ClimbMix
    assert names(base_dir / "base_data" / "fineweb") == ["shard_00000.parquet", "shard_00001.parquet",
                                                          "shard_01822.parquet"]
    assert names(base_dir / "base_data" / "climbmix") == ["shard_00000.parquet", "shard_06542.parquet"]
    requested = {name for name, _ in server.requests}
    assert {"datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_01822.parquet",
            "datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_06542.parquet"} <= requested
    assert shards.sources_present() == ["climbmix", "fineweb"]
    assert [p.name for p in shards.split_shards("val", shards.data_dir("fineweb"))] == ["shard_01822.parquet"]
    with pytest.raises(UserError, match=r"several sources \(climbmix, fineweb\); pick one with --data_source"):
        shards.split_shards("train")
    with pytest.raises(UserError, match="--source fineweb downloads shards: say how many train shards with -n N"):
        dataset.main(["--source", "fineweb"])


def test_old_flat_base_data_is_read_alone_and_named_beside_a_new_source(base_dir, shared_data):
    flat = base_dir / "base_data"
    flat.mkdir()
    for index in (0, 12):
        (flat / f"shard_{index:05d}.parquet").symlink_to(shared_data / "pretrain" / f"shard_{index:05d}.parquet")
    assert shards.data_dir() == flat and [p.name for p in shards.split_shards("train")] == ["shard_00000.parquet"]
    (flat / "demo").mkdir()
    (flat / "demo" / "shard_00000.parquet").symlink_to(shared_data / "pretrain" / "shard_00001.parquet")
    with pytest.raises(UserError, match=r"several sources \(base_data/ itself \(old layout\), demo\)"):
        shards.data_dir()
    assert shards.data_dir("demo") == flat / "demo"


def test_bad_url_template_and_flags():
    with pytest.raises(UserError, match="must contain {index}"):
        download.resolve_url_template("http://127.0.0.1/shard.parquet")
    with pytest.raises(UserError, match="pick exactly one"):
        dataset.main(["-n", "2", "--source", "demo"])


def test_cli_error_is_one_line(base_dir):
    result = subprocess.run([sys.executable, "-m", "nanochat.dataset"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: pick exactly one of -n N, --from_text PATH, --from_jsonl PATH, --source demo"]


def test_from_text_folder_makes_shuffled_shards(base_dir, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = {f"doc {i}: " + "word " * (i % 50 + 1) for i in range(3000)}
    for i, doc in enumerate(sorted(docs)):
        (corpus / ("sub" if i % 2 else "") / f"{i}.txt").write_text(doc, encoding="utf-8")
    (corpus / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (corpus / "image.bin").write_bytes(b"\xff\xfe\x00binary")
    long_doc = "\n\n".join(f"paragraph {i} " + "x" * 900 for i in range(50))
    (tmp_path / "long.txt").write_text(long_doc, encoding="utf-8")
    dataset.main(["--from_text", str(corpus), str(tmp_path / "long.txt"), "--shard_mb", "0.1"])
    made = shards.list_shards()
    assert len(made) >= 3
    texts = [t for s in made for t in shard_texts(s)]
    long_pieces = [t for t in texts if t.startswith("paragraph")]
    assert docs <= set(texts) and "hidden" not in texts
    assert len(long_pieces) >= 3 and max(len(p) for p in long_pieces) <= shards.MAX_DOC_CHARS
    assert "\n\n".join(sorted(long_pieces, key=lambda p: int(p.split()[1]))) == long_doc
    for shard in made:
        parquet = pq.ParquetFile(shard)
        assert all(parquet.metadata.row_group(g).num_rows <= 1024 for g in range(parquet.num_row_groups))
    assert shard_texts(made[0])[:20] != sorted(docs)[:20]  # shuffled
    with pytest.raises(UserError, match="already has .* shards; pass --overwrite"):
        dataset.main(["--from_text", str(corpus)])
    first = shard_texts(made[0])
    dataset.main(["--from_text", str(corpus), str(tmp_path / "long.txt"), "--shard_mb", "0.1", "--overwrite"])
    assert shard_texts(made[0]) == first  # fixed seed: same order again


def test_from_jsonl_and_parquet(base_dir, tmp_path):
    rows = [{"body": f"row {i} text"} for i in range(30)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.table({"body": [f"parquet {i}" for i in range(10)]}), tmp_path / "b.parquet")
    dataset.main(["--from_jsonl", str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet"), "--field", "body"])
    texts = sorted(t for s in shards.list_shards() for t in shard_texts(s))
    assert texts == sorted([r["body"] for r in rows] + [f"parquet {i}" for i in range(10)])
    assert 3 <= len(shard_texts(shards.split_shards("val")[0])) <= 6  # ~10% of the corpus bytes


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"}\n{"other": 1}\n', r"a.jsonl:2 has no string field 'text' \(has \['other'\]\); name the"),
    ('{"text": "ok"}\nnot json\n', "a.jsonl:2 is not valid JSON"),
    ('{"text": "ok"}\n{"text": "lone \\ud800 surrogate"}\n', "a.jsonl:2 holds text that is not valid Unicode"),
])
def test_bad_jsonl_is_a_clear_error(base_dir, tmp_path, line, message):
    (tmp_path / "a.jsonl").write_text(line, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        dataset.main(["--from_jsonl", str(tmp_path / "a.jsonl")])
    assert shards.list_shards() == []


def test_odd_unicode_round_trips(base_dir, tmp_path):
    odd = ["emoji 🤖 and ZWJ 👩‍💻", "RTL שלום \u202e reversed", "combining e\u0301\u0301", "nul\x00byte",
           "CJK 漢字 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    for i, text in enumerate(odd):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    dataset.main(["--from_text", str(tmp_path)])
    assert sorted(t for s in shards.list_shards() for t in shard_texts(s)) == sorted(odd)


def test_no_or_empty_shards_name_the_command(base_dir):
    with pytest.raises(UserError, match="found 0; make shards with `python -m nanochat.dataset"):
        next(shards.iter_text_batches("train"))
    directory = base_dir / "base_data"
    directory.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), directory / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["v"]}), directory / "shard_00001.parquet")
    with pytest.raises(UserError, match="shard_00000.parquet is empty .*python -m nanochat.dataset"):
        next(shards.iter_text_batches("train"))


@pytest.mark.slow
def test_ctrl_c_mid_download_leaves_no_partial_shard(base_dir, shared_data, file_server):
    server = file_server(shared_data / "pretrain")
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_00012.parquet"):
        server.add_faults(name, "slow")
    process = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "-n", "2", "-w", "3", "--val_index", "12",
                                "--url_template", server.url("shard_{index:05d}.parquet")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    data = base_dir / "base_data" / "climbmix"
    deadline = time.monotonic() + 60
    while not (data.is_dir() and any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in data.iterdir())):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert list(data.iterdir()) == []
