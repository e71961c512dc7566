"""The comparison's scoring on a CUDA device: the same weights twice in bf16 give KL 0 and full agreement; the
same weights in bf16 against fp32 give a small positive KL (rounding), judged no worse than "same weights up to
rounding".

Run on a CUDA machine with `invoke test --gpu -k compare` (or `pytest -m gpu tests/test_gpu_compare.py`).
"""

from __future__ import annotations

import pytest
import torch

from birbal.evaluate.compare import (
    ProbeConfig,
    build_probes,
    model_verdict,
    score_against_reference,
    score_reference,
    tokenize_probes,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _check(folder, dtype_ref: str, dtype_this: str, tokenizer, probes, device=None) -> dict:
    from birbal.serve.loading import load_merged

    device = device or torch.device("cuda", torch.cuda.current_device())
    model = load_merged(folder, dtype_ref, device)
    reference = score_reference(model, probes, device)
    del model
    model = load_merged(folder, dtype_this, device)
    result = score_against_reference(model, probes, reference, device, tokenizer)
    result["verdict"] = model_verdict(result)
    return result


def test_same_weights_on_cuda(smoke_recipe, tokenizer, tmp_path):
    from birbal.models import materialise_random_base

    folder = materialise_random_base(smoke_recipe.model, tmp_path / "random-base")
    probes = tokenize_probes(build_probes(None, "birbal", ProbeConfig(0, 3, 256)), tokenizer, 256)
    assert len(probes) >= 6
    same = _check(folder, "bfloat16", "bfloat16", tokenizer, probes)
    assert same["worst"]["kl"] <= 1e-6 and same["agreement"] == 1.0, same["verdict"]
    rounded = _check(folder, "float32", "bfloat16", tokenizer, probes)
    assert 0.0 < rounded["mean_kl"] <= 1e-3, rounded["verdict"]
