"""The report card: every stage logs a section; `generate` assembles report.md with the summary table and plots.

    from nanochat import report
    report.log_section("Base eval", [{"CORE": 0.21}, table_markdown], source="base",
                       metrics={"CORE": 0.21}, wall_time_s=812.0)

    python -m nanochat.report reset                        # start a new run's report (clears report/)
    python -m nanochat.report generate --gpu_hourly_cost 3   # write report/report.md and ./report.md

Sections live in `$NANOCHAT_BASE_DIR/report/` as `<slug>.md` (the markdown) plus `<slug>.json` (title, metrics
for the summary table, wall time, when). Logging the same title again replaces that section. Only rank 0 writes.
Plots are drawn from the trainer's `train_log.jsonl` files in the checkpoint directories. Anything missing shows
as "–" and never stops `generate`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.checkpoint import CHECKPOINT_DIRS
from nanochat.common import UserError, atomic_path, atomic_write, get_base_dir, get_rank, get_world_size, git_commit
from nanochat.flags import flag, parse_flags, run_main

SOURCES = tuple(CHECKPOINT_DIRS)  # base, mid, sft, rl: the summary-table columns
SUMMARY_METRICS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")
MISSING = "–"
CODE_DIRS = ("nanochat", "scripts", "tasks", "rustbpe/src", "tests", "bench")
CODE_SUFFIXES = (".py", ".rs", ".html", ".js", ".css", ".sh")
STARTED_FILE = "started.txt"


def report_dir() -> Path:
    directory = get_base_dir() / "report"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_data(data) -> str:
    """Dicts become `- key: value` lists, strings stay markdown; a list may mix both."""
    items = data if isinstance(data, (list, tuple)) else [data]
    blocks = []
    for item in items:
        if isinstance(item, dict):
            blocks.append("\n".join(f"- {key}: {format_value(value)}" for key, value in item.items()))
        else:
            blocks.append(str(item).strip())
    return "\n\n".join(block for block in blocks if block)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_value(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def log_section(title: str, data=(), *, source: str | None = None, metrics: dict[str, float] | None = None,
                wall_time_s: float | None = None) -> Path | None:
    """Write (or replace) the section `title`. `metrics` fill the summary table's `source` column
    (base|mid|sft|rl); `wall_time_s` counts toward the time and cost estimate. Returns the .md path (rank 0)."""
    if get_rank() != 0:
        return None
    if source is not None and source not in SOURCES:
        raise ValueError(f"report source must be one of {SOURCES}, got {source!r}")
    directory = report_dir()
    slug = slugify(title)
    body = render_data(data)
    atomic_write(directory / f"{slug}.md", f"## {title}\n\n{body}\n")
    # every rank of a CUDA run holds one GPU, on whichever node: the cost counts them all, not this node's
    gpus = get_world_size() if torch.cuda.is_initialized() else 0
    sidecar = {"title": title, "source": source, "metrics": metrics or {}, "wall_time_s": wall_time_s,
               "gpus": gpus, "logged_at": datetime.datetime.now().isoformat(timespec="microseconds")}
    atomic_write(directory / f"{slug}.json", json.dumps(sidecar, indent=1))
    return directory / f"{slug}.md"


def reset() -> None:
    """Start a fresh report: drop every section and plot, remember when the run started."""
    directory = report_dir()
    for path in directory.iterdir():
        if path.is_file() and path.suffix in (".md", ".json", ".png"):
            path.unlink()
    atomic_write(directory / STARTED_FILE, datetime.datetime.now().isoformat(timespec="seconds"))


def load_sections(directory: Path) -> list[dict]:
    sections = []
    for sidecar in sorted(directory.glob("*.json")):
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            meta["markdown"] = sidecar.with_suffix(".md").read_text(encoding="utf-8")
        except (OSError, ValueError):
            continue
        sections.append(meta)
    sections.sort(key=lambda s: s.get("logged_at") or "")
    return sections


def summary_table(sections: list[dict]) -> str:
    values: dict[tuple[str, str], float] = {}
    for section in sections:
        for name, value in (section.get("metrics") or {}).items():
            if section.get("source") in SOURCES and name in SUMMARY_METRICS:
                values[(name, section["source"])] = value
    rows = [[name] + [values.get((name, source), MISSING) for source in SOURCES] for name in SUMMARY_METRICS]
    return markdown_table(["Metric"] + [s.upper() for s in SOURCES], rows)


def cpu_description() -> str:
    """`2 × <model name>` from /proc/cpuinfo on Linux, else the CPU count alone."""
    count = os.cpu_count() or 1
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{count} × {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return str(count)


def memory_gb() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        return MISSING


def environment() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "Git commit": git_commit() or MISSING,
        "Platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "CPUs": cpu_description(),
        "Memory": memory_gb(),
        "GPUs": f"{len(gpus)} × {gpus[0]}" if gpus else "none",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda or "none",
    }


def code_size(root: Path) -> dict:
    files = lines = chars = 0
    for directory in CODE_DIRS:
        for path in (root / directory).rglob("*"):
            if path.is_file() and path.suffix in CODE_SUFFIXES and ".venv" not in path.parts:
                text = path.read_text(encoding="utf-8", errors="replace")
                files, lines, chars = files + 1, lines + text.count("\n"), chars + len(text)
    return {"Files": files, "Lines": lines, "Characters": chars}


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def time_and_cost(sections: list[dict], gpu_hourly_cost: float, num_gpus: int) -> str:
    rows, total = [], 0.0
    for section in sections:
        wall = section.get("wall_time_s")
        rows.append([section["title"], format_duration(wall) if wall is not None else MISSING])
        total += wall or 0.0
    rows.append(["**Total**", format_duration(total)])
    cost = total / 3600 * num_gpus * gpu_hourly_cost
    return (markdown_table(["Stage", "Wall time"], rows)
            + f"\n\nEstimated cost: ${cost:,.2f} ({num_gpus} GPU(s) × ${gpu_hourly_cost:g}/GPU-hour × "
              f"{total / 3600:.2f} h)")


def read_train_log(source: str) -> list[dict]:
    """The newest tag's train_log.jsonl for a stage, or [] when the stage never ran."""
    stage_dir = get_base_dir() / CHECKPOINT_DIRS[source]
    logs = sorted(stage_dir.glob("*/train_log.jsonl"), key=lambda p: p.stat().st_mtime) if stage_dir.is_dir() else []
    if not logs:
        return []
    records = []
    for line in logs[-1].read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def is_training_loss(name: str) -> bool:
    return name == "loss"


def is_validation_metric(name: str) -> bool:
    # base_train logs val_bpb; the chat stages log val_loss (nats per token)
    return name.endswith("bpb") or name == "val_loss"


PLOTS = ((is_training_loss, "Training loss", "train_loss.png"),
         (is_validation_metric, "Validation bpb (base) and loss (mid, sft)", "val_bpb.png"))


def plot_curves(directory: Path) -> list[tuple[str, str]]:
    """Training loss and validation metrics per stage as PNGs; returns (caption, file name) per plot drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {source: read_train_log(source) for source in SOURCES}
    drawn = []
    for wanted, caption, file_name in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4))
        lines = 0
        for source, records in logs.items():
            series: dict[str, list[tuple[int, float]]] = {}
            for record in records:
                for name, value in record.items():
                    if "step" in record and wanted(name) and isinstance(value, (int, float)):
                        series.setdefault(name, []).append((record["step"], value))
            for name, points in series.items():
                steps, values = zip(*points)
                label = source if name == "loss" else f"{source} {name}"
                ax.plot(steps, values, marker="." if len(points) < 50 else None, label=label)
                lines += 1
        if lines:
            ax.set_xlabel("step")
            ax.set_title(caption)
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            with atomic_path(directory / file_name) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            drawn.append((caption, file_name))
        plt.close(fig)
    return drawn


def generate(gpu_hourly_cost: float = 3.0, num_gpus: int | None = None, copy_to: Path | None = None) -> Path:
    """Assemble report/report.md (and copy it to `copy_to`, default the working dir); returns its path."""
    directory = report_dir()
    sections = [s for s in load_sections(directory) if s.get("title")]
    if num_gpus is None:  # the widest stage's GPUs across all nodes (all are rented for the whole run)
        num_gpus = max([s.get("gpus") or 0 for s in sections] + [torch.cuda.device_count(), 1])
    plots = plot_curves(directory)
    started = directory / STARTED_FILE
    started_at = started.read_text().strip() if started.exists() else MISSING
    parts = [
        "# nanochat report",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}; run started {started_at}.",
        "## Environment\n\n" + render_data(environment()),
        "## Code size\n\n" + render_data(code_size(Path(__file__).resolve().parents[1])),
        "## Summary\n\n" + summary_table(sections),
        "## Time and cost\n\n" + time_and_cost(sections, gpu_hourly_cost, num_gpus),
        "## Plots\n\n" + ("\n\n".join(f"![{caption}]({name})" for caption, name in plots)
                          if plots else "No training logs found."),
    ]
    parts += [section["markdown"].strip() for section in sections]
    out = directory / "report.md"
    atomic_write(out, "\n\n".join(parts) + "\n")
    destination = Path(copy_to) if copy_to is not None else Path.cwd()
    if destination.resolve() != directory.resolve():
        shutil.copyfile(out, destination / "report.md")
        for _, name in plots:
            shutil.copyfile(directory / name, destination / name)
    return out


@dataclass
class ReportFlags:
    """python -m nanochat.report reset|generate [flags]"""
    gpu_hourly_cost: float = flag(3.0, "dollars per GPU-hour for the cost estimate")
    num_gpus: int = flag(-1, "GPUs the run used, for the cost estimate; -1 = the most GPUs any stage ran on, "
                             "across all nodes (at least the GPUs visible now, and 1)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("reset", "generate"):
        raise UserError("usage: python -m nanochat.report reset|generate [--gpu_hourly_cost X] [--num_gpus N]")
    flags = parse_flags(ReportFlags, argv[1:])
    if argv[0] == "reset":
        reset()
        print(f"report reset in {report_dir()}")
    else:
        path = generate(flags.gpu_hourly_cost, None if flags.num_gpus < 0 else flags.num_gpus)
        print(f"wrote {path} and {Path.cwd() / 'report.md'}")


if __name__ == "__main__":
    run_main(main)
