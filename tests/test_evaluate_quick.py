"""The quick suite end to end: the real server (birbal.serve) on the smoke profile's tiny random Mistral, scored
through httpx and, where HELM's client environment exists, through HELM's own client classes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from serve_model import exported_run_dir, identity, serving

from birbal.config import load_recipe
from birbal.evaluate.quick import continuation_logprob
from birbal.evaluate.stage import evaluate_stage
from birbal.rundir import RunDir

HELM_VENV_PYTHON = Path(os.environ.get("BIRBAL_TEST_HELM_PYTHON") or os.environ.get("BIRBAL_HELM_PYTHON")
                        or "/tmp/helm-venv/bin/python")


def test_continuation_logprob_sums_the_choice_tokens_only():
    tokens = [{"text": "<s>", "logprob": 0.0}, {"text": "Answer", "logprob": -1.0}, {"text": ":", "logprob": -2.0},
              {"text": " Par", "logprob": -0.5}, {"text": "is", "logprob": -0.25}]
    assert continuation_logprob(tokens, "Paris") == pytest.approx(-0.75)
    assert continuation_logprob(tokens, "s") == pytest.approx(-0.25)


@pytest.fixture(scope="module")
def live_server():
    app_module = pytest.importorskip(
        "birbal.serve.app", reason="birbal.serve.app is not on this branch yet (the serve issue adds it)")

    from birbal.serve.engine import Engine

    recipe = load_recipe("smoke")
    root = Path(tempfile.mkdtemp(prefix="birbal-evaluate-tests-"))
    run_dir = exported_run_dir(root / "run")  # the server proves it serves this run's model (GET /health)
    serve_cfg = recipe.serve
    app = app_module.create_app(Engine.from_merged(run_dir.stage_dir("export") / "merged", serve_cfg), serve_cfg,
                                identity(run_dir))
    with serving(app) as (url, _port):
        yield recipe, url, run_dir


def _check_quick_run(run_dir: RunDir, client_word: str) -> dict:
    record = run_dir.record("evaluate")
    assert record is not None and record.status == "complete", record and record.error
    summary = json.loads((run_dir.stage_dir("evaluate") / "summary.json").read_text())
    assert client_word in summary["client"]
    assert [r["label"] for r in summary["rows"]][0].startswith("quick: multiple choice")
    for row in summary["rows"]:
        assert 0.0 <= row["value"] <= 1.0 and row["instances"] == 2
    predictions = [json.loads(line) for line in
                   (run_dir.stage_dir("evaluate") / "quick" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    separate = [p for p in predictions if p["scenario"] == "multiple_choice_separate"]
    for p in separate:  # echo_prompt gave real log-probabilities for each of the 4 choices
        assert len(p["choice_logprobs"]) == 4
        assert all(math.isfinite(x) and x < 0 for x in p["choice_logprobs"])
    assert set(record.outputs) == {"api_check.json", "summary.json", "quick/predictions.jsonl", "quick/results.json"}
    return summary


def test_quick_suite_through_httpx(live_server, tmp_path, monkeypatch):
    recipe, url, run_dir = live_server
    monkeypatch.delenv("BIRBAL_HELM_PYTHON", raising=False)
    evaluate_stage(recipe, run_dir, url, "quick", 2)
    _check_quick_run(run_dir, "httpx")


@pytest.mark.skipif(not HELM_VENV_PYTHON.is_file(), reason=f"no HELM client environment at {HELM_VENV_PYTHON} "
                    "(create one with `python -m birbal.evaluate.helm_env --client-only`)")
def test_quick_suite_through_helm_client_classes(live_server, tmp_path, monkeypatch):
    recipe, url, run_dir = live_server
    monkeypatch.setenv("BIRBAL_HELM_PYTHON", str(HELM_VENV_PYTHON))
    evaluate_stage(recipe, run_dir, url, "quick", 2)
    _check_quick_run(run_dir, "HTTPModelClient")
