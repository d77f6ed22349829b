"""Export to Hugging Face: a tiny model trained here on real shard text, with a tokenizer trained here, exported
by scripts.export and loaded by transformers with no custom code, must give our logits (<= 1e-4, float32), our
token ids on real text, and our chat rendering's ids from its chat_template."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanochat.checkpoint import checkpoint_dir, save_checkpoint  # noqa: E402
from nanochat.common import UserError  # noqa: E402
from nanochat.gpt import GPT  # noqa: E402
from nanochat.hf_export import export_hf, recover_merges  # noqa: E402
from nanochat.hf_import import load_hf_model  # noqa: E402
from nanochat.optim import setup_optimizers  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from scripts import export as export_script  # noqa: E402
from tests.engine_helpers import random_gpt  # noqa: E402
from tests.model_cases import SWITCH_CASES, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts(shared_data) -> dict[str, list[str]]:
    def read(name, rows):
        return pq.read_table(shared_data / "pretrain" / name, columns=["text"]).column("text").to_pylist()[:rows]

    return {"train": read("shard_00000.parquet", 150), "val": read("shard_00012.parquet", 40)}


@pytest.fixture(scope="module")
def conversations(shared_data) -> list[dict]:
    with gzip.open(shared_data / "chat" / "val.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(40), f)]
    return [{"messages": row["messages"]} for row in rows]


@pytest.fixture(scope="module")
def tokenizer(texts) -> Tokenizer:
    return Tokenizer.train_from_iterator(texts["train"], 700)


def trained_model(tokenizer, texts, tie: bool = False, steps: int = 6) -> GPT:
    """A depth-2 GQA model after a few optimizer steps on real text (so its weights are not the init's)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, model_dim=64, num_kv_heads=2, max_seq_len=128,
                            tie_embeddings=tie))
    model.init_weights()
    optimizers = setup_optimizers(model)
    stream = [t for doc in tokenizer.encode(texts["train"][:20], prepend="<|bos|>") for t in doc]
    batch = torch.tensor(stream[:4 * 129]).view(4, 129)
    for _ in range(steps):
        model(batch[:, :-1], batch[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer, texts):
    """scripts.export over a saved sft checkpoint; returns (our model, the export dir)."""
    base = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(base))
        model = trained_model(tokenizer, texts)
        tokenizer.save(base / "tokenizer")
        save_checkpoint(checkpoint_dir("sft", "d2"), 6, model, [], {}, {})
        out = tmp_path_factory.mktemp("export") / "hf"
        export_script.main(["--source", "sft", "--format", "hf", "--out", str(out)])
    return model, out


def test_transformers_logits_match_ours(exported, tokenizer, texts):
    model, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    rows = [tokenizer.encode(text, prepend="<|bos|>")[:128] for text in texts["val"][:4]]
    batch = torch.tensor([row for row in rows if len(row) == 128][:2])
    with torch.no_grad():
        ours, theirs = model(batch), hf_model(batch).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.encode_special("<|assistant_end|>")
    assert config["model_type"] == "nanochat" and config["num_key_value_heads"] == 2


def test_transformers_tokenizer_and_chat_template_give_our_ids(exported, tokenizer, texts, conversations):
    _, out = exported
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts["val"]:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, prepend="<|bos|>")
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token == "<|assistant_end|>"
    conversations = conversations + [{"messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                          {"type": "python", "text": "6 * 7"},
                                          {"type": "python_output", "text": "42"},
                                          {"type": "text", "text": " It is 42."}]},
        {"role": "user", "content": "Thanks!"}]}]
    for conversation in conversations:
        messages = conversation["messages"]
        full = hf_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert full == tokenizer.render_conversation(conversation, max_tokens=None)[0]
        prompt_messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        prompt = hf_tokenizer.apply_chat_template(prompt_messages, tokenize=True,
                                                  add_generation_prompt=True)["input_ids"]
        assert prompt == tokenizer.render_for_completion(conversation)


def assert_same_logits_and_loss(model, hf_model, reimported, ids):
    """transformers' logits and labels loss, and a re-import's logits, all within 1e-4 of ours."""
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids, labels=labels)
        assert (ours - theirs.logits).abs().max().item() <= 1e-4
        assert (ours - reimported(ids)).abs().max().item() <= 1e-4
        assert theirs.loss.item() == pytest.approx(model(ids[:, :-1], labels[:, 1:].clamp(min=-1)).item(), abs=1e-4)


def test_tied_export_and_reimport_round_trip(tmp_path, tokenizer, texts):
    model = trained_model(tokenizer, texts, tie=True, steps=2)
    export_hf(model, tokenizer, tmp_path / "tied")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    reimported, hf_tokenizer, _ = load_hf_model(tmp_path / "tied")
    ids = torch.tensor([tokenizer.encode(texts["val"][5], prepend="<|bos|>")[:100]])
    assert_same_logits_and_loss(model, hf_model, reimported, ids)
    assert hf_tokenizer.special_tokens == tokenizer.special_tokens
    assert hf_tokenizer.encode(texts["val"][6]) == tokenizer.encode(texts["val"][6])


def test_recovered_merges_rebuild_every_token(tokenizer):
    merges = recover_merges(tokenizer.mergeable_ranks)
    assert len(merges) == len(tokenizer.mergeable_ranks) - 256
    by_rank = sorted((r, t) for t, r in tokenizer.mergeable_ranks.items() if len(t) > 1)
    assert [a + b for a, b in merges] == [t for _, t in by_rank]


# what transformers' NanoChat architecture cannot express, per switch case: these get our own modeling code
REMOTE = {"swiglu", "norm_weight", "value_embeds", "windows", "residual_scalars", "smear", "backout", "qk_scale",
          "frontier", "no_qk_norm", "no_embed_norm"}
EXPORT_CASES = {**SWITCH_CASES, "no_qk_norm": dict(qk_norm=False), "no_embed_norm": dict(embed_norm=False)}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_every_switch_exports_with_our_logits_and_reimports(tmp_path, tokenizer, case, capsys):
    """Native NanoChat where it can express the model, else our own modeling code (trust_remote_code=True);
    transformers' logits and a re-import both match ours."""
    model = random_gpt(tokenizer.vocab_size, **EXPORT_CASES[case])
    export_hf(model, tokenizer, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == ("nanochat_remote" if case in REMOTE else "nanochat")
    assert ("trust_remote_code=True" in capsys.readouterr().out) == (case in REMOTE)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                 trust_remote_code=case in REMOTE).eval()
    reimported, _, _ = load_hf_model(tmp_path / "out")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    assert_same_logits_and_loss(model, hf_model, reimported, ids)
    with torch.no_grad():
        # generate() runs (the remote model has no KV cache) and is our greedy decoding, up to an early stop at eos
        prompt = ids[:1, :8]
        generated = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                      do_sample=False)
        expected = prompt
        for _ in range(4):
            expected = torch.cat([expected, model(expected)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated, expected[:, :generated.shape[1]])
    if case in REMOTE:
        padded = torch.ones_like(ids)
        padded[1, :3] = 0
        with pytest.raises(ValueError, match="padded batches are not supported"):
            hf_model(ids, attention_mask=padded)


def test_cli_refuses_a_non_empty_out_dir_in_one_line(exported, tmp_path):
    _, out = exported
    result = subprocess.run([sys.executable, "-m", "scripts.export", "--out", str(out)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --out {out} already exists and is not empty; "
                                                  "pass a new directory"]
