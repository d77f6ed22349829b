"""Default switches leave the architecture bit for bit as it was: the model source at PINNED_COMMIT (before the
frontier switches) is loaded from git and compared with today's on the same seed (init, logits, loss, grads)."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT
from nanochat.model_config import GPTConfig
from tests.engine_helpers import perturb_projections

REPO = Path(__file__).resolve().parents[1]
PINNED_COMMIT = "b46cb04"  # the last commit before the frontier architecture switches

ARCHITECTURES = {
    "default": {},
    "gqa": dict(num_kv_heads=1),
    "tied": dict(tie_embeddings=True),
    "llama": dict(mlp="swiglu", mlp_hidden_dim=40, norm_weight=True, qk_norm=False, embed_norm=False, softcap=0.0),
}


@pytest.fixture(scope="module")
def pinned_gpt(tmp_path_factory):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git history of the repository")
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{PINNED_COMMIT}:nanochat/gpt.py"],
                            capture_output=True, text=True)
    if source.returncode:
        pytest.skip(f"commit {PINNED_COMMIT} is not in this clone: {source.stderr.strip()}")
    path = tmp_path_factory.mktemp("pinned") / "pinned_gpt.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("pinned_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def seeded(model_class, config):
    torch.manual_seed(0)
    model = model_class(config)
    model.init_weights()
    return perturb_projections(model)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_default_switches_are_bit_identical_to_the_pinned_model(pinned_gpt, name):
    shape = dict(depth=2, model_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=32, vocab_size=100)
    shape.update(ARCHITECTURES[name])
    old = seeded(pinned_gpt.GPT, pinned_gpt.GPTConfig(**shape))
    new = seeded(GPT, GPTConfig(**shape))
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    idx = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    doc_ids = (idx % 7 == 0).cumsum(dim=1)
    with torch.no_grad():
        assert torch.equal(old(idx), new(idx))
        assert torch.equal(old(idx, doc_ids=doc_ids), new(idx, doc_ids=doc_ids))
    for model in (old, new):
        model(idx[:, :-1], idx[:, 1:]).backward()
    old_grads = dict(old.named_parameters())
    for key, param in new.named_parameters():
        assert torch.equal(param.grad, old_grads[key].grad), key
