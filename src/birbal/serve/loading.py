"""Loading the served model: a merged folder (fast path), or a base plus an unmerged PEFT adapter (bf16 or NF4).

safetensors only and `trust_remote_code=False` always: a served folder is data, never code. A hub id is read at
its pinned revision with the token from the environment (`birbal.models.hub_token`), never from a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from birbal.config.model import QuantizationConfig
from birbal.errors import ServeError
from birbal.models import DTYPES, disable_cpu_4bit_repack, hub_token, peft_without_deprecation_noise
from birbal.serve.startup import PHASES

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
ADAPTER_FILES = (ADAPTER_CONFIG, *ADAPTER_WEIGHT_FILES)


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
    with PHASES.span("load.imports"):
        from transformers import AutoModelForCausalLM

    folder = Path(folder)
    _require_safetensors(folder, "merged model folder")
    try:
        with PHASES.span("load.weights"):
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=DTYPES[dtype], device_map={"": str(device)}, use_safetensors=True,
                trust_remote_code=False, local_files_only=True, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ServeError(f"merged model {folder} could not be loaded: {err}") from None
    return model.eval()


def fetch_published_adapter(repo_id: str, revision: str, cache_dir: Path | None = None) -> Path:
    """The folder of the hub adapter `repo_id` at commit `revision`: huggingface_hub's own cache (HF_HOME, or
    `cache_dir`), downloaded with HF_TOKEN from the environment when the commit is not there yet.

    The cache is tried first without the network (a commit is immutable, so a cached snapshot of it is that
    commit); then the hub. Any failure is one line naming the repository and the revision.
    """
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
                  allow_patterns=list(ADAPTER_FILES))
    try:
        folder = snapshot_download(**kwargs, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub raises several kinds): fetch it below
        try:
            folder = snapshot_download(**kwargs, token=hub_token())
        except Exception as err:  # noqa: BLE001 - network, auth, missing repo or revision: all one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ServeError(f"could not fetch the adapter {repo_id}@{revision} from the Hugging Face hub "
                             f"({type(err).__name__}: {first}); check network access and HF_TOKEN") from None
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not any((folder / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise ServeError(f"the adapter {repo_id}@{revision} holds no {ADAPTER_CONFIG} with "
                         f"{' or '.join(ADAPTER_WEIGHT_FILES)}")
    return folder


def load_base_with_adapter(base: str, adapter: Path, dtype: str, device: torch.device, *,
                           revision: str | None = None, quantization: QuantizationConfig | None = None,
                           attn_implementation: str = "sdpa", adapter_dtype: str = "base",
                           allow_pickle_adapter: bool = False):
    """`base` (local folder, or hub id at `revision`) with the PEFT adapter in `adapter` applied, unmerged.

    `adapter_dtype`: `base` keeps the LoRA weights in the base's dtype, as peft 0.5 and 0.6 did (their
    `LoraLayer.update_layer` moved a new adapter to the base weight's device and dtype), which is how the winners'
    server ran; `float32` upcasts them (peft's `autocast_adapter_dtype`, its default since 0.12).
    With `quantization` the base is loaded in 4 bits (NF4 by default) to fit a 24 GB card with room. On CPU
    bitsandbytes' in-place weight repack is switched off (PLATFORM_NOTES.md).
    `allow_pickle_adapter`: accept an `adapter_model.bin` (a published adapter of 2023 may hold only that); peft
    reads it with `torch.load(weights_only=True)`, which builds tensors and runs no code.
    """
    with PHASES.span("load.imports"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = Path(adapter)
    weights = ADAPTER_WEIGHT_FILES if allow_pickle_adapter else (ADAPTER_WEIGHTS,)
    if not (adapter / ADAPTER_CONFIG).is_file() or not any((adapter / name).is_file() for name in weights):
        raise ServeError(f"adapter folder {adapter} must hold {ADAPTER_CONFIG} and {' or '.join(weights)}")
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
        with PHASES.span("load.weights"):
            model = AutoModelForCausalLM.from_pretrained(
                str(local) if local.exists() else base, revision=None if local.exists() else revision,
                token=hub_token(), dtype=DTYPES[dtype], device_map={"": str(device)}, use_safetensors=True,
                trust_remote_code=False, attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError) as err:
        raise ServeError(f"base model {base}@{revision} could not be loaded: {err}") from None
    if quantization is not None and device.type == "cpu":
        disable_cpu_4bit_repack(model)
    try:
        with PHASES.span("load.adapter"):
            # low_cpu_mem_usage: the LoRA layers are made on the meta device and take the file's tensors as they
            # are (then peft moves them to the base layer's device and dtype), instead of being allocated on the
            # CPU and randomly initialised first, only to be overwritten (335M values at r=128 on the 7B: seconds
            # at every start). Only where the weights come out the same (tests/test_serve_startup.py compares
            # every parameter): adapter_dtype `base` on a bf16/fp32 base. With the float32 upcast the ordinary path
            # rounds the file's values through the base dtype first and this one does not, and on a 4-bit base the
            # uint8 weight leaves the file's dtype as it is: both keep peft's ordinary path.
            with peft_without_deprecation_noise():
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False,
                                                  autocast_adapter_dtype=adapter_dtype == "float32",
                                                  low_cpu_mem_usage=quantization is None and adapter_dtype == "base")
    except (OSError, ValueError, RuntimeError) as err:
        raise ServeError(f"adapter {adapter} does not fit base {base}: {err}") from None
    return model.eval()
