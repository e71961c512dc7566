"""How the served model is scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from birbal.config.base import Section


class EvaluateConfig(Section):
    suite: Literal["quick", "open"] = "quick"
    # The quick suite's cap; for the open suite helm-run's -m, which crfm-helm applies only to run specs that set no
    # max_eval_instances of their own (every entry of the challenge's list sets one): open_suite.helm_run_command.
    max_eval_instances: int | None = Field(None, gt=0)
    request_timeout_s: float = Field(600.0, gt=0.0)
    # The open suite's HELM run spec list: a conf file packaged under birbal/evaluate/data/ (the images carry it).
    # The challenge's own list in every profile; `run_specs_offline_check.conf` exists for checking the helm-run
    # path where HELM's scenario downloads are unreachable (the container contract test sets it with --set).
    helm_run_specs: str = Field("run_specs_full_coarse_600_budget.conf", pattern=r"^[A-Za-z0-9_.-]+\.conf$")


class ExportConfig(Section):
    merge: bool = Field(True, description="Merge the adapter into a bf16 copy of the base (never the 4-bit one).")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
