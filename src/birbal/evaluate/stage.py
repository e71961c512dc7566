"""The evaluate stage: score the running server (quick or open suite) and record it in the run directory.

Outputs under `evaluate/`: `summary.json` (the table rows, the client used, and, for the open suite, the
mean-win-rate score against the published 4090 submissions), plus `quick/` (predictions, results) or `helm/`
(HELM's benchmark_output and log).
"""

from __future__ import annotations

from typing import Any

from birbal.config import Recipe
from birbal.errors import BirbalError, EvaluateError, RunDirError
from birbal.evaluate.api_check import check_api
from birbal.evaluate.client import check_identity, check_server, choose_transport
from birbal.evaluate.helm_output import figures
from birbal.evaluate.quick import run_quick, scenario_files
from birbal.evaluate.winners import score_against_published
from birbal.fsutil import atomic_directory, atomic_write_json, hash_tree
from birbal.rundir import RECORD, RunDir

STAGE = "evaluate"
SUMMARY = "summary.json"


def evaluate_outputs(folder, suite: str) -> dict[str, str]:
    """The files this evaluation produced: the summary, the API check and the suite's own folder (for the open
    suite, HELM's runs and log, not its scenarios cache, which is input data)."""
    from birbal.evaluate.open_suite import output_files

    hashes = hash_tree(folder, exclude=(RECORD,))
    keep = {SUMMARY, "api_check.json"}
    if suite == "quick":
        return {k: v for k, v in hashes.items() if k in keep or k.startswith("quick/")}
    return {k: v for k, v in hashes.items() if k in keep or output_files(k)}


def _model(recipe: Recipe, run_dir: RunDir) -> tuple[str, str]:
    """(digest, stage) of the model this run serves, its files re-hashed: what the server must report."""
    if recipe.serve.published_adapter is not None:  # birbal-submission: no stage of this run made the model
        from birbal.rundir import published_digest

        return published_digest(recipe), "published"
    try:
        return run_dir.model_digest(recipe.serve.model)
    except RunDirError as err:
        stage = "export"
        if "not complete" in str(err):
            raise EvaluateError(f"the {stage} stage is not complete in {run_dir.path}: this run has no model for "
                                f"a server to serve (run the {stage} stage first)") from None
        raise EvaluateError(str(err)) from None


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
    model_digest, model_stage = _model(recipe, run_dir)
    inputs: dict[str, Any] = {"suite": suite, "url": url, "max_eval_instances": limit,
                              "evaluate": recipe.section_digest("evaluate"), model_stage: model_digest,
                              "scenarios": scenario_files() if suite == "quick" else None}
    record = run_dir.begin(STAGE, inputs)
    folder = run_dir.stage_dir(STAGE)
    try:
        health = check_server(url)
        check_identity(url, health, run_dir.run_id, model_digest, model_stage)
        api = check_api(url, recipe.evaluate.request_timeout_s)
        # The results of an earlier complete evaluation stay in place until this one has all of its own: the quick
        # suite runs into a temporary folder that replaces quick/ in one rename at the end.
        if suite == "quick":
            transport = choose_transport(url, recipe.evaluate.request_timeout_s)
            with atomic_directory(folder / "quick") as tmp:
                summary = run_quick(transport, tmp, limit)
        else:
            from birbal.evaluate.open_suite import run_open

            summary = run_open(url, folder / "helm", limit, recipe.evaluate.helm_run_specs)
            summary["score"] = score_against_published(figures(summary))
        # the URL (its port differs run to run) is in the record's details, so summary.json compares across runs
        summary.update({"suite": suite, "max_eval_instances": limit})
        atomic_write_json(folder / "api_check.json", api)
        atomic_write_json(folder / SUMMARY, summary)
        outputs = evaluate_outputs(folder, suite)
        failed = summary.get("failed_runs") or []
        details = {"suite": suite, "url": url, "server_run_id": health.get("run_id"), "model_digest": model_digest,
                   "client": summary.get("client"), "api_check": "passed",
                   "figures": {row["label"]: row["value"] for row in summary["rows"]}, "failed_runs": failed}
        record = run_dir.finish(record, outputs, details, outcome="partial" if failed else "finished")
    except BirbalError as err:
        run_dir.fail(record, str(err))
        raise
    except Exception as err:  # record the failure before it propagates: a record must never stay "running"
        run_dir.fail(record, f"{type(err).__name__}: {err}")
        raise
    _print_scores(summary, record)


def _print_scores(summary: dict[str, Any], record) -> None:
    """The scores, then the finished line every stage ends with."""
    from birbal.stages import log

    width = max((len(row["label"]) for row in summary["rows"]), default=0)
    for row in summary["rows"]:
        value = row.get("value")
        shown = f"{value:.3f}" if isinstance(value, (int, float)) else "—"
        winners = row.get("winners")
        theirs = f"   (winners: {winners:.3f})" if isinstance(winners, (int, float)) and suite_is_open(summary) else ""
        log(f"evaluate: {row['label']:<{width}}  {shown}{theirs}")
    score = summary.get("score")
    if score:
        log(f"evaluate: mean-win-rate score {score['ours']['score']:.3f}, rank {score['rank']} of {score['pool_size']} "
            f"(on {', '.join(score.get('scenarios_scored') or score['ours']['scenarios'])})")
    if summary.get("failed_runs"):
        log(f"evaluate: {len(summary['failed_runs'])} run specs failed: {', '.join(summary['failed_runs'][:5])}")
    log(f"evaluate: {record.outcome} in {record.duration_s:.1f} s ({summary['suite']} suite; "
        f"{STAGE}/{SUMMARY})")


def suite_is_open(summary: dict[str, Any]) -> bool:
    return summary.get("suite") == "open"
