"""The model: config derivation, parameter counts, loss semantics, masks, KV-cache protocol."""
from dataclasses import asdict

import pytest
import torch

import nanochat.gpt as gpt_module
from nanochat.checkpoint import build_model, load_checkpoint, save_checkpoint
from nanochat.common import UserError
from nanochat.gpt import GPT
from nanochat.model_config import GPTConfig, ModelFlags, model_config
from tests.engine_helpers import perturb_projections
from tests.model_cases import SWITCH_CASES, tiny_config


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    return perturb_projections(model)


def test_ittybitty_shape_matches_design():
    config = model_config(ModelFlags(depth=4, model_dim=512, head_dim=64), vocab_size=24576)
    assert (config.num_heads, config.num_kv_heads) == (8, 8)
    counts = GPT(config).num_params()
    assert abs(counts["total"] - 37.7e6) < 0.05e6
    for part in ("embedding", "blocks", "lm_head"):
        assert abs(counts[part] - 12.58e6) < 0.01e6


@pytest.mark.parametrize("flags, message", [
    (ModelFlags(depth=0), "--depth must be >= 1"),
    (ModelFlags(depth=4, model_dim=500, num_heads=8, head_dim=64), "(8 × 64 = 512)"),
    (ModelFlags(depth=1), "try --head_dim 64"),
    (ModelFlags(depth=4, model_dim=512, head_dim=64, num_kv_heads=3), "must divide --num_heads 8"),
    (ModelFlags(depth=2, head_dim=7), "must be an even number"),
])
def test_inconsistent_flags_name_the_fix(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_config(flags, vocab_size=1000)


def test_vocab_is_padded_but_logits_are_not():
    model = build(tiny_config(vocab_size=100))
    assert model.lm_head.weight.shape[0] == 128
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 100)


def test_all_ignored_targets_give_zero_loss_and_finite_grads():
    model = build(tiny_config())
    idx = torch.randint(0, 100, (2, 8))
    loss = model(idx, torch.full((2, 8), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_chunked_loss_equals_single_pass(monkeypatch):
    model = build(tiny_config())
    idx, targets = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    targets[0, :5] = -1
    whole = model(idx, targets)
    whole.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_ELEMENTS", 128 * 7)  # 7 rows per chunk
    chunked = model(idx, targets)
    chunked.backward()
    assert torch.allclose(whole, chunked, atol=1e-6)
    for before, p in zip(grads, model.parameters()):
        assert torch.allclose(before, p.grad, atol=1e-6)


def test_loss_reductions_agree():
    model = build(tiny_config())
    idx, targets = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    targets[1, 3] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token[1, 3] == 0
    assert torch.allclose(per_token.sum(), model(idx, targets, loss_reduction="sum"))
    assert torch.allclose(per_token.sum() / 15, model(idx, targets))


def test_overfits_one_batch():
    model = build(tiny_config())
    idx = torch.randint(0, 100, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_kv_cache_matches_full_recompute(num_kv_heads):
    model = build(tiny_config(head_dim=8, num_kv_heads=num_kv_heads)).eval()
    idx = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3, 12)
        prefill = model(idx[:, :7], kv_cache=cache)
        steps = [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 12)]
    incremental = torch.cat([prefill] + steps, dim=1)
    assert torch.allclose(full, incremental, atol=1e-4)


@pytest.mark.parametrize("case", SWITCH_CASES)
def test_cache_equals_recompute_for_every_switch(case):
    """Batch-1 prefill copied into 3 rows, a 3-token chunk per row, then single steps past the short window:
    the logits equal a full forward of each row."""
    model = build(tiny_config(**SWITCH_CASES[case])).eval()
    prompt, continuations = torch.randint(0, 100, (1, 9)), torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        prefill = model.new_cache(1, 9)
        prefill_logits = model(prompt, kv_cache=prefill)
        cache = model.new_cache(3, 16)
        cache.fill_from(prefill)
        chunk = model(continuations[:, :3], kv_cache=cache)
        steps = [model(continuations[:, t:t + 1], kv_cache=cache) for t in range(3, 7)]
        full = model(torch.cat([prompt.expand(3, -1), continuations], dim=1))
    assert torch.allclose(prefill_logits[0], full[0, :9], atol=1e-4)
    assert torch.allclose(torch.cat([chunk, *steps], dim=1), full[:, 9:], atol=1e-4)


@pytest.mark.parametrize("case", SWITCH_CASES)
def test_every_switch_trains_every_parameter(case):
    config = tiny_config(**SWITCH_CASES[case])
    model = build(config)
    idx = torch.randint(0, 100, (2, 17))
    assert model(idx[:, :-1]).shape == (2, 16, 100)
    model(idx[:, :-1], idx[:, 1:]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    groups = model.param_groups()
    assert sum(map(len, groups.values())) == len(list(model.parameters()))
    counts = model.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["value_embeds"] == (len(config.value_embed_layers) * 128 * config.num_kv_heads * config.head_dim)


@pytest.mark.parametrize("case", SWITCH_CASES)
def test_doc_ids_keep_attention_inside_documents(case):
    model = build(tiny_config(**SWITCH_CASES[case])).eval()
    second_doc = torch.randint(0, 100, (1, 6))
    row = torch.cat([torch.randint(0, 100, (1, 5)), second_doc], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 6])
    with torch.no_grad():
        masked = model(row, doc_ids=doc_ids)[:, 5:]
        alone = model(second_doc)
        unmasked = model(row)[:, 5:]
    # rotary makes attention relative, so a document alone equals the same document after a masked prefix
    assert torch.allclose(masked, alone, atol=1e-4)
    assert not torch.allclose(unmasked, alone, atol=1e-4)


def test_context_overflow_is_a_clear_error():
    model = build(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_tied_embeddings_share_one_matrix():
    model = build(tiny_config(tie_embeddings=True))
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params()["lm_head"] == 0


@pytest.mark.parametrize("case", SWITCH_CASES)
def test_meta_json_rebuilds_every_switch(case, tmp_path):
    """A saved checkpoint records the switches in meta.json and loads back into the same model."""
    model = build(tiny_config(**SWITCH_CASES[case])).eval()
    model.store_embeddings_in(torch.bfloat16)  # a no-op unless compute_dtype_embeddings
    save_checkpoint(tmp_path, 1, model, optimizers=[], meta={}, rank_state={}, keep_last=-1)
    checkpoint = load_checkpoint(tmp_path, 1, "cpu", load_optimizer=False)
    assert checkpoint.meta["model_config"] == asdict(model.config)
    loaded = build_model(checkpoint.meta, torch.device("cpu"), model_state=checkpoint.model_state).eval()
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


@pytest.mark.parametrize("switches, message", [
    (dict(window_pattern="SXL"), "--window_pattern must be letters S"),
    (dict(window_pattern=""), "--window_pattern must be letters S"),
    (dict(short_window=0), "--short_window must be >= 1 or -1"),
    (dict(qk_scale=1.2, qk_norm=False), "it needs qk_norm"),
    (dict(init_scheme="2024"), "--init_scheme must be one of 2025, frontier"),
    (dict(compute_dtype_embeddings=True, tie_embeddings=True), "drop one of it and --tie_embeddings"),
])
def test_bad_switch_combinations_name_the_fix(switches, message):
    with pytest.raises(UserError, match=message):
        tiny_config(**switches)


def test_model_flags_reach_the_config_by_name():
    switches = dict(rope_theta=100000.0, value_embeds=True, window_pattern="SSSL", short_window=256,
                    residual_scalars=True, smear=True, backout=True, qk_scale=1.2, init_scheme="frontier",
                    compute_dtype_embeddings=True)
    config = model_config(ModelFlags(depth=4, model_dim=256, head_dim=64, max_seq_len=1024, **switches), 1000)
    assert {name: getattr(config, name) for name in switches} == switches
    assert config.windows == [256, 256, 256, None]


@pytest.mark.parametrize("max_seq_len, depth, windows", [
    (2048, 5, [512, 512, 512, None, None]),  # a quarter of 2048; the pattern restarts, the last layer is full
    (512, 3, [128, 128, None]),
    (1000, 2, [256, None]),  # 250 rounded up to a multiple of 128
    (100, 2, [None, None]),  # a 128-token window covers a 100-token context: plain causal attention
])
def test_short_window_is_a_quarter_of_the_context_rounded_up_to_128(max_seq_len, depth, windows):
    config = tiny_config(depth=depth, max_seq_len=max_seq_len, window_pattern="SSSL")
    assert config.windows == windows
