"""The export's bf16 merge check at the Mistral-7B shape on a GPU (issue 13 item 4): random bf16 weights of
Mistral-7B-v0.1's exact shape, the 4090 recipe's LoRA (r=128, alpha=256, all seven projections) with non-zero B,
merged by birbal.export.merge's own functions: the weight-space check passes on every layer, the forward check
passes, and the figures are printed (and written to $OUT/gpu_merge.json when OUT is set) for the record.

Run: `pytest -q -p no:cacheprovider -m gpu tests/test_gpu_merge.py -s` (about 15 GB of GPU memory, a minute).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Mistral-7B-v0.1's config.json (hub revision 26bca36b, the one configs/birbal-4090.yaml pins).
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False)


def test_bf16_merge_check_at_the_mistral_7b_shape():
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from birbal.config import load_recipe
    from birbal.export import merge as m

    lora = load_recipe("birbal-4090").lora
    torch.manual_seed(0)
    started = time.monotonic()
    with torch.device("cuda"):
        base = MistralForCausalLM(MistralConfig(**MISTRAL_7B, attn_implementation="sdpa")).to(torch.bfloat16).eval()
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)  # non-zero, as after training (peft initialises B to zero)
    model.eval()
    probe = torch.randint(0, MISTRAL_7B["vocab_size"], (1, 32), device="cuda")
    with torch.no_grad():
        unmerged = model(input_ids=probe, use_cache=False).logits.float()
        merged, weights = m.merge_checked(model, torch.bfloat16)
        merged_logits = merged(input_ids=probe, use_cache=False).logits.float()
    figures = {**m.compare_logits(unmerged, merged_logits, torch.bfloat16), **weights,
               "seconds": round(time.monotonic() - started, 1),
               "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "torch": torch.__version__}
    print(json.dumps(figures, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_merge.json").write_text(json.dumps(figures, indent=1))
    assert weights["merged_layers"] == 32 * 7 and weights["merge_weight_error_ratio"] <= 1.0
    assert figures["merge_relative_logit_diff"] <= m.MAX_RELATIVE_LOGIT_DIFF
