"""PretrainLoader: best-fit packing (continue and crop), row starts, doc ids, token counts, rank split, exact resume
(also under torchrun), and the waste bound on the real shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import UserError
from nanochat.dataloader import (PretrainLoader, dropped_percent, measure_shard_yield, repeat_warning,
                                 train_shards_needed)
from nanochat.shards import read_row_group
from nanochat.tokenizer import Tokenizer

ROW_GROUP = 10


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """Real pretraining text cut small: 2 train shards of 6 row groups each and a val shard of 3."""
    texts = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet").read_row_group(0).column("text")
    docs = [t[: 100 + 37 * i % 700] for i, t in enumerate(texts.to_pylist()[:150])]
    directory = tmp_path_factory.mktemp("loader_shards")
    for index, part in enumerate((docs[:60], docs[60:120], docs[120:150])):
        pq.write_table(pa.table({"text": part}), directory / f"shard_{index:05d}.parquet", row_group_size=ROW_GROUP)
    tokenizer = Tokenizer.train_from_iterator(docs, vocab_size=400)
    return directory, tokenizer


def make(corpus, **kwargs):
    directory, tokenizer = corpus
    kwargs = {"batch_size": 3, "seq_len": 64, "buffer_docs": 8, "directory": directory, **kwargs}
    return PretrainLoader(tokenizer, **kwargs)


def document_tokens(corpus, groups):
    directory, tokenizer = corpus
    return {tuple(tokenizer.encode(text, prepend=tokenizer.bos_token_id))
            for path, group in groups for text in read_row_group(path, group)}


def segments(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos]
    return [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def rows_of(batch) -> list[list[int]]:
    inputs, targets = batch[0], batch[1]
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def pieces_of(row: list[int], ids: list[int]) -> list[list[int]]:
    """The row cut where doc_ids change (the last position's id is the one before it or a new piece)."""
    cuts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(row)]
    return [row[a:b] for a, b in zip(cuts, cuts[1:])]


def stitched_documents(loader, num_batches: int, bos: int) -> tuple[list[tuple], int]:
    """Rebuild documents from the rows: a row that does not open with BOS must continue the previous row's last
    piece, repeating its last token (a lone BOS at a row end continues into a row that opens with the rest)."""
    docs, previous_last, continuations = [], None, 0
    for _ in range(num_batches):
        batch = next(loader)
        inputs, targets, doc_ids = batch
        ids = torch.cat([doc_ids, doc_ids[:, -1:]], dim=1).tolist()
        for row, row_ids in zip(rows_of(batch), ids):
            pieces = pieces_of(row, row_ids)
            for number, piece in enumerate(pieces):
                assert (piece[0] == bos) or number == 0, "only a row's first piece may start without BOS"
            first = pieces[0]
            continues = previous_last is not None and (first[0] != bos or previous_last == [bos])
            if continues:
                assert first[0] == previous_last[-1], "a continuation repeats the last token placed before it"
                docs[-1] = docs[-1] + tuple(first[1:])
                continuations += 1
            else:
                docs.append(tuple(first))
            docs += [tuple(piece) for piece in pieces[1:]]
            previous_last = pieces[-1]
    return docs[:-1], continuations  # the last may continue beyond the batches taken


def test_continue_rows_start_at_a_document_or_its_continuation_and_drop_nothing(corpus):
    loader = make(corpus, doc_mask=True)
    bos = corpus[1].bos_token_id
    docs = document_tokens(corpus, loader.groups)
    stitched, continuations = stitched_documents(loader, 15, bos)
    assert continuations > 0  # rows of 65 tokens split the longer documents
    assert all(doc in docs for doc in stitched)  # every piece put back together is a whole real document
    stats = loader.stats()
    assert stats["tokens_dropped"] == 0
    assert stats["tokens_trained"] == 15 * 3 * 65 - continuations  # each continuation repeats one token


def test_crop_rows_are_whole_documents_plus_one_crop(corpus):
    loader = make(corpus, packing="crop")
    bos = corpus[1].bos_token_id
    docs = document_tokens(corpus, loader.groups)
    cropped = 0
    for _ in range(15):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (3, 64) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            assert row[0] == bos
            *whole, last = segments(row, bos)
            assert all(segment in docs for segment in whole)
            if last not in docs:
                assert any(doc[:len(last)] == last for doc in docs)
                cropped += 1
    assert cropped > 0  # the data has documents longer than the space left in a row
    stats = loader.stats()
    assert stats["tokens_dropped"] > 0
    assert stats["tokens_trained"] == 15 * 3 * 65


@pytest.mark.parametrize("packing", ["continue", "crop"])
def test_doc_ids_number_pieces_within_each_row(corpus, packing):
    loader = make(corpus, doc_mask=True, packing=packing)
    bos = corpus[1].bos_token_id
    for _ in range(5):
        inputs, targets, doc_ids = next(loader)
        assert doc_ids.shape == inputs.shape
        for tokens, ids in zip(inputs.tolist(), doc_ids.tolist()):
            expected, current = [], -1 if tokens[0] == bos else 0  # a continuation opens a row as piece 0
            for token in tokens:
                current += token == bos
                expected.append(current)
            assert ids == expected


@pytest.mark.parametrize("packing", ["continue", "crop"])
@pytest.mark.parametrize("split_at, total", [(10, 20), (90, 200)])
def test_exact_resume(corpus, split_at, total, packing):
    straight = make(corpus, doc_mask=True, packing=packing)
    reference = [next(straight) for _ in range(total)]
    assert straight.state_dict()["epoch"] >= (1 if total == 200 else 0)
    first = make(corpus, doc_mask=True, packing=packing)
    got = [next(first) for _ in range(split_at)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = make(corpus, doc_mask=True, packing=packing)
    second.load_state_dict(state)
    got += [next(second) for _ in range(total - split_at)]
    for want, have in zip(reference, got):
        assert all(torch.equal(a, b) for a, b in zip(want, have))
    assert second.stats() == straight.stats()


def test_ranks_read_disjoint_row_groups(corpus):
    loaders = [make(corpus, rank=r, world_size=2, doc_mask=True) for r in range(2)]
    assert [len(loader.groups) for loader in loaders] == [6, 6]
    all_groups = make(corpus).groups
    assert loaders[0].groups == all_groups[0::2] and loaders[1].groups == all_groups[1::2]
    bos = corpus[1].bos_token_id
    own = [document_tokens(corpus, loader.groups) for loader in loaders]
    for rank, loader in enumerate(loaders):
        whole, _ = stitched_documents(loader, 10, bos)
        assert whole and all(s in own[rank] and s not in own[1 - rank] for s in whole)


def test_val_split_reads_last_shard(corpus):
    loader = make(corpus, split="val")
    assert {path.name for path, _ in loader.groups} == {"shard_00002.parquet"}
    next(loader)


@pytest.mark.parametrize("world_size", [4, 7])
def test_more_ranks_than_row_groups_share_by_document(corpus, world_size):
    whole = make(corpus, split="val")
    loaders = [make(corpus, split="val", rank=r, world_size=world_size) for r in range(world_size)]
    assert all(loader.groups == whole.groups for loader in loaders)  # the val shard has only 3 row groups
    everything = [doc.tolist() for p in range(3) for doc in whole.tokenize_group(p)]
    per_rank = [[doc.tolist() for p in range(3) for doc in loader.tokenize_group(p)] for loader in loaders]
    assert [per_rank[i % world_size][i // world_size] for i in range(len(everything))] == everything
    assert all(next(loader)[0].shape == (3, 64) for loader in loaders)


def test_fewer_documents_than_ranks_is_a_clear_error(corpus):
    with pytest.raises(UserError, match="val split has 30 documents, fewer than 31 ranks"):
        make(corpus, split="val", rank=0, world_size=31)


def test_shard_vanishing_midway_is_a_clear_error_in_the_training_thread(corpus, tmp_path):
    directory, tokenizer = corpus
    for shard in directory.iterdir():
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    loader = PretrainLoader(tokenizer, batch_size=3, seq_len=64, buffer_docs=8, directory=tmp_path)
    next(loader)
    (tmp_path / "shard_00001.parquet").unlink()
    with pytest.raises(UserError, match="cannot read .*shard_00001.parquet row group 0 .*python -m nanochat.dataset"):
        for _ in range(100):
            next(loader)


def test_odd_unicode_documents_round_trip(corpus, tmp_path):
    odd = ["emoji 🤖 and ZWJ 👩\u200d💻", "RTL שלום \u202e reversed", "combining e\u0301\u0301", "nul\x00byte",
           "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "<|bos|> typed by a user stays text"]
    for index in range(2):
        pq.write_table(pa.table({"text": odd}), tmp_path / f"shard_{index:05d}.parquet")
    tokenizer = corpus[1]
    loader = PretrainLoader(tokenizer, batch_size=1, seq_len=256, buffer_docs=6, directory=tmp_path)
    inputs, targets = next(loader)
    row = inputs[0].tolist() + targets[0, -1:].tolist()
    pieces = [tokenizer.decode(list(segment[1:])) for segment in segments(row, tokenizer.bos_token_id)]
    # Whole documents come back exactly (the last one may be cropped); best fit lets the shortest wait longest.
    assert set(pieces[:-1]) <= set(odd) and len(set(pieces[:-1])) >= 4


def test_clear_errors(corpus, base_dir):
    state = make(corpus, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="saved by rank 0 of 2 .*same number of ranks"):
        make(corpus).load_state_dict(state)
    with pytest.raises(UserError, match="saved with packing crop, this run packs with continue; resume with "
                                        "--packing crop"):
        make(corpus).load_state_dict(make(corpus, packing="crop").state_dict())
    with pytest.raises(UserError, match="saved reading fineweb/, this run reads .*; resume with --data_source fineweb"):
        make(corpus).load_state_dict({**make(corpus).state_dict(), "data": "fineweb"})
    with pytest.raises(UserError, match="packing must be one of continue, crop, got 'fill'"):
        make(corpus, packing="fill")
    with pytest.raises(UserError, match="python -m nanochat.dataset"):
        PretrainLoader(corpus[1], batch_size=1, seq_len=8)  # base_dir has no shards


def test_shard_yield_and_repeat_warning(corpus):
    directory, tokenizer = corpus
    all_docs = sum(len(doc) for position in range(12) for doc in make(corpus).tokenize_group(position))
    exact = measure_shard_yield(tokenizer, directory, 64, "continue", sample_groups=12)
    assert exact == pytest.approx(all_docs / 2)  # two train shards, every token trained
    cropped = measure_shard_yield(tokenizer, directory, 64, "crop", sample_groups=12, sample_tokens=20_000)
    assert cropped < 0.8 * exact  # documents of ~270 tokens cropped to rows of 65 lose most of their tokens
    assert repeat_warning(int(2 * exact), exact, 2) is None
    warning = repeat_warning(int(5 * exact), exact, 2)
    assert warning.startswith("WARNING: this run trains on ") and "repeat data ~2.5x" in warning
    assert f"download at least {train_shards_needed(int(5 * exact), exact)} train shards" in warning
    assert train_shards_needed(1000, 100.0) == 11 and train_shards_needed(1000, 100.0, margin=0) == 10


def test_state_saved_before_packing_had_a_name_resumes_as_crop(corpus):
    straight = make(corpus, packing="crop")
    reference = [next(straight) for _ in range(8)]
    first = make(corpus, packing="crop")
    for _ in range(5):
        next(first)
    state = {key: value for key, value in first.state_dict().items()
             if key not in ("packing", "continued", "tokens_read", "tokens_dropped")}
    first.close()
    second = make(corpus, packing="crop")
    second.load_state_dict({**state, "version": 1})
    for want in reference[5:]:
        assert all(torch.equal(a, b) for a, b in zip(want, next(second)))
    with pytest.raises(UserError, match="resume with --packing crop"):
        make(corpus).load_state_dict({**state, "version": 1})


@pytest.fixture(scope="module")
def real_tokenizer(shared_data):
    texts = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet").read_row_group(0).column("text")
    return Tokenizer.train_from_iterator(texts.to_pylist()[:300], vocab_size=2048)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [512, 2048])
def test_continue_packing_drops_at_most_5_percent_of_the_real_shards(shared_data, real_tokenizer, seq_len):
    """The crop rule drops a large share here (long documents pile up in its buffer); continue drops nothing."""
    measured = {}
    for packing in ("continue", "crop"):
        loader = PretrainLoader(real_tokenizer, batch_size=4, seq_len=seq_len, directory=shared_data / "pretrain",
                                packing=packing, doc_mask=True)
        for _ in range(1_000_000 // (4 * seq_len)):
            inputs, _, doc_ids = next(loader)
            starts = inputs[:, 0] == real_tokenizer.bos_token_id
            assert torch.all(starts | (doc_ids[:, 0] == 0))
        measured[packing] = dropped_percent(loader.stats())
        loader.close()
    assert measured["continue"] <= 5.0
    assert measured["crop"] > 10.0, measured  # the measure itself sees the old rule's waste


@pytest.mark.slow
def test_torchrun_two_ranks_split_and_resume(corpus, base_dir, tmp_path):
    directory, tokenizer = corpus
    tokenizer.save(base_dir / "tokenizer")
    os.symlink(directory, base_dir / "base_data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("dataloader_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(worker), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["reference"] == seen["resumed"]
        assert seen["total_groups"] == 12
    assert not {tuple(g) for g in ranks[0]["groups"]} & {tuple(g) for g in ranks[1]["groups"]}
    assert ranks[0]["reference"] != ranks[1]["reference"]
