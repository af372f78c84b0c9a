"""Host-tier attention pieces (attention/host_tier.py) checked on their own."""

import torch

from strata.attention import host_tier, torch_ref


def test_fresh_prompts_attend_as_one_batched_call():
    """Runs of equal-length fresh prompts attend in one causal call: the same output as each
    prompt alone with its causal mask (GQA: 6 query heads over 2 KV heads)."""
    g = torch.Generator().manual_seed(0)
    n, length, heads, kv_heads, d, scale = 3, 7, 6, 2, 16, 0.25
    tokens = 2 + n * length      # two tokens before the run, which it must not touch
    q = torch.randn(tokens, heads, d, generator=g)
    k = torch.randn(tokens, kv_heads, d, generator=g)
    v = torch.randn(tokens, kv_heads, d, generator=g)
    out = torch.full_like(q, float("nan"))
    host_tier.fresh_prompts_attention(q, k, v, out, 2, n, length, scale)
    assert out[:2].isnan().all()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    for p in range(n):
        a, b = 2 + p * length, 2 + (p + 1) * length
        expected = torch_ref._sdpa(q[a:b], k[a:b], v[a:b], mask, scale, heads // kv_heads)
        torch.testing.assert_close(out[a:b], expected, rtol=1e-5, atol=1e-6)
