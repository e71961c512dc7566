"""Attention for a compiled decode step: one query token over the static KV cache, by PyTorch's flex decoding.

transformers' SDPA path serves the step badly on a GPU. A static cache always comes with a mask, and with a mask
it copies each layer's keys and values out from 8 KV heads to 32 (`repeat_kv`; 64 MiB written and read again per
layer and token on a 4096-slot cache). It then runs a kernel that splits the work only by head, so a few dozen
thread blocks walk 4096 slots each while most of the GPU idles. Folding the 4 query heads of a KV head into rows
(tried: `pack_gqa`, as in transformers 5.24) removes the copy but leaves 8 blocks, and measured slower on the
H200 (benchmarks/results/README.md). Flex decoding (`torch.nn.attention.flex_attention`, lowered by Inductor to
its split-KV decoding kernel) splits the cache across blocks as flash-decoding does, reads each KV head once for
its query heads (`enable_gqa`), and masks by a score modification. It is fast only compiled, so it serves
`serve.decode=compiled_graph`; every other shape (prefill, a maskless step) goes to transformers' own SDPA
function unchanged.
"""

from __future__ import annotations

import torch

from birbal.errors import ServeError
from birbal.models import unwrap_peft

NAME = "birbal_flex_decode"
CHOICES = ("auto", "sdpa", "flex")  # serve.decode_attention


def flex_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """A 1-token step over a static cache whose slot i holds position i (`StaticDecoder`'s cache: every layer
    full-length), masked from the step's position: the slots up to it, inside the sliding window.

    Why the position and not transformers' mask tensor: under torch.compile Inductor inlines the mask's own
    arithmetic (arange, comparisons) into the flex kernel's score function, and in torch 2.11 that inlined code
    fails to compile (`NameError: XBLOCK is not defined`, measured on the H200 with the 7B shape). The decoder
    passes `position_ids` as an input of the compiled step, so the kernel only loads one number. The rules are
    transformers' own (`causal_mask_function`, `sliding_window_overlay`): kv <= q, and kv > q - window.
    """
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    one_step = (query.shape[0] == 1 and query.shape[2] == 1 and attention_mask is not None
                and position_ids is not None and position_ids.numel() == 1)
    if not one_step or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, position_ids=position_ids, **kwargs)
    position = position_ids.reshape(())

    def masked(score, batch, head, q_idx, kv_idx):
        seen = kv_idx <= position
        if sliding_window is not None:
            seen = seen & (kv_idx > position - sliding_window)
        return torch.where(seen, score, -float("inf"))

    out = flex_attention(query, key, value, score_mod=masked, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def resolve_attention(requested: str, decode_mode: str) -> str:
    """`auto`: flex for a compiled decode step (the fastest measured), transformers' SDPA otherwise."""
    if requested not in CHOICES:
        raise ServeError(f"serve.decode_attention must be one of {', '.join(CHOICES)}; given {requested!r}")
    if requested == "auto":
        return "flex" if decode_mode == "compiled_graph" else "sdpa"
    if requested == "flex" and decode_mode != "compiled_graph":
        raise ServeError(f"serve.decode_attention=flex needs serve.decode=compiled_graph (flex attention is fast "
                         f"only compiled); the decode mode is {decode_mode}. Use sdpa, or auto.")
    return requested


def apply_decode_attention(model, choice: str) -> str:
    """Put a model that runs transformers' SDPA on `choice` (flex or sdpa) and return what it runs now.

    Setting sdpa back matters when engines share one model (the tests): the last engine built decides the eager
    forwards of all, while a captured graph keeps replaying what it captured. A model on another attention
    (eager) keeps it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    core = unwrap_peft(model)
    current = core.config._attn_implementation
    if current not in ("sdpa", NAME):
        return current
    if choice == "flex":
        AttentionInterface.register(NAME, flex_decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the boolean masks SDPA gets
    wanted = NAME if choice == "flex" else "sdpa"
    if current != wanted:
        core.set_attn_implementation(wanted)
    return choice
