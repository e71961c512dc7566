"""How the served model is scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from birbal.config.base import Section


class EvaluateConfig(Section):
    suite: Literal["quick", "open"] = "quick"
    max_eval_instances: int | None = Field(None, gt=0)
    request_timeout_s: float = Field(600.0, gt=0.0)


class ExportConfig(Section):
    merge: bool = Field(True, description="Merge the adapter into a bf16 copy of the base (never the 4-bit one).")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
