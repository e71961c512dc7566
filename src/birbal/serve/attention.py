"""Attention for serving: a 1-token query over a grouped-query KV cache, without expanding the KV heads.

Mistral-7B has 32 query heads and 8 KV heads. With a mask (a static cache always has one), transformers' SDPA
path copies each layer's keys and values out to 32 heads (`repeat_kv`) before calling the kernel: on a 4096-slot
cache that is 64 MiB written and read again per layer and token, about a millisecond of a 7 ms decode step on an
H200. For one query token the 4 heads that share a KV head can instead be laid out as 4 query rows of that head,
and the kernel reads each key and value once. transformers 5.24 does this itself (`pack_gqa`) but not under
torch.compile, and 5.17 not at all, so it is registered here as an attention function of its own; every other
shape (prefill, or a model without grouped heads) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birbal.models import unwrap_peft

NAME = "birbal_sdpa_packed_gqa"


def sdpa_packed_gqa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    mask_shared = attention_mask is None or attention_mask.shape[1] == 1
    if query.shape[2] != 1 or groups == 1 or not mask_shared or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    # Head h reads KV head h // groups (transformers' repeat_kv order), so the reshape groups them by KV head.
    packed = query.reshape(batch, heads // groups, groups, dim)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]  # broadcast over rows
    # Never is_causal: the rows are heads of one position, not positions.
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_gqa_attention(model) -> bool:
    """Switch a model that runs transformers' SDPA to `sdpa_packed_gqa`; True when it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    core = unwrap_peft(model)
    if core.config._attn_implementation not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, sdpa_packed_gqa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks SDPA gets
    core.set_attn_implementation(NAME)
    return True
