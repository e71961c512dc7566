"""Merge the trained adapter into a full-precision copy of the base.

Never merge into the 4-bit model: `merge_and_unload()` there is lossy (max logit difference 0.17 against an
adapter effect of 0.92, PLATFORM_NOTES.md). The base is reloaded in bf16 (or fp32) and merged there instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from birbal.config import Recipe
from birbal.errors import ExportError
from birbal.fsutil import atomic_directory, atomic_write_text, hash_tree
from birbal.models import DTYPES, load_base_model, load_tokenizer

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
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    probe = tokenizer(PROBE_TEXT, return_tensors="pt").to(device)
    with torch.no_grad():
        unmerged_logits = model(**probe, use_cache=False).logits.float()
        merged = model.merge_and_unload()
        merged_logits = merged(**probe, use_cache=False).logits.float()
    max_diff = float((merged_logits - unmerged_logits).abs().max())
    tolerance = 1e-3 if dtype == torch.float32 else 0.25
    if not max_diff <= tolerance:
        raise ExportError(f"merged model disagrees with base + adapter: max logit difference {max_diff:.4g} "
                          f"> {tolerance} ({recipe.export.dtype})")
    with atomic_directory(out_dir / MERGED) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    with atomic_directory(out_dir / ADAPTER) as tmp:
        for file in adapter_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    hashes = hash_tree(out_dir, exclude=(CHECKSUMS, "stage.json"))
    atomic_write_text(out_dir / CHECKSUMS, "".join(f"{digest}  {name}\n" for name, digest in hashes.items()))
    return {"merge_max_logit_diff": max_diff, "dtype": recipe.export.dtype, "device": str(device),
            "parameters": sum(p.numel() for p in merged.parameters())}
