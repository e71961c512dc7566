"""birbal.serve.attention: one query token over a grouped-query cache, KV heads never expanded, gives what
transformers' SDPA attention gives with its expanded heads."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from birbal.serve.attention import NAME, sdpa_packed_gqa, use_packed_gqa_attention


class _Attention(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def _qkv(q_len: int, kv_len: int, generator: torch.Generator):
    query = torch.randn(1, 8, q_len, 16, generator=generator)
    key, value = (torch.randn(1, 2, kv_len, 16, generator=generator) for _ in range(2))
    return query, key, value


@pytest.mark.parametrize("masked", [True, False])
def test_one_query_token_matches_expanded_heads(masked):
    generator = torch.Generator().manual_seed(0)
    query, key, value = _qkv(1, 12, generator)
    # a static cache's mask: the first 7 slots filled, a window that has dropped the first 2
    mask = torch.tensor([[[[False, False] + [True] * 5 + [False] * 5]]]) if masked else None
    ours, _ = sdpa_packed_gqa(_Attention(), query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, 1, 8, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if masked:  # the masked slots really are out: changing them changes nothing
        key[:, :, :2] += 100.0
        again, _ = sdpa_packed_gqa(_Attention(), query, key, value, mask, scaling=0.25)
        torch.testing.assert_close(again, ours)


def test_prefill_goes_to_transformers_sdpa_unchanged():
    generator = torch.Generator().manual_seed(1)
    query, key, value = _qkv(5, 5, generator)
    ours, _ = sdpa_packed_gqa(_Attention(), query, key, value, None, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Attention(), query, key, value, None, scaling=0.25)
    assert torch.equal(ours, theirs)


def test_only_sdpa_models_are_switched():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    sdpa = MistralForCausalLM._from_config(config, attn_implementation="sdpa")
    assert use_packed_gqa_attention(sdpa) and sdpa.config._attn_implementation == NAME
    eager = MistralForCausalLM._from_config(config, attn_implementation="eager")
    assert not use_packed_gqa_attention(eager) and eager.config._attn_implementation == "eager"
