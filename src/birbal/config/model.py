"""Which base model and tokenizer a recipe uses, and how the base is quantised and adapted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from birbal.config.base import Section

GIT_SHA = re.compile(r"^[0-9a-f]{40}$")

TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MistralArchitecture(Section):
    """Shape of a randomly initialised Mistral (smoke runs, benchmarks on the real shape without weights)."""

    vocab_size: int = Field(32000, gt=0)
    hidden_size: int = Field(gt=0, description="Model width; a multiple of 64 so NF4 blocks tile it.")
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    max_position_embeddings: int = Field(32768, gt=0)
    sliding_window: int | None = Field(4096, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    initializer_range: float = Field(0.02, gt=0, description="Std of the random init (larger: sharper logits).")

    @model_validator(mode="after")
    def _heads_divide(self) -> MistralArchitecture:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_size % 64 or self.intermediate_size % 64:
            raise ValueError("hidden_size and intermediate_size must be multiples of 64 (the NF4 block size)")
        return self


class TokenizerConfig(Section):
    """Where the tokenizer comes from.

    `mistral-common`: the Mistral-7B-v0.1 SentencePiece model shipped inside the `mistral-common` wheel
    (`mistral_common/data/tokenizer.model.v1`, checked against `sha256`), so no hub access is needed.
    `hub`: `name_or_path` at `revision` (or a local folder).
    """

    source: Literal["mistral-common", "hub"]
    name_or_path: str | None = None
    revision: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _source_fields(self) -> TokenizerConfig:
        if self.source == "hub" and not self.name_or_path:
            raise ValueError("source 'hub' needs name_or_path")
        return self


class ModelConfig(Section):
    """The base model: pretrained weights from the hub (pinned) or a local folder, or a random Mistral."""

    source: Literal["hub", "random"]
    name_or_path: str = Field(description="Hub repo id, or a local folder with config.json and safetensors.")
    revision: str | None = Field(None, description="40-hex commit of the hub repo; required for hub ids.")
    revision_note: str | None = Field(None, description="Where the pinned revision comes from.")
    architecture: MistralArchitecture | None = None
    init_seed: int = Field(0, description="Seed of the random initialisation (source: random).")
    attn_implementation: Literal["sdpa", "flex_attention", "flash_attention_2", "eager"] = "sdpa"
    tokenizer: TokenizerConfig

    @model_validator(mode="after")
    def _source_fields(self) -> ModelConfig:
        if self.source == "random" and self.architecture is None:
            raise ValueError("source 'random' needs an architecture")
        if self.source == "hub" and not Path(self.name_or_path).exists():
            if self.revision is None or not GIT_SHA.match(self.revision):
                raise ValueError(
                    f"hub model {self.name_or_path!r} needs revision: a 40-hex commit, got {self.revision!r}"
                )
        return self


class QuantizationConfig(Section):
    """bitsandbytes 4-bit loading of the frozen base (QLoRA)."""

    load_in_4bit: bool
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class LoraConfig(Section):
    """LoRA adapters on the transformer blocks' linear layers (never lm_head)."""

    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: tuple[TargetModule, ...] = Field(min_length=1)
    bias: Literal["none"] = "none"


class PublishedAdapterConfig(Section):
    """A PEFT adapter published on the Hugging Face hub (the submission's own weights), pinned to a commit.

    Read with huggingface_hub at `revision` (HF_TOKEN from the environment), then applied unmerged by peft.
    """

    name_or_path: str = Field(min_length=1, description="Hub repo id of the adapter, e.g. upaya07/Birbal-7B-V1.")
    revision: str = Field(description="40-hex commit of the adapter repo.")
    revision_note: str | None = Field(None, description="Where the pinned revision comes from (docs/PINS.md).")

    @model_validator(mode="after")
    def _pinned(self) -> PublishedAdapterConfig:
        if not GIT_SHA.match(self.revision):
            raise ValueError(f"adapter {self.name_or_path!r} needs revision: a 40-hex commit, got {self.revision!r}")
        return self
