"""Loading the served model: a merged folder (fast path), or a base plus an unmerged PEFT adapter (bf16 or NF4).

safetensors only and `trust_remote_code=False` always: a served folder is data, never code. A hub id is read at
its pinned revision with the token from the environment (`birbal.models.hub_token`), never from a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from birbal.config.model import QuantizationConfig
from birbal.errors import ServeError
from birbal.models import DTYPES, disable_cpu_4bit_repack, hub_token

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _require_safetensors(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise ServeError(f"{what} {folder} has no config.json: is it a model folder (export/merged/)?")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (it holds pickle weights {pickles}, which are never loaded)" if pickles else ""
        raise ServeError(f"{what} {folder} holds no *.safetensors weights{hint}")


def load_tokenizer_folder(folder: Path):
    """The tokenizer saved beside the weights (the export writes it into merged/)."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        raise ServeError(f"{folder} has no tokenizer_config.json: the export writes the tokenizer beside the weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ServeError(f"tokenizer in {folder} could not be loaded: {err}") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ServeError(f"tokenizer in {folder} has no BOS or EOS token")
    return tokenizer


def load_merged(folder: Path, dtype: str, device: torch.device, attn_implementation: str = "sdpa"):
    """The export's merged model folder, in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    _require_safetensors(folder, "merged model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=DTYPES[dtype], device_map={"": str(device)}, use_safetensors=True,
            trust_remote_code=False, local_files_only=True, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ServeError(f"merged model {folder} could not be loaded: {err}") from None
    return model.eval()


def load_base_with_adapter(base: str, adapter: Path, dtype: str, device: torch.device, *,
                           revision: str | None = None, quantization: QuantizationConfig | None = None,
                           attn_implementation: str = "sdpa"):
    """`base` (local folder, or hub id at `revision`) with the PEFT adapter in `adapter` applied, unmerged.

    With `quantization` the base is loaded in 4 bits (NF4 by default) to fit a 24 GB card with room; the adapter
    stays in `dtype`. On CPU bitsandbytes' in-place weight repack is switched off (PLATFORM_NOTES.md).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ServeError(f"adapter folder {adapter} must hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    local = Path(base).expanduser()
    if local.exists():
        _require_safetensors(local, "base model folder")
    elif revision is None:
        raise ServeError(f"base model {base!r} is neither a local folder nor pinned to a revision")
    kwargs: dict = {}
    if quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=DTYPES[quantization.compute_dtype], bnb_4bit_quant_storage=torch.uint8)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.exists() else base, revision=None if local.exists() else revision,
            token=hub_token(), dtype=DTYPES[dtype], device_map={"": str(device)}, use_safetensors=True,
            trust_remote_code=False, attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError) as err:
        raise ServeError(f"base model {base}@{revision} could not be loaded: {err}") from None
    if quantization is not None and device.type == "cpu":
        disable_cpu_4bit_repack(model)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise ServeError(f"adapter {adapter} does not fit base {base}: {err}") from None
    return model.eval()
