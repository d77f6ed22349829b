"""CORE: in-context-learning accuracy of a base model over the standard eval bundle.

Bundle layout (`$NANOCHAT_BASE_DIR/eval_bundle/`, or any directory with the same files):
    core.yaml            icl_tasks: label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter
    eval_meta_data.csv   "Eval Task" and "Random baseline" (percent) per task
    eval_data/*.jsonl    rows per task type (see `build_pairs`)

Every task type reduces to (context, continuation) pairs scored by the model:
- multiple_choice: one pair per choice, `query + delimiter` / `choice`; the lowest mean loss over the
  continuation tokens wins.
- schema: one pair per context option, `option + delimiter` / `continuation`; lowest mean loss wins.
- language_modeling: one pair `context + delimiter` / `continuation`; right when greedy argmax reproduces every
  continuation token.
Few-shot examples come from the same file (never the item itself), drawn with `random.Random(seed + index)`, so
prompts are identical on every run and rank. Sequences longer than the context are cropped from the left.
Accuracy is centered against the task's random baseline, (acc - b) / (1 - b), and CORE is the mean.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from nanochat.common import UserError, atomic_path, get_base_dir, sum_across_ranks
from nanochat.download import download_file, validate_zip

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DATA_ORDER_SEED = 1337  # the fixed shuffle that --max_per_task takes its first N items from
# Padded tokens per forward pass: with a 65536 vocab the float32 logits of 8192 tokens take 2 GiB.
MAX_BATCH_TOKENS = 8192


@dataclass
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy as a fraction
    rows: list[dict]


@dataclass
class Sequence:
    """One scored row: token ids, the continuation's span [start, end), and which item/option it belongs to."""
    item: int
    option: int
    ids: list[int]
    start: int
    end: int


# ---------------------------------------------------------------------------------------------------------
# The bundle on disk

def bundle_dir() -> Path:
    return get_base_dir() / "eval_bundle"


def download_bundle(dest: Path | None = None, url: str | None = None) -> Path:
    """Fetch and unpack the public bundle zip into `dest` (default base_dir/eval_bundle); returns `dest`.

    Unpacks into a temp directory and renames it, so `dest` is either absent or complete."""
    dest = Path(dest or bundle_dir())
    if (dest / "core.yaml").exists():
        return dest
    if dest.exists():
        raise UserError(f"{dest} exists but has no core.yaml; remove it and fetch the bundle again")
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or BUNDLE_URL
    zip_path = dest.parent / "eval_bundle.zip"
    download_file(url, zip_path, validate=validate_zip, desc="CORE eval bundle")
    staging = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(staging)
    # The public zip holds a top-level eval_bundle/ folder; accept a flat zip too.
    root = next((p.parent for p in staging.rglob("core.yaml")), None)
    if root is None:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{url} has no core.yaml; is it a CORE eval bundle? (set NANOCHAT_EVAL_BUNDLE_URL)")
    os.replace(root, dest)
    shutil.rmtree(staging, ignore_errors=True)
    zip_path.unlink()
    return dest


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_bundle(directory: Path | None = None) -> list[CoreTask]:
    """Read core.yaml, the baselines and every task's rows; one clear error for anything missing or malformed."""
    directory = Path(directory or bundle_dir())
    config_path, meta_path = directory / "core.yaml", directory / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.exists():
            raise UserError(f"{path} not found; fetch the bundle with python -m scripts.base_eval --download_only "
                            f"(or build it offline with python -m nanochat.dataset --source demo --what core)")
    with open(meta_path, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    entries = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("icl_tasks") or []
    tasks = []
    for entry in entries:
        label, task_type = entry.get("label"), entry.get("icl_task_type")
        if task_type not in TASK_TYPES:
            raise UserError(f"{config_path}: task {label!r} has icl_task_type {task_type!r}; "
                            f"expected one of {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UserError(f"{meta_path} has no 'Random baseline' row for task {label!r}")
        shots = entry.get("num_fewshot", [0])
        data_path = directory / "eval_data" / entry["dataset_uri"]
        if not data_path.exists():
            raise UserError(f"{data_path} (task {label}) not found; re-download the bundle")
        tasks.append(CoreTask(label, task_type, int(shots[0] if isinstance(shots, list) else shots),
                              entry.get("continuation_delimiter", " "), baselines[label], read_jsonl(data_path)))
    if not tasks:
        raise UserError(f"{config_path} lists no icl_tasks")
    return tasks


# ---------------------------------------------------------------------------------------------------------
# Prompts

def fewshot_indices(num_rows: int, index: int, num_fewshot: int, seed: int) -> list[int]:
    """`num_fewshot` other rows for item `index`, the same on every run."""
    pool = [i for i in range(num_rows) if i != index]
    return random.Random(seed + index).sample(pool, min(num_fewshot, len(pool)))


def demonstration(task_type: str, row: dict, delimiter: str) -> str:
    """A solved example as it appears in a few-shot prefix."""
    if task_type == "multiple_choice":
        return f"{row['query']}{delimiter}{row['choices'][row['gold']]}"
    if task_type == "schema":
        return f"{row['context_options'][row['gold']]}{delimiter}{row['continuation']}"
    return f"{row['context']}{delimiter}{row['continuation']}"


def build_pairs(task: CoreTask, index: int, seed: int = 1234) -> list[tuple[str, str]]:
    """(context, continuation) text pairs for item `index`, few-shot prefix included."""
    row, delimiter = task.rows[index], task.delimiter
    shots = fewshot_indices(len(task.rows), index, task.num_fewshot, seed)
    prefix = "".join(demonstration(task.task_type, task.rows[i], delimiter) + "\n\n" for i in shots)
    if task.task_type == "multiple_choice":
        return [(f"{prefix}{row['query']}{delimiter}", choice) for choice in row["choices"]]
    if task.task_type == "schema":
        return [(f"{prefix}{option}{delimiter}", row["continuation"]) for option in row["context_options"]]
    return [(f"{prefix}{row['context']}{delimiter}", row["continuation"])]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], item: int, max_seq_len: int) -> list[Sequence]:
    """BOS + context + continuation per pair; the continuation span is where the tokens of the whole text part
    from those of the context alone (a trailing delimiter space joins the next word's token, so the context is
    encoded without trailing whitespace). Too-long sequences lose tokens from the left."""
    sequences = []
    for option, (context, continuation) in enumerate(pairs):
        full = tokenizer.encode(context + continuation, prepend=tokenizer.bos_token_id)
        head = tokenizer.encode(context.rstrip(), prepend=tokenizer.bos_token_id)
        start = max(1, min(common_prefix_length(head, full), len(full) - 1))
        crop = max(0, len(full) - max_seq_len)
        ids, start, end = full[crop:], max(1, start - crop), len(full) - crop
        sequences.append(Sequence(item, option, ids, start, end))
    return sequences


# ---------------------------------------------------------------------------------------------------------
# Scoring

def length_batches(order: list[int], lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Split `order` (longest first) into batches of at most `batch_size` rows and, padded, `max_batch_tokens`
    tokens (always at least one row), so the (rows, width, vocab) logits stay bounded on long prompts."""
    batches, batch = [], []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) == batch_size or (len(batch) + 1) * width > max_batch_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


@torch.no_grad()
def score_sequences(model, sequences: list[Sequence], device, batch_size: int,
                    max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[tuple[float, bool]]:
    """(mean continuation loss, greedy reproduces the continuation) per sequence, in input order.

    Sequences are sorted by length and padded into batches for the forward pass (see `length_batches`)."""
    results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    lengths = [len(s.ids) for s in sequences]
    order = sorted(range(len(sequences)), key=lambda i: lengths[i], reverse=True)
    for batch in length_batches(order, lengths, batch_size, max_batch_tokens):
        width = lengths[batch[0]]
        inputs = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, i in enumerate(batch):
            seq = sequences[i]
            inputs[row, :len(seq.ids)] = torch.tensor(seq.ids)
            # position t predicts token t+1: the continuation tokens ids[start:end] are targets at start-1..end-2
            targets[row, seq.start - 1:seq.end - 1] = torch.tensor(seq.ids[seq.start:seq.end])
        inputs, targets = inputs.to(device), targets.to(device)
        scored = targets != -1
        picked = model(inputs)[scored].float()  # (scored tokens, vocab): only continuation positions
        wanted = targets[scored]
        token_loss = F.cross_entropy(picked, wanted, reduction="none")
        token_wrong = (picked.argmax(-1) != wanted).float()
        row_of = scored.nonzero()[:, 0]
        counts = torch.bincount(row_of, minlength=len(batch)).clamp(min=1)
        mean_loss = torch.bincount(row_of, weights=token_loss, minlength=len(batch)) / counts
        wrong = torch.bincount(row_of, weights=token_wrong, minlength=len(batch))
        for row, i in enumerate(batch):
            results[i] = (mean_loss[row].item(), wrong[row].item() == 0)
    return results


def item_correct(task: CoreTask, index: int, scores: list[tuple[float, bool]]) -> bool:
    if task.task_type == "language_modeling":
        return scores[0][1]
    losses = [loss for loss, _ in scores]
    return losses.index(min(losses)) == task.rows[index]["gold"]


def selected_items(task: CoreTask, max_per_task: int) -> list[int]:
    """Item indices in a fixed shuffled order, the first `max_per_task` of them (-1 = all)."""
    order = list(range(len(task.rows)))
    random.Random(DATA_ORDER_SEED).shuffle(order)
    return order if max_per_task < 0 else order[:max_per_task]


def num_options(task: CoreTask, row: dict) -> int:
    if task.task_type == "multiple_choice":
        return len(row["choices"])
    return len(row["context_options"]) if task.task_type == "schema" else 1


def item_groups(task: CoreTask, items: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive items whose sequences together fill about `batch_size` rows (an item is never split)."""
    groups, group, rows = [], [], 0
    for i in items:
        n = num_options(task, task.rows[i])
        if group and rows + n > batch_size:
            groups.append(group)
            group, rows = [], 0
        group.append(i)
        rows += n
    return groups + [group] if group else groups


def evaluate_task(model, tokenizer, task: CoreTask, device, max_seq_len: int, max_per_task: int = -1,
                  batch_size: int = 32, rank: int = 0, world_size: int = 1, seed: int = 1234,
                  progress: bool = False) -> float:
    """Accuracy on one task. Rank r scores items r, r+w, ...; counts are summed over ranks."""
    items = selected_items(task, max_per_task)[rank::world_size]
    correct = 0
    bar = tqdm(total=len(items), desc=task.label, disable=not progress, leave=False)
    for group in item_groups(task, items, batch_size):
        sequences = [s for i in group for s in tokenize_pairs(tokenizer, build_pairs(task, i, seed), i, max_seq_len)]
        scores = score_sequences(model, sequences, device, batch_size)
        by_item: dict[int, list[tuple[float, bool]]] = {i: [] for i in group}
        for seq, score in zip(sequences, scores):
            by_item[seq.item].append(score)
        correct += sum(item_correct(task, i, by_item[i]) for i in group)
        bar.update(len(group))
    bar.close()
    counts = sum_across_ranks([correct, len(items)], device)
    return (counts[0] / counts[1].clamp(min=1)).item()


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, tasks: list[CoreTask], device, max_seq_len: int, max_per_task: int = -1,
                  batch_size: int = 32, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """{"tasks": [{"label", "accuracy", "centered"}, ...], "core": mean centered accuracy}."""
    rows = []
    for task in tqdm(tasks, desc="CORE", disable=not progress):
        accuracy = evaluate_task(model, tokenizer, task, device, max_seq_len, max_per_task, batch_size, rank,
                                 world_size, progress=progress)
        rows.append({"label": task.label, "accuracy": accuracy, "centered": centered(accuracy, task.baseline)})
    return {"tasks": rows, "core": sum(r["centered"] for r in rows) / len(rows)}


def write_results_csv(results: dict, path: Path) -> Path:
    """Task, Accuracy, Centered per row and a final CORE row; atomic."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Task", "Accuracy", "Centered"])
        for row in results["tasks"]:
            writer.writerow([row["label"], f"{row['accuracy']:.6f}", f"{row['centered']:.6f}"])
        writer.writerow(["CORE", "", f"{results['core']:.6f}"])
    return path
