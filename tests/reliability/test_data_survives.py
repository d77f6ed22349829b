"""Data survives: damaged, truncated and empty shards and a text file named .parquet are named by the training
run before it learns anything from them; damaged local shards are downloaded again; non-UTF-8 corpora are refused
(or, inside a folder, skipped with a note)."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import main as dataset_main
from nanochat.download import download_shards
from nanochat.shards import shard_name, write_corpus_shards
from nanochat.tokenizer import Tokenizer
from scripts.base_train import main as base_train
from tests.training_fixtures import TINY_MODEL_ARGS, VOCAB_SIZE, read_real_docs

RUN_ARGS = [*TINY_MODEL_ARGS, "--depth=1", "--device_batch_size=2", "--total_batch_size=64", "--eval_every=-1",
            "--sample_every=-1", "--num_iterations=2", "--device_type=cpu"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, shared_data):
    """A base dir whose shards come from write_corpus_shards (so their pages carry checksums) plus a tokenizer."""
    directory = tmp_path_factory.mktemp("reliability_data")
    docs = read_real_docs(shared_data, 60)
    write_corpus_shards(docs, directory / "base_data", shard_mb=0.03)
    Tokenizer.train_from_iterator(docs, VOCAB_SIZE).save(directory / "tokenizer")
    return directory


def flip_bytes_mid_file(path):
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    for offset in range(start, start + 64):  # a run of bytes inside the first row group's data pages
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def empty(path):
    path.write_bytes(b"")


def text_named_parquet(path):
    path.write_text("<html>rate limited, try again later</html>\n")


def no_rows(path):
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)


@pytest.mark.parametrize("damage", [flip_bytes_mid_file, truncate, empty, text_named_parquet, no_rows])
def test_training_names_the_damaged_shard_and_trains_nothing(pristine, tmp_path, monkeypatch, damage):
    base = tmp_path / "base"
    shutil.copytree(pristine, base)
    damage(base / "base_data" / shard_name(0))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with pytest.raises(UserError, match=rf"{base / 'base_data' / shard_name(0)}.*(make|remake|delete)"):
        base_train([*RUN_ARGS, "--model_tag=damaged"])
    assert not list((base / "base_checkpoints").glob("damaged/step_*"))


def test_intact_shards_train(pristine, tmp_path, monkeypatch):
    """The control for the test above: the same copy, undamaged, trains."""
    base = tmp_path / "base"
    shutil.copytree(pristine, base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    base_train([*RUN_ARGS, "--model_tag=intact"])
    assert (base / "base_checkpoints" / "intact" / "step_000002" / "meta.json").is_file()


def test_download_fetches_damaged_local_shards_again(pristine, tmp_path, file_server):
    served = pristine / "base_data"
    shards = sorted(served.glob("shard_*.parquet"))
    server = file_server(served)
    local = tmp_path / "base_data"
    local.mkdir()
    for damage, shard in zip([truncate, empty, text_named_parquet], shards):
        shutil.copy(shard, local / shard.name)
        damage(local / shard.name)
    last = len(shards) - 1
    paths = download_shards(last, url_template=server.url("shard_{index:05d}.parquet"), num_workers=2,
                            val_index=last, directory=local, retries=0)
    assert [p.name for p in paths] == [s.name for s in shards]
    for shard in shards:
        assert (local / shard.name).read_bytes() == shard.read_bytes()
        assert server.requests_for(shard.name) == 1


def test_a_served_shard_that_is_not_parquet_is_refused_by_name(tmp_path, file_server):
    served = tmp_path / "served"
    served.mkdir()
    for index in range(2):
        text_named_parquet(served / shard_name(index))
    server = file_server(served)
    with pytest.raises(UserError, match=r"could not download .*shard_00000\.parquet.*failed validation"):
        download_shards(1, url_template=server.url("shard_{index:05d}.parquet"), num_workers=1, val_index=1,
                        directory=tmp_path / "local", retries=1, backoff_s=0)
    assert not list((tmp_path / "local").glob("*.parquet"))


def test_non_utf8_named_file_is_refused(base_dir, tmp_path):
    latin1 = tmp_path / "notes.txt"
    latin1.write_bytes("caf\u00e9 au lait, a document in latin-1".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{latin1} is not UTF-8 text.*iconv"):
        dataset_main(["--from_text", str(latin1)])
    assert not list(base_dir.rglob("*.parquet"))


def test_non_utf8_file_in_a_folder_is_skipped_with_a_note(base_dir, tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(4):
        (folder / f"good_{index}.txt").write_text(f"document number {index} is plain UTF-8 text. " * 20)
    (folder / "bad.txt").write_bytes(b"\xff\xfe broken \x80 bytes " * 20)
    dataset_main(["--from_text", str(folder), "--shard_mb=0.001"])
    assert "skipped 1 non-UTF-8 files" in capsys.readouterr().err
    texts = [t for p in sorted((base_dir / "base_data" / "custom").glob("*.parquet"))
             for t in pq.read_table(p).column("text").to_pylist()]
    assert len(texts) == 4 and all(t.startswith("document number") for t in texts)


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "is not UTF-8 text"),
    (b'{"text": "fine"}\n{"text": "\\ud800 lone surrogate"}\n', "not valid Unicode"),
])
def test_non_utf8_jsonl_is_refused_by_name(base_dir, tmp_path, content, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(content)
    with pytest.raises(UserError, match=rf"{corpus}.*{message}"):
        dataset_main(["--from_jsonl", str(corpus)])
