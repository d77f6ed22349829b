"""Export a nanochat model and tokenizer as a Hugging Face folder that `transformers` loads: without custom code
when its NanoChat class can express the model, else with our own modeling code (`trust_remote_code=True`).

    out/
        config.json              model_type "nanochat" (the NanoChat architecture transformers ships)
        generation_config.json   eos = <|assistant_end|>
        model.safetensors        float32 weights under transformers' names
        tokenizer.json           byte-level BPE for HF `tokenizers`: our ranks, merges, split pattern, specials
        tokenizer_config.json    special-token names and a chat_template that renders like ours

Weights: transformers' NanoChat rotates with `rotate_half(x) = (x2, -x1)`, ours with Llama's `(-x2, x1)`, i.e.
the opposite angle. Negating the second half of every query and key head (rows of c_q and c_k) turns one into
the other: QK-norm has no gain, so it commutes with the sign flip, and the flip cancels in q·k. Padded vocab
rows are dropped. The frontier init and compute-dtype embeddings export natively (weights are float32 either way).

Configurations that architecture cannot express (SwiGLU, learnable norms, no QK-norm, and the frontier switches:
value embeddings, sliding windows, residual scalars, smear, backout, QK scale) get model_type "nanochat_remote":
config.json carries our GPTConfig and an auto_map, model.safetensors our own parameter names under `model.`, and
`modeling_nanochat_remote.py` (nanochat/hf_modeling.py) wraps our GPT, shipped with gpt.py and the modules it
imports, so transformers runs exactly our forward pass. load_hf_model reads both formats back.

Merges: tiktoken ranks carry no merge list; the merge that made token t is what byte-pair encoding of t's bytes
with only the ranks below t's leaves: exactly two parts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizerCore

from nanochat.common import UserError, atomic_path, atomic_write, fsync_dir, print0
from nanochat.encoding import BYTE_TO_CHAR
from nanochat.gpt import GPT
from nanochat.model_config import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# The chat template: renders exactly like Tokenizer.render_conversation (system folded into the first user turn
# with a blank line, assistant parts as text / python / python_output) and, with add_generation_prompt, like
# render_for_completion. The tokenizer must not add <|bos|> itself when a template is applied
# (transformers' apply_chat_template passes add_special_tokens=False).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{{ ns.system + message['content'] }}<|user_end|>"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}"
    "<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}"
    "<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def byte_level(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair encode `token` using only ranks below `max_rank` (lowest-ranked pair first, as tiktoken does)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that reproduces tiktoken's encoding under merge-priority BPE."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise UserError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens; "
                            "these ranks were not learned by byte-pair merging and cannot be exported")
        merges.append((parts[0], parts[1]))
    return merges


def build_hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizerCore:
    """Our ranks as an HF `tokenizers` byte-level BPE with the same split pattern and special-token ids.

    Plain `encode` prepends <|bos|> (so `tokenizer(text)` is model-ready); chat templates and
    `add_special_tokens=False` do not."""
    ranks = tokenizer.mergeable_ranks
    if sum(len(token) == 1 for token in ranks) != 256:
        raise UserError("the tokenizer lacks some of the 256 single-byte tokens; it cannot be exported")
    vocab = {byte_level(token): rank for token, rank in ranks.items()}
    merges = [(byte_level(a), byte_level(b)) for a, b in recover_merges(ranks)]
    # ignore_merges: a pre-token that is itself a token maps straight to it, as in tiktoken
    hf = HFTokenizerCore(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    for name, expected in tokenizer.special_tokens.items():
        if hf.token_to_id(name) != expected:
            raise UserError(f"special token {name} landed on id {hf.token_to_id(name)}, not {expected}; "
                            "the vocabulary has gaps and cannot be exported")
    bos = tokenizer.bos_token_id
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    return hf


# ---------------------------------------------------------------------------------------------------------
# Model

def native_refusal(config: GPTConfig) -> str | None:
    """Why transformers' NanoChat architecture cannot express `config` (the first reason), or None."""
    reasons = []
    if config.mlp != "relu2":
        reasons.append(f"its MLP is {config.mlp} (the architecture has ReLU² only)")
    if config.norm_weight:
        reasons.append("its RMSNorms have learnable weights (the architecture's are parameter-free)")
    if not config.qk_norm:
        reasons.append("it has no QK-norm (the architecture always normalises queries and keys)")
    if not config.embed_norm:
        reasons.append("it does not normalise the embedding (the architecture always does)")
    frontier = [("value_embeds", config.value_embeds), ("window_pattern", any(config.windows)),
                ("residual_scalars", config.residual_scalars), ("smear", config.smear),
                ("backout", config.backout), ("qk_scale", config.qk_scale != 1.0)]
    reasons += [f"--{switch} is set (the architecture has no such part)" for switch, on in frontier if on]
    if config.num_heads * config.head_dim != config.model_dim:
        reasons.append(f"num_heads × head_dim ({config.num_heads} × {config.head_dim}) is not model_dim "
                       f"{config.model_dim} (the architecture derives head_dim from them)")
    return reasons[0] if reasons else None


def check_exportable(config: GPTConfig) -> None:
    reason = native_refusal(config)
    if reason:
        raise UserError(f"cannot export to the transformers nanochat architecture: {reason}")


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    check_exportable(config)
    eos = tokenizer.encode_special("<|assistant_end|>")
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.model_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "max_position_embeddings": config.max_seq_len,
        "hidden_act": "relu2",
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "final_logit_softcapping": config.softcap if config.softcap > 0 else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "dtype": "float32",
    }


def flip_rotary_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Negate the second half of each head's output rows: our rotary convention <-> transformers' NanoChat one
    (the same map both ways)."""
    heads = weight.view(-1, head_dim, weight.size(-1)).clone()
    heads[:, head_dim // 2:] *= -1
    return heads.view_as(weight)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Float32 CPU tensors under NanoChatForCausalLM's parameter names."""
    config = model.config
    check_exportable(config)
    vocab, head_dim = config.vocab_size, config.head_dim

    def tensor(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous()

    state = {"model.embed_tokens.weight": tensor(model.wte.weight[:vocab])}
    if not config.tie_embeddings:
        state["lm_head.weight"] = tensor(model.lm_head.weight[:vocab])
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        state[f"{prefix}.self_attn.q_proj.weight"] = flip_rotary_halves(tensor(block.attn.c_q.weight), head_dim)
        state[f"{prefix}.self_attn.k_proj.weight"] = flip_rotary_halves(tensor(block.attn.c_k.weight), head_dim)
        state[f"{prefix}.self_attn.v_proj.weight"] = tensor(block.attn.c_v.weight)
        state[f"{prefix}.self_attn.o_proj.weight"] = tensor(block.attn.c_proj.weight)
        state[f"{prefix}.mlp.fc1.weight"] = tensor(block.mlp.c_fc.weight)
        state[f"{prefix}.mlp.fc2.weight"] = tensor(block.mlp.c_proj.weight)
    return state


# ---------------------------------------------------------------------------------------------------------
# Our own modeling code (trust_remote_code) for what the native class cannot express

REMOTE_MODEL_TYPE = "nanochat_remote"
REMOTE_MODELING = "modeling_nanochat_remote"


def remote_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    eos = tokenizer.encode_special("<|assistant_end|>")
    classes = f"{REMOTE_MODELING}.NanoChatRemote"
    return {"architectures": ["NanoChatRemoteForCausalLM"], "model_type": REMOTE_MODEL_TYPE,
            "auto_map": {"AutoConfig": f"{classes}Config", "AutoModelForCausalLM": f"{classes}ForCausalLM"},
            "nanochat_config": asdict(config), "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos, "dtype": "float32"}


def remote_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameter names under `model.`, float32; a tied lm_head is written as its own copy (safetensors
    refuses shared storage), so the wrapper loads it untied with equal values."""
    return {f"model.{name}": t.detach().to("cpu", torch.float32).contiguous().clone()
            for name, t in model.state_dict().items()}


NANOCHAT_IMPORT = re.compile(r"^(\s*)from nanochat\.(\w+) import", re.M)


def write_remote_code(directory: Path) -> None:
    """The wrapper and every nanochat module it reaches, with `from nanochat.x import` made relative
    (transformers copies the relative imports of a remote modeling file along with it, function-level ones too)."""
    package = Path(__file__).parent
    pending, written = [("hf_modeling", f"{REMOTE_MODELING}.py")], set()
    while pending:
        module, target = pending.pop()
        if module in written:
            continue
        written.add(module)
        text = (package / f"{module}.py").read_text(encoding="utf-8")
        pending += [(name, f"{name}.py") for _, name in NANOCHAT_IMPORT.findall(text)]
        atomic_write(directory / target, NANOCHAT_IMPORT.sub(r"\1from .\2 import", text))


# ---------------------------------------------------------------------------------------------------------
# The folder

def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def check_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; pass a new directory")
    return out


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write the folder atomically: everything goes to `<out>.tmp/` first, which is renamed when complete.

    Refuses an `out_dir` that exists and is not empty, so nothing of the user's is overwritten."""
    out = check_out_dir(out_dir)
    if not hasattr(tokenizer, "mergeable_ranks") or not isinstance(tokenizer.mergeable_ranks, dict) \
            or not tokenizer.mergeable_ranks:
        raise UserError("only models with a nanochat-trained tokenizer can be exported (this one was imported)")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {model.config.vocab_size}; "
                        "they do not belong together")
    reason = native_refusal(model.config)
    if reason is None:
        config, state = hf_config(model.config, tokenizer), hf_state_dict(model)
    else:
        print0(f"transformers' NanoChat cannot express this model: {reason}; writing our own modeling code "
               "(load with trust_remote_code=True)")
        config, state = remote_config(model.config, tokenizer), remote_state_dict(model)
    hf_tokenizer = build_hf_tokenizer(tokenizer)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with atomic_path(tmp / "model.safetensors") as path:
        save_file(state, path, metadata={"format": "pt"})
    if reason is not None:
        write_remote_code(tmp)
    write_json(tmp / "config.json", config)
    write_json(tmp / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"], "max_length": model.config.max_seq_len,
        # our modeling code keeps no KV cache: generate() must recompute (a cache would need Llama-style fields)
        **({"use_cache": False} if reason is not None else {})})
    with atomic_path(tmp / "tokenizer.json") as path:
        hf_tokenizer.save(str(path))
    write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>",
        "model_max_length": model.config.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    if out.exists():
        out.rmdir()  # checked empty above
    # rename last: a crash before this leaves only <out>.tmp, never a half-written export
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out
