"""Tokenizer and base-model loading: pinned hub ids (token from the environment at run time) or local files.

The same functions serve the 7B recipe and the smoke profile; only the inputs differ (a hub id at a pinned
revision, or a tiny random Mistral materialised from a `MistralConfig`, and the real tokenizer from the
`mistral-common` wheel).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch

from birbal.config.model import ModelConfig, QuantizationConfig, TokenizerConfig
from birbal.errors import ModelError
from birbal.fsutil import atomic_directory, sha256_file

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MISTRAL_COMMON_TOKENIZER = "tokenizer.model.v1"


def hub_token() -> str | None:
    """The hub token, read from the environment when needed; never stored in a file or an image."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


@contextlib.contextmanager
def peft_without_deprecation_noise():
    """Around peft's model wrapping (get_peft_model, PeftModel.from_pretrained). peft 0.21 reads
    `model.is_gradient_checkpointing` (peft_model.py:184), which transformers 5.24 deprecates for
    `is_activation_checkpointing`: a FutureWarning about peft's code, not ours, in every train, export and serve
    log. Only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper, or the model itself when it has none."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_lora_parts(member) -> tuple | None:
    """(base_layer, lora_A, lora_B, dropout, scaling, adapter name) of a peft LoRA Linear with one plain adapter
    (not merged, no variant such as DoRA, Linear base and factors), else None: the case peft's `forward` computes
    as `result + lora_B(lora_A(dropout(x))) * scaling`, which serve's fused decode and train's
    down_proj_outside_checkpoint compute in parts."""
    base = getattr(member, "base_layer", None)
    lora_a, lora_b = getattr(member, "lora_A", None), getattr(member, "lora_B", None)
    if base is None or lora_a is None or lora_b is None or len(lora_a) != 1:
        return None
    (name,) = lora_a.keys()
    if name in getattr(member, "lora_variant", {}) or getattr(member, "merged", False):
        return None
    a, b = lora_a[name], lora_b[name]
    if not all(isinstance(m, torch.nn.Linear) for m in (base, a, b)):
        return None
    return base, a, b, member.lora_dropout[name], member.scaling[name], name


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def mistral_common_tokenizer_file() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / MISTRAL_COMMON_TOKENIZER
    if not path.is_file():
        raise ModelError(f"mistral-common {mistral_common.__version__} does not ship data/{MISTRAL_COMMON_TOKENIZER}")
    return path


def load_tokenizer(cfg: TokenizerConfig, cache_dir: Path):
    """The Mistral-7B-v0.1 tokenizer: BOS added, no pad token (as upstream)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if cfg.source == "mistral-common":
        source = mistral_common_tokenizer_file()
        if cfg.sha256 and sha256_file(source) != cfg.sha256:
            raise ModelError(f"{source}: sha256 differs from the recipe's model.tokenizer.sha256 {cfg.sha256}")
        folder = cache_dir / "tokenizer-mistral-common"
        if not (folder / "tokenizer.model").is_file():
            with atomic_directory(folder) as tmp:
                shutil.copyfile(source, tmp / "tokenizer.model")
        # transformers 5 silently ignores LlamaTokenizer(vocab_file=...); from_pretrained on a folder works.
        tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                cfg.name_or_path, revision=None if _is_local(cfg.name_or_path) else cfg.revision,
                token=hub_token(), trust_remote_code=False)
        except OSError as err:
            raise ModelError(f"could not fetch the tokenizer of {cfg.name_or_path}@{cfg.revision} from the Hugging Face "
                             f"hub ({_first_line(err)}); check network access and HF_TOKEN (the model is gated)") from None
    if len(tokenizer) != 32000 or tokenizer.bos_token_id != 1 or tokenizer.eos_token_id != 2:
        raise ModelError(f"tokenizer is not Mistral-7B-v0.1's: vocab {len(tokenizer)}, bos {tokenizer.bos_token_id}, "
                         f"eos {tokenizer.eos_token_id} (expected 32000, 1, 2)")
    return tokenizer


def mistral_config(cfg: ModelConfig):
    from transformers import MistralConfig

    arch = cfg.architecture
    assert arch is not None
    return MistralConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, max_position_embeddings=arch.max_position_embeddings,
        sliding_window=arch.sliding_window, rope_theta=arch.rope_theta, rms_norm_eps=arch.rms_norm_eps,
        initializer_range=arch.initializer_range,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def materialise_random_base(cfg: ModelConfig, folder: Path) -> Path:
    """Build the random Mistral once (seeded) and save it as safetensors; later loads read the same bytes."""
    from transformers import MistralForCausalLM

    if (folder / "config.json").is_file():
        return folder
    with atomic_directory(folder) as tmp:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.init_seed)
        model = MistralForCausalLM(mistral_config(cfg))
        torch.random.set_rng_state(generator_state)
        model.save_pretrained(tmp, safe_serialization=True)
    return folder


def base_model_location(cfg: ModelConfig, cache_dir: Path) -> tuple[str, str | None]:
    """(name or path, revision) of the base weights; a random base is materialised under `cache_dir`."""
    if cfg.source == "random":
        return str(materialise_random_base(cfg, cache_dir / "random-base")), None
    if _is_local(cfg.name_or_path):
        return str(Path(cfg.name_or_path).expanduser()), None
    return cfg.name_or_path, cfg.revision


def disable_cpu_4bit_repack(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 weight repack on every 4-bit layer.

    On CPUs with AVX512-BF16 the first eval-mode no-grad forward repacks a Linear4bit weight in place, after
    which backward passes give silently wrong LoRA gradients (PLATFORM_NOTES.md). An eval inside training
    triggers it, so it is switched off right after loading. Returns how many layers were changed.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_base_model(cfg: ModelConfig, cache_dir: Path, device: torch.device, dtype: torch.dtype,
                    quantization: QuantizationConfig | None = None):
    """The base causal LM on `device`: NF4 4-bit when `quantization.load_in_4bit`, else plain `dtype`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name, revision = base_model_location(cfg, cache_dir)
    kwargs: dict = {}
    if quantization is not None and quantization.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=DTYPES[quantization.compute_dtype],
            bnb_4bit_quant_storage=torch.uint8)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, token=hub_token(), dtype=dtype, device_map={"": str(device)},
            attn_implementation=cfg.attn_implementation, use_safetensors=True, trust_remote_code=False, **kwargs)
    except OSError as err:
        where = f"{name}@{revision}" if revision else name
        raise ModelError(f"base model {where} could not be loaded ({_first_line(err)}); for a hub id check network "
                         "access and HF_TOKEN") from None
    if quantization is not None and quantization.load_in_4bit and device.type == "cpu":
        disable_cpu_4bit_repack(model)
    return model


def resolve_device(requested: str, key: str = "train.device", error: type[Exception] = ModelError) -> torch.device:
    """`auto` -> the current CUDA device when there is one, else the CPU; `cuda` without a GPU raises `error`."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise error(f"{key} is 'cuda' but no CUDA GPU is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
