"""The evaluate stage: score the running server (quick or open suite) and record it in the run directory.

Outputs under `evaluate/`: `summary.json` (the table rows, the client used, and, for the open suite, the
mean-win-rate score against the published 4090 submissions), plus `quick/` (predictions, results) or `helm/`
(HELM's benchmark_output and log).
"""

from __future__ import annotations

import shutil
from typing import Any

from birbal.config import Recipe
from birbal.errors import BirbalError, EvaluateError
from birbal.evaluate.api_check import check_api
from birbal.evaluate.client import check_server, choose_transport
from birbal.evaluate.helm_output import figures
from birbal.evaluate.quick import run_quick, scenario_files
from birbal.evaluate.winners import score_against_published
from birbal.fsutil import atomic_write_json, hash_tree
from birbal.rundir import RECORD, RunDir

STAGE = "evaluate"
SUMMARY = "summary.json"


def _export_digest(run_dir: RunDir) -> str | None:
    """The export this score belongs to, when this run dir has one (a server may also be external)."""
    record = run_dir.record("export")
    return record.outputs_digest if record is not None and record.status == "complete" else None


def evaluate_stage(recipe: Recipe, run_dir: RunDir, url: str, suite: str | None = None,
                   max_eval_instances: int | None = None) -> None:
    """Score the server at `url` with `suite` (default: recipe.evaluate.suite); write evaluate/ and its record.

    Never skipped as complete: the server is outside the run dir, so equal inputs do not promise equal scores.
    """
    suite = suite or recipe.evaluate.suite
    if suite not in ("quick", "open"):
        raise EvaluateError(f"unknown suite {suite!r}: choose quick or open (evaluate.suite)")
    limit = max_eval_instances if max_eval_instances is not None else recipe.evaluate.max_eval_instances
    if limit is not None and limit <= 0:
        raise EvaluateError(f"max_eval_instances must be positive, got {limit}")
    inputs: dict[str, Any] = {"suite": suite, "url": url, "max_eval_instances": limit,
                              "evaluate": recipe.section_digest("evaluate"), "export": _export_digest(run_dir),
                              "scenarios": scenario_files() if suite == "quick" else None}
    record = run_dir.begin(STAGE, inputs)
    folder = run_dir.stage_dir(STAGE)
    try:
        check_server(url)
        api = check_api(url, recipe.evaluate.request_timeout_s)
        atomic_write_json(folder / "api_check.json", api)
        if suite == "quick":
            shutil.rmtree(folder / "quick", ignore_errors=True)
            transport = choose_transport(url, recipe.evaluate.request_timeout_s)
            summary = run_quick(transport, folder / "quick", limit)
        else:
            from birbal.evaluate.open_suite import run_open

            shutil.rmtree(folder / "helm", ignore_errors=True)
            summary = run_open(url, folder / "helm", limit)
            summary["score"] = score_against_published(figures(summary))
        summary.update({"suite": suite, "url": url, "max_eval_instances": limit})
        atomic_write_json(folder / SUMMARY, summary)
        outputs = hash_tree(folder, exclude=(RECORD,))
        details = {"suite": suite, "client": summary.get("client"), "api_check": "passed",
                   "figures": {row["label"]: row["value"] for row in summary["rows"]}}
        run_dir.finish(record, outputs, details)
    except BirbalError as err:
        run_dir.fail(record, str(err))
        raise
    except Exception as err:  # record the failure before it propagates: a record must never stay "running"
        run_dir.fail(record, f"{type(err).__name__}: {err}")
        raise
