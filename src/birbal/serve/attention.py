"""`serve.decode_attention: grouped`: a decode step's attention over the static cache without copying the KV heads.

A 1-token step attends over every slot of its static cache with a mask, so transformers' SDPA path first expands
the 8 KV heads to the 32 query heads (`repeat_kv`, a copy of the cache layer, 4x its size) and then runs SDPA's
memory-efficient kernel, one block per head. At 2,048 slots that is about 72 MiB moved per layer for 8 MiB of keys
and values. Here the 4 query heads of each KV head are the rows of one matrix product: scores = Q_g K^T (bf16
product, fp32 accumulation), the mask, softmax in fp32, then P V: two batched GEMMs that read each key and value
once, and under `compiled_layers` the mask and softmax become one fused kernel.

The maths is the attention SDPA computes, in the order transformers' own `eager_attention_forward` computes it
(scores rounded to the model's dtype before the fp32 softmax), so results differ from SDPA's by float rounding only
(`tests/test_serve_decode.py::test_grouped_decode_attention_equals_sdpa`). Every other call (a prompt, a step without
a mask, a model without grouped heads) is transformers' SDPA, unchanged.

`serve.decode_attention: triton` is the same attention as Triton kernels (birbal.serve.flash_decode: split over
the cache's slots, blocks the mask excludes not read, then reduced, in a second kernel or folded into the first),
where they can run (CUDA, Triton); elsewhere, and for any call they do not cover, it is `grouped`.

Registered through transformers' own extension points (`AttentionInterface`, `AttentionMaskInterface`) under one
name each, whose mask is SDPA's; the model's `config._attn_implementation` is set to it.
"""

from __future__ import annotations

import torch

NAME = "birbal_grouped_sdpa"


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] != 1 or groups == 1 or attention_mask is None or attention_mask.dtype != torch.bool
            or dropout or not _plain(kwargs)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    rows = query.reshape(batch, kv_heads, groups, dim)  # head kv * groups + g, as repeat_kv orders them
    scores = torch.matmul(rows, key.transpose(2, 3)).float() * scale  # (batch, kv_heads, groups, slots)
    allowed = attention_mask.reshape(attention_mask.shape[0], 1, 1, slots)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (batch, kv_heads, groups, dim)
    return out.reshape(batch, 1, heads, dim), None  # SDPA's layout: (batch, q_len, heads, dim)


def _plain(kwargs: dict) -> bool:
    """No term the plain softmax attention lacks (T5's position bias, Gemma 2's soft cap, gpt-oss's sinks)."""
    return all(kwargs.get(term) is None for term in ("position_bias", "softcap", "s_aux"))


def triton_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            **kwargs):
    """birbal.serve.flash_decode's kernels for a decode step they cover, `grouped` (and so SDPA) otherwise."""
    from birbal.serve import flash_decode

    if not dropout and _plain(kwargs) and flash_decode.why_not(query, key, value, attention_mask) is None:
        scale = query.shape[-1]**-0.5 if scaling is None else scaling
        return flash_decode.decode_attention(query, key, value, attention_mask, scale), None
    return grouped_decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)


def use_grouped_decode_attention(model) -> str:
    """Register the grouped attention (once) and make `model` use it; returns its name."""
    return _use(model, NAME, grouped_decode_attention, "grouped")


def use_decode_attention(model, how: str) -> str:
    """`serve.decode_attention` other than sdpa made `model`'s attention; returns what its decode steps run:
    grouped's name, or for triton the kernels' op, or grouped's name and why the kernels cannot run here."""
    if how == "grouped":
        return use_grouped_decode_attention(model)
    if how != "triton":
        from birbal.errors import ServeError

        raise ServeError(f"serve.decode_attention must be sdpa, grouped or triton; given {how!r}")
    from birbal.serve import flash_decode

    device = next(model.parameters()).device
    reason = flash_decode.available() if device.type == "cuda" else "the model is not on a CUDA device"
    if reason is not None:
        return f"{use_grouped_decode_attention(model)}: {reason}"
    _use(model, flash_decode.NAME, triton_decode_attention, "triton")
    flash_decode.arrivals(device)  # the folded kernel's counters: made here, before any capture or trace
    return f"{flash_decode.OP} (Triton)"


def _use(model, name: str, function, how: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from birbal.models import unwrap_peft
    from birbal.serve import flash_decode

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    core = unwrap_peft(model)
    if core.config._attn_implementation not in ("sdpa", NAME, flash_decode.NAME):
        from birbal.errors import ServeError

        raise ServeError(f"serve.decode_attention={how} replaces SDPA's decode step; the model runs "
                         f"{core.config._attn_implementation!r} attention")
    core.config._attn_implementation = name
    return name
