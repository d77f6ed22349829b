"""transformers wrapper around our GPT, shipped as `modeling_nanochat_remote.py` in an export folder for the
models transformers' own NanoChat class cannot express (the frontier switches, SwiGLU, learnable norms, ...).
`scripts.export` copies this file and the model's modules (REMOTE_MODULES in hf_export) next to the weights with
their `nanochat.` imports made relative, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
runs exactly our forward pass. Nothing in nanochat imports this module; transformers is not a dependency.
"""
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from nanochat.gpt import GPT
from nanochat.model_config import GPTConfig


class NanoChatRemoteConfig(PretrainedConfig):
    model_type = "nanochat_remote"

    def __init__(self, nanochat_config: dict | None = None, **kwargs):
        self.nanochat_config = nanochat_config or {}  # our GPTConfig fields, as in a checkpoint's meta.json
        super().__init__(**kwargs)


class NanoChatRemoteForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatRemoteConfig
    base_model_prefix = "model"

    def __init__(self, config: NanoChatRemoteConfig):
        super().__init__(config)
        self.model = GPT(GPTConfig(**config.nanochat_config))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, GPT):
            module.init_rotary()  # non-persistent rotary tables; every weight comes from model.safetensors

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """Logits for the whole sequence (no KV cache: generate() recomputes each step); with `labels`, the
        mean next-token loss over labels != -100 (transformers' convention). Padding is refused: our forward
        has no attention mask, so padded rows would attend to their pads."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported by this export: pass unpadded rows (batch size 1)")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
