"""Import of Llama-family Hugging Face checkpoints: a tiny random LlamaForCausalLM built with transformers and a
byte-level BPE trained with HF `tokenizers` on real shard text, imported with scripts.import_hf, must give the
same logits and the same greedy tokens as transformers; the tokenizer adapter must behave like ours."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFCore  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from nanochat.checkpoint import load_model  # noqa: E402
from nanochat.common import UserError  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.encoding import HFEncoding  # noqa: E402
from nanochat.hf_import import import_hf  # noqa: E402
from nanochat.optim import setup_optimizers  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer  # noqa: E402
from scripts import import_hf as import_script  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shard_texts(shared_data) -> list[str]:
    table = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet", columns=["text"])
    return table.column("text").to_pylist()[:80]


def train_hf_tokenizer(texts: list[str]) -> HFCore:
    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts[:60], trainer)
    return core


def save_llama(directory, texts, tie: bool, **config_overrides):
    """A random LlamaForCausalLM (norm gains perturbed so they matter) saved as safetensors + tokenizer.json."""
    core = train_hf_tokenizer(texts)
    settings = dict(vocab_size=core.get_vocab_size(), hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                    bos_token_id=core.token_to_id("<s>"), eos_token_id=core.token_to_id("</s>"),
                    tie_word_embeddings=tie, rope_theta=5000.0, rms_norm_eps=1e-5)
    settings.update(config_overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    core.save(str(directory / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def llama_factory(tmp_path_factory, shard_texts):
    """Saved tiny Llama folders by tie_word_embeddings, each built once per module."""
    built = {}

    def get(tie: bool):
        if tie not in built:
            directory = tmp_path_factory.mktemp("llama_tied" if tie else "llama")
            built[tie] = directory, save_llama(directory, shard_texts, tie=tie)
        return built[tie]

    return get


@pytest.fixture
def llama(llama_factory):
    return llama_factory(False)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_llama_matches_transformers_logits_and_greedy_tokens(llama_factory, tie, base_dir, shard_texts):
    directory, reference = llama_factory(tie)
    import_script.main(["--model", str(directory), "--out_tag", "tiny-llama"])
    model, tokenizer, meta = load_model("base", "cpu", tag="tiny-llama")
    assert isinstance(tokenizer.encoding, HFEncoding) and meta["hf_model_type"] == "llama"
    vocab = reference.config.vocab_size

    ids = tokenizer.encode(shard_texts[70], prepend="<|bos|>")[:96]
    assert ids[0] == reference.config.bos_token_id
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])), reference(torch.tensor([ids])).logits
    assert (ours[..., :vocab] - theirs).abs().max().item() <= 1e-4

    prompt = ids[:12]
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=40, temperature=0.0)
    stops = [reference.config.eos_token_id, reference.config.bos_token_id]
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                       eos_token_id=stops, pad_token_id=stops[0])[0].tolist()
    if generated[-1] in stops:
        generated = generated[:-1]  # the engine leaves its stop token out of results
    assert results[0] == generated


def test_adapter_speaks_our_tokenizer_interface(llama, base_dir, shard_texts):
    directory, reference = llama
    import_hf(directory, "tiny")
    tokenizer = get_tokenizer()
    vocab = reference.config.vocab_size
    core = HFCore.from_file(str(directory / "tokenizer.json"))

    text = shard_texts[71][:400]
    assert tokenizer.encode(text) == core.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode([text, "abc"], append="<|assistant_end|>")[1][-1] == reference.config.eos_token_id
    # special-token text a user types stays ordinary bytes
    typed = tokenizer.encode("<|user_start|></s>")
    assert tokenizer.decode(typed) == "<|user_start|></s>"
    assert not set(typed) & {*tokenizer.special_tokens.values(), reference.config.eos_token_id}
    assert tokenizer.encode_special("<|bos|>") == reference.config.bos_token_id
    appended = [tokenizer.encode_special(name) for name in SPECIAL_TOKENS[1:] if name != "<|assistant_end|>"]
    assert appended == list(range(vocab, vocab + 7)) and tokenizer.vocab_size == vocab + 7

    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids, mask = tokenizer.render_conversation(conversation)
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.encode_special("<|user_start|>")]
    assert ids[-1] == reference.config.eos_token_id and mask[-1] == 1
    assert tokenizer.render_for_completion(conversation)[-1] == tokenizer.encode_special("<|assistant_start|>")
    lengths = tokenizer.token_bytes()
    assert lengths.shape == (vocab + 7,) and lengths[reference.config.bos_token_id] == 0
    assert sum(lengths[i].item() for i in tokenizer.encode(text)) == len(text.encode("utf-8"))


def test_imported_model_fine_tunes_with_our_optimizers(llama, base_dir, shard_texts):
    directory, _ = llama
    import_hf(directory, "tiny")
    model, tokenizer, _ = load_model("base", "cpu")
    model.train()
    optimizers = setup_optimizers(model)
    gain = model.blocks[0].norm_attn.weight.detach().clone()
    ids = torch.tensor([tokenizer.render_conversation(
        {"messages": [{"role": "user", "content": shard_texts[1][:100]},
                      {"role": "assistant", "content": shard_texts[2][:100]}]})[0][:65]])
    losses = []
    for _ in range(4):
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(gain, model.blocks[0].norm_attn.weight)


@pytest.mark.parametrize("override, message", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_llama_configs_are_refused(tmp_path, base_dir, shard_texts, override, message):
    save_llama(tmp_path, shard_texts, tie=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(override)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        import_hf(tmp_path, "refused")
    assert not (base_dir / "tokenizer").exists()


def test_import_refuses_pickles_and_a_base_dir_with_our_tokenizer(llama, tmp_path, base_dir, shard_texts):
    directory, _ = llama
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (pickled / name).write_bytes((directory / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="only pickled .bin weights"):
        import_hf(pickled, "pickled")
    Tokenizer.train_from_iterator(shard_texts[:5], 300).save(base_dir / "tokenizer")
    result = subprocess.run([sys.executable, "-m", "scripts.import_hf", "--model", str(directory),
                             "--out_tag", "x"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "fresh base dir" in result.stderr
    assert "Traceback" not in result.stderr
