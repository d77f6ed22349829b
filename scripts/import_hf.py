"""Import a Llama-family Hugging Face checkpoint (or a nanochat export) as a nanochat checkpoint.

    python -m scripts.import_hf --model DIR --out_tag TAG

DIR holds config.json, model.safetensors (or sharded safetensors) and tokenizer.json. The model lands in
`$NANOCHAT_BASE_DIR/base_checkpoints/TAG/step_000000` and its tokenizer becomes the base dir's tokenizer, so
base_complete, chat_web, evals and chat_sft (`--model_tag TAG`) use it as they are. Details: docs/interop.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.checkpoint import CHECKPOINT_DIRS
from nanochat.common import UserError
from nanochat.flags import flag, parse_flags, run_main
from nanochat.hf_import import import_hf


@dataclass
class ImportFlags:
    model: str = flag("", "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    out_tag: str = flag("", "checkpoint tag to create (e.g. smollm-135m)")
    source: str = flag("base", "which checkpoint family to file it under: base|mid|sft|rl",
                       choices=tuple(CHECKPOINT_DIRS))

    def __post_init__(self):
        if not self.model:
            raise UserError("--model is required: a Hugging Face model folder")
        if not self.out_tag or "/" in self.out_tag or self.out_tag.startswith("."):
            raise UserError(f"--out_tag must be a plain directory name, got {self.out_tag!r}")


def main(argv=None) -> None:
    flags = parse_flags(ImportFlags, argv)
    import_hf(flags.model, flags.out_tag, flags.source)


if __name__ == "__main__":
    run_main(main)
