"""Import a Llama-family Hugging Face checkpoint (safetensors + config.json + tokenizer.json) into nanochat.

Supported: `model_type` "llama" (Llama 2/3 layout, also TinyLlama and SmolLM) and "nanochat" (transformers'
NanoChat, e.g. a folder written by `scripts.export`), plus "nanochat_remote" (our own export of a model the
native class cannot express: its config.json holds our GPTConfig, its weights our names). Llama maps onto GPTConfig's switches: SwiGLU MLP with
its hidden size, learnable RMSNorm gains, no QK-norm, no embedding norm, no soft-cap, its rope theta and tied
embeddings. Llama in transformers rotates with the same half-split convention as ours, so q/k weights copy
over as they are; NanoChat's are sign-flipped back (see hf_export). Anything else (biases, rope scaling,
sliding windows, other activations) is refused with a line that says why.

The tokenizer comes from the checkpoint's `tokenizer.json`: our Tokenizer holding an `HFEncoding`
(nanochat.encoding). A base dir holds one tokenizer, so the import installs it as
`<base>/tokenizer/hf_tokenizer.json` (+ `hf_special_tokens.json`), and `nanochat.tokenizer.get_tokenizer()`
returns it from then on.
Our chat format needs nanochat's special tokens: `<|bos|>` maps to the model's BOS, `<|assistant_end|>` to its
EOS, and the others (unless the vocabulary has them by name) are appended after the model's vocabulary, their
embedding and output rows copied from the EOS token's. So they only tie with EOS (which, lower id, wins a
greedy argmax) until chat_sft teaches them.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizerCore

from nanochat.checkpoint import CHECKPOINT_DIRS, build_model, checkpoint_dir, complete_steps, save_checkpoint
from nanochat.common import UserError, get_base_dir, print0
from nanochat.encoding import RANKS_FILE, SPECIAL_TOKENS, HFEncoding, is_hf_encoding_dir
from nanochat.hf_export import REMOTE_MODEL_TYPE, flip_rotary_halves
from nanochat.model_config import GPTConfig
from nanochat.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------------------
# Config and weights

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; --model must be a Hugging Face model folder") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from exc


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise UserError(f"rope scaling ({scaling or rope_type}) is not supported; only plain rotary models import")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def import_config(hf: dict, vocab_size: int) -> GPTConfig:
    """GPTConfig for a transformers config dict; `vocab_size` includes appended special tokens."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "nanochat"):
        raise UserError(f"model_type {model_type!r} is not supported; import llama-family (llama, e.g. TinyLlama, "
                        "SmolLM) or nanochat checkpoints")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserError(f"{key}=true is not supported (nanochat's linear layers have no biases)")
    if hf.get("sliding_window"):
        raise UserError("sliding-window attention is not supported")
    dim, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // num_heads
    if head_dim % 2:
        raise UserError(f"head_dim {head_dim} is odd; rotary needs an even head_dim")
    common = dict(depth=hf["num_hidden_layers"], model_dim=dim, num_heads=num_heads,
                  num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
                  max_seq_len=hf.get("max_position_embeddings", 2048), vocab_size=vocab_size,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=_rope_theta(hf),
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp_hidden_dim=hf["intermediate_size"])
    if num_heads % common["num_kv_heads"]:
        raise UserError(f"num_key_value_heads {common['num_kv_heads']} does not divide num_attention_heads {num_heads}")
    if model_type == "nanochat":
        if hf.get("hidden_act", "relu2") != "relu2":
            raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported for nanochat models (relu2 only)")
        softcap = hf.get("final_logit_softcapping")
        return GPTConfig(**common, softcap=float(softcap or 0.0))
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported for llama models (silu only)")
    return GPTConfig(**common, softcap=0.0, mlp="swiglu", norm_weight=True, qk_norm=False, embed_norm=False)


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json. Pickled .bin files are refused."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            state.update(load_file(model_dir / shard))
        return state
    if any(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir} has only pickled .bin weights; convert them to safetensors first "
                        "(pickle can run code, so nanochat does not load it)")
    raise UserError(f"{model_dir} has no model.safetensors (or model.safetensors.index.json)")


def import_state(hf_state: dict[str, torch.Tensor], hf: dict, config: GPTConfig, eos_id: int | None,
                 num_added: int) -> dict[str, torch.Tensor]:
    """Our state dict (float32, vocab rows padded) from transformers' parameter names."""
    nanochat = hf.get("model_type") == "nanochat"
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise UserError(f"the checkpoint lacks {name}; is config.json from the same model?")
        used.add(name)
        return hf_state[name].to(torch.float32)

    def vocab_rows(weight: torch.Tensor) -> torch.Tensor:
        if weight.size(0) != config.vocab_size - num_added:
            raise UserError(f"the checkpoint's vocab matrices have {weight.size(0)} rows but config.json says "
                            f"vocab_size {config.vocab_size - num_added}")
        # appended specials start as copies of EOS (zeros without one); padding rows are zero
        new_rows = (weight[eos_id].expand(num_added, -1) if eos_id is not None
                    else weight.new_zeros(num_added, weight.size(1)))
        padding = weight.new_zeros(config.padded_vocab_size - weight.size(0) - num_added, weight.size(1))
        return torch.cat([weight, new_rows, padding]).contiguous()

    embed = take("model.embed_tokens.weight")
    state = {"wte.weight": vocab_rows(embed)}
    if not config.tie_embeddings:
        state["lm_head.weight"] = vocab_rows(take("lm_head.weight"))
    elif "lm_head.weight" in hf_state:
        used.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    for i in range(config.depth):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        q, k = take(f"{src}.self_attn.q_proj.weight"), take(f"{src}.self_attn.k_proj.weight")
        if nanochat:
            q, k = flip_rotary_halves(q, config.head_dim), flip_rotary_halves(k, config.head_dim)
        state[f"{dst}.attn.c_q.weight"], state[f"{dst}.attn.c_k.weight"] = q, k
        state[f"{dst}.attn.c_v.weight"] = take(f"{src}.self_attn.v_proj.weight")
        state[f"{dst}.attn.c_proj.weight"] = take(f"{src}.self_attn.o_proj.weight")
        if nanochat:
            state[f"{dst}.mlp.c_fc.weight"] = take(f"{src}.mlp.fc1.weight")
            state[f"{dst}.mlp.c_proj.weight"] = take(f"{src}.mlp.fc2.weight")
        else:
            state[f"{dst}.mlp.c_fc.weight"] = take(f"{src}.mlp.gate_proj.weight")
            state[f"{dst}.mlp.c_up.weight"] = take(f"{src}.mlp.up_proj.weight")
            state[f"{dst}.mlp.c_proj.weight"] = take(f"{src}.mlp.down_proj.weight")
            state[f"{dst}.norm_attn.weight"] = take(f"{src}.input_layernorm.weight")
            state[f"{dst}.norm_mlp.weight"] = take(f"{src}.post_attention_layernorm.weight")
    if not nanochat:
        state["norm_f.weight"] = take("model.norm.weight")
    unused = sorted(name for name in hf_state if name not in used and "rotary_emb" not in name)
    if unused:
        raise UserError(f"the checkpoint has weights nanochat has no place for ({', '.join(unused[:3])}, ...); "
                        "its architecture is not a plain Llama")
    return state


def single_id(value) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def special_id(model_dir: Path, hf: dict, core: HFTokenizerCore, kind: str) -> int | None:
    """The model's BOS or EOS id: config.json first, else the token named in tokenizer_config.json."""
    value = single_id(hf.get(f"{kind}_token_id"))
    if value is not None:
        return int(value)
    token_config_path = model_dir / "tokenizer_config.json"
    name = read_json(token_config_path).get(f"{kind}_token") if token_config_path.is_file() else None
    if isinstance(name, dict):
        name = name.get("content")
    return core.token_to_id(name) if isinstance(name, str) else None


# ---------------------------------------------------------------------------------------------------------
# The import

def install_tokenizer(tokenizer: Tokenizer) -> Path:
    """Make `tokenizer` the base dir's tokenizer; refuses to replace a different one."""
    directory = get_base_dir() / "tokenizer"
    if (directory / RANKS_FILE).is_file():
        raise UserError(f"{directory} already holds a nanochat-trained tokenizer and a base dir has one tokenizer; "
                        "import into a fresh base dir (set NANOCHAT_BASE_DIR)")
    if is_hf_encoding_dir(directory):
        existing = HFEncoding.load(directory)
        if existing.core.to_str() != tokenizer.encoding.core.to_str() \
                or existing.special_tokens != tokenizer.special_tokens:
            raise UserError(f"{directory} already holds another imported tokenizer; import into a fresh base dir "
                            "(set NANOCHAT_BASE_DIR)")
        return directory
    return tokenizer.save(directory)


def load_hf_model(model_dir: str | Path, device="cpu"):
    """(GPT in eval mode, Tokenizer with an HFEncoding, transformers config dict) from a Hugging Face model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} is not a directory")
    hf = read_json(model_dir / "config.json")
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json (a fast HF tokenizer); "
                        "only models that ship one can be imported")
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8")
    core = HFTokenizerCore.from_str(tokenizer_json)
    bos_id, eos_id = special_id(model_dir, hf, core, "bos"), special_id(model_dir, hf, core, "eos")
    model_vocab = hf.get("vocab_size")
    if not isinstance(model_vocab, int) or model_vocab < 1:
        raise UserError(f"{model_dir / 'config.json'} has no valid vocab_size")
    encoding, added = HFEncoding.with_our_specials(tokenizer_json, bos_id, eos_id, model_vocab)
    tokenizer = Tokenizer(encoding)
    if hf.get("model_type") == REMOTE_MODEL_TYPE:  # our own export: our config and parameter names
        config = GPTConfig(**hf["nanochat_config"])
        state = {name.removeprefix("model."): t for name, t in read_hf_weights(model_dir).items()}
    else:
        config = import_config(hf, model_vocab + len(added))
        state = import_state(read_hf_weights(model_dir), hf, config, eos_id, len(added))
    model = build_model({"model_config": asdict(config)}, torch.device(device), model_state=state)
    model.eval()
    return model, tokenizer, hf


def import_hf(model_dir: str | Path, tag: str, source: str = "base") -> Path:
    """Import into `<base>/<source>_checkpoints/<tag>/step_000000` and install the tokenizer. Returns the step dir."""
    if source not in CHECKPOINT_DIRS:
        raise UserError(f"--source must be one of {', '.join(CHECKPOINT_DIRS)}, got {source!r}")
    tag_dir = checkpoint_dir(source, tag)
    if complete_steps(tag_dir):
        raise UserError(f"{tag_dir} already has checkpoints; pick another --out_tag")
    model, tokenizer, hf = load_hf_model(model_dir)
    added = [name for name in SPECIAL_TOKENS if tokenizer.special_tokens[name] >= hf["vocab_size"]]
    install_tokenizer(tokenizer)
    meta = {"imported_from": str(Path(model_dir).resolve()), "hf_model_type": hf["model_type"],
            "added_special_tokens": added}
    step_path = save_checkpoint(tag_dir, 0, model, [], meta, {}, keep_last=-1)
    print0(f"imported {hf['model_type']} model ({model.num_params()['total']:,} parameters) into {step_path}"
           + (f"; appended special tokens {', '.join(added)}" if added else ""))
    return step_path
