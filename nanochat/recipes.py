"""Named recipes: tables of flag values installed as the parser's defaults before parsing (`--recipe NAME`), so
`--help` shows the effective values and an explicit flag still wins. The flag dataclasses' own defaults are the
2025 recipe, so "2025" is an empty table and configs built in code (tests, benches) keep the 2025 behaviour.

Only base_train has `--recipe`; a checkpoint records the recipe and every resolved flag (meta.json "flags"), and
`--resume` refuses a checkpoint whose recipe-controlled flags differ (`recipe_mismatch`).
"""
from __future__ import annotations

# frontier leads the d4 race at 200 and 1000 steps, and the public record at scale
DEFAULT_RECIPE = "frontier"

# nanochat 2026 (karpathy/nanochat master, dev/LOG.md and dev/LEADERBOARD.md; many ideas from modded-nanogpt)
FRONTIER = {
    # architecture (nanochat.model_config.ModelFlags)
    "value_embeds": True,
    "window_pattern": "SSSL",
    "residual_scalars": True,
    "smear": True,
    "backout": True,
    "qk_scale": 1.2,
    "init_scheme": "frontier",
    "compute_dtype_embeddings": True,
    "rope_theta": 100000.0,
    # optimizer (nanochat.optim.OptimFlags)
    "embedding_lr": 0.3,
    "unembedding_lr": 0.008,
    "matrix_lr": 0.02,
    "scalar_lr": 0.5,
    "adamw_groups": "per_group",
    "muon_orthogonalizer": "polar_express",
    "muon_beta2": 0.9,
    "matrix_weight_decay": 0.28,
    "weight_decay_schedule": "cosine",
    "muon_momentum_start": 0.85,
    "muon_momentum": 0.97,
    "muon_momentum_warmup": 400,
    "muon_momentum_final": 0.90,
    # schedule and run length (scripts.base_train)
    "warmup_steps": 40,
    "warmdown_ratio": 0.65,
    "final_lr_frac": 0.05,
    "total_batch_size": -1,
    "batch_lr_scaling": True,
    # not in the record: its sqrt(B/2^19) LR rule is anchored at 2^19 (d12's best batch) and its auto batch never
    # goes below 2^18 (d8), so smaller batches keep 2^18's factor (every record configuration is unchanged); at
    # d4/4096 tokens per step the rule gives LRs × 0.088, and the floor is 14 % better in common bpb at 1000
    # steps and 17 % at 200 (docs/benchmarks.md, the race)
    "batch_lr_floor": 2 ** 18,
    # ~10.5 tokens per block-matrix + lm_head parameter: the compute-optimal ratio of nanochat's Jan 2026 scaling
    # fits on FineWeb-EDU (its code now says 12, re-fit on ClimbMix; the GPT-2 speedrun overtrains d24 at 8)
    "target_param_data_ratio": 10.5,
    "ratio_params": "matrices",
}

RECIPES: dict[str, dict] = {"2025": {}, "frontier": FRONTIER}


def recipe_keys() -> set[str]:
    """Every flag some recipe sets: the flags `--resume` must find unchanged."""
    return {key for table in RECIPES.values() for key in table}


def recipe_mismatch(saved: dict, current: dict) -> str | None:
    """One line naming the first recipe-controlled flag whose value differs between a checkpoint's flags and
    this run's, or None. Flags the checkpoint predates are not compared."""
    for key in ["recipe", *sorted(recipe_keys())]:
        if key in saved and key in current and saved[key] != current[key]:
            return (f"the checkpoint was trained with --{key} {saved[key]} (recipe {saved.get('recipe', '2025')}), "
                    f"this run has {current[key]}; pass --recipe {saved.get('recipe', '2025')} or --{key} "
                    f"{saved[key]} to resume it")
    return None
