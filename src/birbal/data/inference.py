"""Batched greedy generation with the recipe's base model, for the Natural Instructions predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from birbal.config import Recipe
from birbal.config.data import NIPredictions


def model_key(recipe: Recipe) -> dict[str, Any]:
    """What identifies the predicting model in the prediction cache's name."""
    model = recipe.model
    return {"source": model.source, "name_or_path": model.name_or_path, "revision": model.revision,
            "init_seed": model.init_seed if model.source == "random" else None,
            "load_in_4bit": recipe.quantization.load_in_4bit}


class BaseModelPredictor:
    """prompts -> greedy continuations (special tokens dropped, outer whitespace stripped), `batch` at a time.

    Prompts are left-padded so every row's continuation starts at the same position, and cut from the left to
    `max_prompt_tokens` so the instance (at the end of the prompt) is never lost.
    """

    def __init__(self, recipe: Recipe, cache_dir: Path, tokenizer, settings: NIPredictions,
                 device: torch.device | None = None):
        from birbal.models import DTYPES, load_base_model, resolve_device

        self.device = device or resolve_device(recipe.train.device)
        dtype = DTYPES[recipe.quantization.compute_dtype] if self.device.type == "cuda" else torch.float32
        self.model = load_base_model(recipe.model, cache_dir, self.device, dtype, recipe.quantization)
        self.model.eval()
        self.tokenizer = tokenizer
        self.settings = settings

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> list[str]:
        limit = self.settings.max_prompt_tokens
        encoded = [ids[-limit:] for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=self.settings.max_new_tokens, pad_token_id=pad,
                                  eos_token_id=self.tokenizer.eos_token_id)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]
