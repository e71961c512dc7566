"""Merge the trained adapter into a full-precision copy of the base, and prove the merge right.

Never merge into the 4-bit model: `merge_and_unload()` there is lossy (max logit difference 0.17 against an
adapter effect of 0.92, PLATFORM_NOTES.md). The base is reloaded in bf16 (or fp32) and merged there instead.

The check (issue 13 item 4). A fixed bound on the max absolute logit difference between the merged model and base +
adapter is not a test of a bf16 merge: both sides are bf16 forwards through 32 layers, whose rounding differs by
more than 0.25 on some logit of a correct merge (0.31 at the Mistral-7B shape, 0.34 on the smoke profile), and by
more as the adapter grows. So the merge is checked where it happens, in weight space, against an fp32 reference:

1. Every merged weight, one layer at a time: `W' = round(W + s * B @ A)` must lie within
   `2u * |W + s*BA| + 3u * |s*BA| + r * eps32 * s * (|B| @ |A|)` of the fp32 value `W + s*BA` (u: the export
   dtype's unit roundoff, 2^-8 for bf16, 2^-24 for fp32). That is up to two roundings of the delta (peft computes it
   in the adapter's dtype, then casts) and one of the sum, with margin, plus fp32 accumulation-order differences
   over the rank-r product. A merge that drops, doubles or
   mis-scales the adapter, or hits the wrong module, misses this bound by orders of magnitude wherever the adapter
   is non-zero; a correct one passes it whatever the adapter's size. No fp32 copy of the model is made (a 7B fp32
   copy would not fit a 24 GB card): each layer's reference lives only while that layer is merged.
2. The forward, as a whole-model sanity check: merged and base + adapter, both in the export dtype, on a probe.
   fp32: max absolute logit difference <= 1e-3 (the same maths, fp32 rounding only). bf16: the argmax token agrees
   on every probe position whose top-1 margin exceeds DECIDED_MARGIN_RMS x the RMS difference (near-ties, common in a
   random-weight model, may flip under rounding and are not counted), and the RMS difference over every logit is at most
   MAX_RELATIVE_LOGIT_DIFF of the logits' own scale (their standard deviation over the vocabulary, averaged over
   the positions). RMS, not max: the max over 16 x 32000 logits is an extreme value that grows with the vocabulary
   and with the adapter's size. bf16 keeps 8 significant bits (u = 0.39 %). Measured on CPU, merged vs base +
   adapter in bf16: the smoke profile's trained adapter (2 layers), RMS 0.013 x scale (max 0.14), top-1 16/16; each
   bf16 side against the fp32 model 0.012 x scale; the model without its adapter against the fp32 model 1.37 x scale,
   top-1 0/16. Random adapters on the smoke model: 2 layers 0.021 x scale, 8 layers 0.045 x scale (max 0.28, which
   the old fixed 0.25 rejected): the RMS grows about as the square root of the depth, so about 0.09 x scale at 32
   layers. The bound, 0.25 x scale, sits between that and the ~1.4 x scale of a model that is not the merged one.
   Point 1 catches a wrong merge of a small adapter, which this point cannot see.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from birbal.config import Recipe
from birbal.errors import ExportError
from birbal.fsutil import atomic_directory, atomic_write_text, hash_tree
from birbal.models import DTYPES, load_base_model, load_tokenizer, peft_without_deprecation_noise

MERGED = "merged"
ADAPTER = "adapter"
CHECKSUMS = "SHA256SUMS"
PROBE_TEXT = "### Input:\nThe capital of France is\n\n### Response:\n"


def check_adapter(adapter_dir: Path, recipe: Recipe) -> dict:
    """The adapter's PEFT config must be the recipe's LoRA; anything else would export the wrong model."""
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise ExportError(f"{adapter_dir} holds no adapter (adapter_config.json + adapter_model.safetensors): "
                          "run the train stage first")
    config = json.loads(config_path.read_text())
    lora = recipe.lora
    expected = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                "target_modules": sorted(lora.target_modules)}
    found = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "lora_dropout": config.get("lora_dropout"),
             "target_modules": sorted(config.get("target_modules") or [])}
    wrong = [f"{key}: adapter has {found[key]!r}, recipe says {expected[key]!r}"
             for key in expected if found[key] != expected[key]]
    if wrong:
        raise ExportError(f"{adapter_dir}: adapter does not match the recipe: " + "; ".join(wrong))
    return config


# bf16: the argmax must agree on every position whose margin the rounding cannot cross (see compare_logits).
MIN_TOP1_AGREEMENT = 1.0
DECIDED_MARGIN_RMS = 6.0
# bf16: the largest logit difference, as a fraction of the logits' scale (see the module docstring).
MAX_RELATIVE_LOGIT_DIFF = 0.25
FP32_MAX_LOGIT_DIFF = 1e-3


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def merge_checked(model, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """Merge every LoRA layer of a PeftModel in place, each checked against its fp32 reference; then unload.

    Returns (the merged base model, {"merge_weight_error_ratio": worst error / bound, "merged_layers": n}).
    Raises ExportError naming the first layer whose merged weight is outside the bound.
    """
    from peft.tuners.lora import LoraLayer

    u = _unit_roundoff(dtype)
    eps32 = torch.finfo(torch.float32).eps
    worst, layers = 0.0, 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not module.active_adapters:
            continue
        (adapter,) = module.active_adapters
        if getattr(module, "use_dora", {}).get(adapter):
            raise ExportError(f"{name}: DoRA adapters are not part of this recipe; the merge check covers LoRA")
        base = module.get_base_layer()
        a = module.lora_A[adapter].weight.float()
        b = module.lora_B[adapter].weight.float()
        scale = float(module.scaling[adapter])
        delta = (b @ a) * scale
        spread = (b.abs() @ a.abs()) * scale
        if getattr(module, "fan_in_fan_out", False):
            delta, spread = delta.T, spread.T
        reference = base.weight.float() + delta
        bound = 2 * u * reference.abs() + 3 * u * delta.abs() + a.shape[0] * eps32 * spread + torch.finfo(dtype).tiny
        module.merge(adapter_names=[adapter])
        ratio = float(((base.weight.float() - reference).abs() / bound).max())
        del a, b, delta, spread, reference, bound
        if not ratio <= 1.0:
            raise ExportError(f"merged weight {name} is off its fp32 reference W + s*B@A by {ratio:.3g}x the "
                              f"rounding bound of {dtype} (a wrong merge, not rounding)")
        worst, layers = max(worst, ratio), layers + 1
    if layers == 0:
        raise ExportError("the adapter has no LoRA layer to merge")
    return model.unload(), {"merge_weight_error_ratio": worst, "merged_layers": layers}


def compare_logits(unmerged: torch.Tensor, merged: torch.Tensor, dtype: torch.dtype) -> dict:
    """The forward check (module docstring, point 2); raises ExportError when it fails, else returns its figures."""
    unmerged, merged = unmerged.float().reshape(-1, unmerged.shape[-1]), merged.float().reshape(-1, merged.shape[-1])
    diff = merged - unmerged
    max_diff = float(diff.abs().max())
    rms = float(diff.pow(2).mean().sqrt())
    # Top-1 agreement counts only the positions whose argmax the rounding cannot move: the reference's margin over its
    # runner-up exceeds DECIDED_MARGIN_RMS x the RMS difference (a flip there is a 4-sigma event for noise of that
    # size). A random-weight model has near-ties at many positions (the top two of 32000 Gaussian logits are about
    # 0.2 sigma apart), where bf16 rounding flips the argmax of a correct merge.
    top2 = unmerged.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > DECIDED_MARGIN_RMS * rms
    same = merged.argmax(-1) == unmerged.argmax(-1)
    agreement = float(same[decided].float().mean()) if bool(decided.any()) else 1.0
    scale = float(unmerged.std(dim=-1).mean())
    relative = rms / scale if scale > 0 else float("inf")
    figures = {"merge_max_logit_diff": max_diff, "merge_top1_agreement": agreement, "merge_logit_scale": scale,
               "merge_relative_logit_diff": relative, "merge_decided_positions": int(decided.sum()),
               "merge_positions": int(decided.numel())}
    if dtype == torch.float32:
        if not max_diff <= FP32_MAX_LOGIT_DIFF:
            raise ExportError(f"merged model disagrees with base + adapter: max logit difference {max_diff:.4g} "
                              f"> {FP32_MAX_LOGIT_DIFF} (float32)")
    elif not (agreement >= MIN_TOP1_AGREEMENT and relative <= MAX_RELATIVE_LOGIT_DIFF):
        raise ExportError(f"merged model disagrees with base + adapter ({dtype}): top-1 agreement {agreement:.3f} "
                          f"(needs >= {MIN_TOP1_AGREEMENT}), RMS logit difference {relative:.3g} x the logits' scale "
                          f"{scale:.4g} (needs <= {MAX_RELATIVE_LOGIT_DIFF}; max difference {max_diff:.4g})")
    return figures


def merge_adapter(recipe: Recipe, adapter_dir: Path, out_dir: Path, cache_dir: Path) -> dict:
    """Write out_dir/merged (safetensors + tokenizer), out_dir/adapter (a copy) and out_dir/SHA256SUMS."""
    from peft import PeftModel

    check_adapter(adapter_dir, recipe)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[recipe.export.dtype]
    tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir)
    # The merge needs one probe forward, not training kernels: SDPA works on every device.
    model_cfg = recipe.model.model_copy(update={"attn_implementation": "sdpa"})
    base = load_base_model(model_cfg, cache_dir, device, dtype, quantization=None)
    with peft_without_deprecation_noise():
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    probe = tokenizer(PROBE_TEXT, return_tensors="pt").to(device)
    with torch.no_grad():
        unmerged_logits = model(**probe, use_cache=False).logits.float()
        merged, weight_check = merge_checked(model, dtype)
        merged_logits = merged(**probe, use_cache=False).logits.float()
    figures = {**compare_logits(unmerged_logits, merged_logits, dtype), **weight_check}
    with atomic_directory(out_dir / MERGED) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    with atomic_directory(out_dir / ADAPTER) as tmp:
        for file in adapter_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    hashes = hash_tree(out_dir, exclude=(CHECKSUMS, "stage.json"))
    atomic_write_text(out_dir / CHECKSUMS, "".join(f"{digest}  {name}\n" for name, digest in hashes.items()))
    return {**figures, "dtype": recipe.export.dtype, "device": str(device),
            "parameters": sum(p.numel() for p in merged.parameters())}
