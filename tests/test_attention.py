"""attend(): every backend agrees with attention written out by hand (windows, documents, GQA, decode steps)."""
import pytest
import torch

from nanochat import attention
from nanochat.attention import attend, expand_kv


def reference(q, k, v, window=None, doc_ids=None):
    """Softmax attention with the mask spelled out: query i (of the last Tq positions) sees key j when j <= i,
    i - j <= window and both are in the same document."""
    B, H, q_len, D = q.shape
    k_len = k.size(2)
    k, v = expand_kv(k, H), expand_kv(v, H)
    scores = q @ k.transpose(-1, -2) / D**0.5
    i = torch.arange(k_len - q_len, k_len)[:, None]
    j = torch.arange(k_len)[None, :]
    allowed = (j <= i) & (i - j <= (k_len if window is None else window))
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, i] == doc_ids[:, j])  # (B, Tq, Tk)
    allowed = allowed.expand(B, q_len, k_len)[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def qkv(B=2, H=4, kv_heads=2, T=20, D=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=generator), torch.randn(B, kv_heads, T, D, generator=generator),
            torch.randn(B, kv_heads, T, D, generator=generator))


DOC_IDS = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 20])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window, doc_ids", [(None, None), (5, None), (None, DOC_IDS), (3, DOC_IDS), (19, None)])
def test_training_shapes_match_the_spelled_out_mask(kv_heads, window, doc_ids):
    q, k, v = qkv(kv_heads=kv_heads)
    assert torch.allclose(attend(q, k, v, window=window, doc_ids=doc_ids), reference(q, k, v, window, doc_ids),
                          atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("q_len", [1, 3])
def test_cached_queries_see_the_window_of_earlier_keys(window, q_len):
    q, k, v = qkv()
    q = q[:, :, -q_len:]
    assert torch.allclose(attend(q, k, v, window=window), reference(q, k, v, window), atol=1e-5)


def test_documents_need_whole_rows():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        attend(q[:, :, -1:], k, v, doc_ids=DOC_IDS)


def test_expand_kv_matches_sdpa_gqa():
    q, k, v = qkv(kv_heads=2)
    native = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expanded = torch.nn.functional.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4), is_causal=True)
    assert torch.allclose(native, expanded, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("window, doc_ids", [(5, None), (None, DOC_IDS), (3, DOC_IDS)])
def test_flex_block_masks_match_the_spelled_out_mask(window, doc_ids):
    """The CUDA path (compiled FlexAttention, cached block masks), run forward-only on CPU where torch can."""
    q, k, v = qkv(T=256, seed=1)
    doc_ids = None if doc_ids is None else torch.cat([doc_ids, doc_ids + 3] * 6 + [doc_ids[:, :16]], dim=1)
    with torch.no_grad():
        out = attention.flex(q, k, v, window, doc_ids)
        # every layer of a forward reuses one block mask: built once per shape, or per doc_ids tensor
        assert attention.block_mask(256, window, doc_ids, q.device) is attention.block_mask(256, window, doc_ids,
                                                                                           q.device)
        assert torch.allclose(out, reference(q, k, v, window, doc_ids), atol=1e-4)


@pytest.mark.slow
def test_flex_traces_inside_a_compiled_model():
    """A compiled model (the trainer compiles on CUDA) traces the block mask and FlexAttention into its graph."""
    q, k, v = qkv(T=128, seed=2)
    doc_ids = (torch.arange(128) // 40).expand(2, -1).contiguous()
    compiled = torch.compile(lambda q, k, v, doc_ids: attention.flex(q, k, v, 9, doc_ids), dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(q, k, v, doc_ids), reference(q, k, v, 9, doc_ids), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, doc_ids", [(None, None), (5, None), (None, DOC_IDS)])
def test_gqa_with_masks_runs_a_fused_cpu_kernel(dtype, window, doc_ids):
    """Never SDPA's math kernel (B·H·T² scores), forward or backward, whatever the mask, dtype or GQA."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (t.to(dtype).requires_grad_() for t in qkv(kv_heads=2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attend(q, k, v, window=window, doc_ids=doc_ids).sum().backward()
    kernels = {event.key for event in prof.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= kernels
    assert not any("math" in name for name in kernels)
