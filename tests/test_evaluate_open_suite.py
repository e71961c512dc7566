"""The open suite's helm-run command and environment (the real helm-run runs in tests/test_container_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from birbal.config import load_recipe
from birbal.errors import EvaluateError
from birbal.evaluate import open_suite


def test_helm_run_always_gets_max_eval_instances():
    """crfm-helm 0.5.16's helm-run exits 2 without -m; birbal-4090 sets no evaluate.max_eval_instances."""
    assert load_recipe("birbal-4090").evaluate.max_eval_instances is None
    conf, out = open_suite.run_specs_path(), Path("/runs/r/evaluate/helm/benchmark_output")
    command = open_suite.helm_run_command(Path("helm-run"), conf, out, None)
    assert command[command.index("--max-eval-instances") + 1] == "1000"
    command = open_suite.helm_run_command(Path("helm-run"), conf, out, 7)
    assert command[command.index("--max-eval-instances") + 1] == "7"


def test_run_spec_lists_are_packaged_names():
    assert load_recipe("birbal-4090").evaluate.helm_run_specs == open_suite.RUN_SPECS
    offline = open_suite.run_specs_path("run_specs_offline_check.conf")
    assert open_suite.run_spec_scenarios(offline) == ["simple_mcqa", "gsm"]
    with pytest.raises(EvaluateError, match="packaged: run_specs_full_coarse_600_budget.conf"):
        open_suite.run_specs_path("nope.conf")
    with pytest.raises(Exception, match="helm_run_specs"):
        load_recipe("smoke", overrides=["evaluate.helm_run_specs=../x.conf"])


def test_helm_environment_names_a_writable_nltk_folder(tmp_path):
    env = open_suite.helm_environment("http://127.0.0.1:8080", tmp_path / "helm", {"HOME": "/", "PATH": "/bin"})
    assert env["HELM_HTTP_MODEL_BASE_URL"] == "http://127.0.0.1:8080"
    assert env["NLTK_DATA"] == str(tmp_path / "helm" / "nltk_data") and Path(env["NLTK_DATA"]).is_dir()
    mine = open_suite.helm_environment("http://x", tmp_path / "helm", {"NLTK_DATA": "/data/nltk"})
    assert mine["NLTK_DATA"] == "/data/nltk"
