"""Export a checkpoint as a Hugging Face folder (transformers' NanoChat architecture, no custom code needed).

    python -m scripts.export --source sft --format hf --out DIR

Then `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it. What is
written and why some configurations are refused: docs/interop.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.checkpoint import CHECKPOINT_DIRS, load_model
from nanochat.common import UserError
from nanochat.flags import CheckpointFlags, flag, parse_flags, run_main
from nanochat.hf_export import check_out_dir, export_hf


@dataclass
class ExportFlags(CheckpointFlags):
    source: str = flag("sft", "checkpoint to export: base|mid|sft|rl", choices=tuple(CHECKPOINT_DIRS))
    format: str = flag("hf", "output format (hf: a Hugging Face transformers folder)", choices=("hf",))
    out: str = flag("", "output directory; must not exist or be empty")

    def __post_init__(self):
        super().__post_init__()
        if not self.out:
            raise UserError("--out is required: the directory to write the export into")


def main(argv=None) -> None:
    flags = parse_flags(ExportFlags, argv)
    check_out_dir(flags.out)  # before loading: a taken --out should not cost a model load
    tag, step = flags.checkpoint_choice()
    model, tokenizer, _ = load_model(flags.source, "cpu", tag=tag, step=step)
    out = export_hf(model, tokenizer, flags.out)
    print(f"wrote {out} (load it with transformers' AutoModelForCausalLM / AutoTokenizer .from_pretrained)")


if __name__ == "__main__":
    run_main(main)
