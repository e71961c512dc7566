"""Clear failures: the server down, HELM missing, HELM unable to download its datasets, a request refused."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port
from serve_model import exported_run_dir

from birbal.config import load_recipe
from birbal.errors import EvaluateError
from birbal.evaluate import open_suite
from birbal.evaluate.client import HelmSubprocess, HttpxTransport, choose_transport
from birbal.evaluate.helm_env import HELM_VERSION, helm_executable, venv_commands
from birbal.evaluate.quick import run_quick
from birbal.evaluate.stage import evaluate_stage
from birbal.rundir import RunDir

HELM_VENV_PYTHON = Path(os.environ.get("BIRBAL_TEST_HELM_PYTHON") or os.environ.get("BIRBAL_HELM_PYTHON")
                        or "/tmp/helm-venv/bin/python")


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there afterwards


def test_server_down_fails_the_stage_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("BIRBAL_HELM_PYTHON", raising=False)
    run_dir = exported_run_dir(tmp_path / "run")
    url = _closed_port_url()
    with pytest.raises(EvaluateError, match=r"not reachable .*invoke serve"):
        evaluate_stage(load_recipe("smoke"), run_dir, url, "quick", 2)
    record = run_dir.attempt("evaluate")
    assert record is not None and record.status == "failed" and url in record.error
    assert json.loads((run_dir.path / "manifest.json").read_text())["stages"]["evaluate"]["status"] == "failed"


def test_unknown_suite_is_refused(tmp_path):
    with pytest.raises(EvaluateError, match="unknown suite 'full'"):
        evaluate_stage(load_recipe("smoke"), RunDir(tmp_path / "run"), "http://127.0.0.1:1", "full", None)


def test_refused_requests_name_the_error_and_client(tmp_path):
    with pytest.raises(EvaluateError, match=r"requests failed through httpx.*Request error"):
        run_quick(HttpxTransport(url=_closed_port_url(), timeout_s=5), tmp_path, 1)


@pytest.mark.skipif(not HELM_VENV_PYTHON.is_file(), reason=f"no HELM client environment at {HELM_VENV_PYTHON} "
                    "(create one with `python -m birbal.evaluate.helm_env --client-only`)")
def test_helm_client_classes_report_a_refused_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("BIRBAL_HELM_PYTHON", str(HELM_VENV_PYTHON))
    transport = choose_transport(_closed_port_url())
    assert isinstance(transport, HelmSubprocess)
    with pytest.raises(EvaluateError, match=r"HTTPModelClient.*crfm-helm 0\.5\.16.*Request error"):
        run_quick(transport, tmp_path, 1)


def test_helm_missing_names_the_venv_commands(monkeypatch, tmp_path):
    monkeypatch.delenv("BIRBAL_HELM_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EvaluateError, match=rf"(?s)helm-run not found.*crfm-helm=={HELM_VERSION}"):
        helm_executable("helm-run")
    assert venv_commands(Path("v"))[-1][-1] == f"crfm-helm=={HELM_VERSION}"
    assert "--no-deps" in venv_commands(Path("v"), client_only=True)[1]


# What helm-run prints offline: its progress lines, then urllib's traceback (recorded from crfm-helm 0.5.16's
# ensure_file_downloaded on a machine without internet access), then the runner's summary; exit status 1.
FAKE_HELM_RUN = '''\
import sys
print("Reading tokenizer configs from prod_env/tokenizer_configs.yaml...")
print("  Running mmlu:subject=anatomy,method=multiple_choice_joint,model=neurips_local,data_augmentation=canonical {")
print("    scenario.get_instances {")
print("      ensure_file_downloaded {")
print("Downloading source_url")
print("Traceback (most recent call last):")
print('  File "helm/common/general.py", line 111, in ensure_file_downloaded')
print("    urllib.request.urlretrieve(source_url, tmp_path)")
print("urllib.error.URLError: <urlopen error [Errno -2] Name or service not known>")
print("helm.benchmark.runner.RunnerError: Failed runs: [mmlu:subject=anatomy]", file=sys.stderr)
print("ARGS " + " ".join(sys.argv[1:]))
sys.exit(1)
'''


def test_helm_download_failure_names_what_it_tried_to_reach(tmp_path, monkeypatch):
    venv_bin = tmp_path / "helm-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    helm_run = venv_bin / "helm-run"
    helm_run.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_HELM_RUN))
    helm_run.chmod(0o755)
    monkeypatch.setenv("BIRBAL_HELM_PYTHON", str(venv_bin / "python"))
    out = tmp_path / "helm"
    with pytest.raises(EvaluateError) as caught:
        open_suite.run_open("http://127.0.0.1:8089", out, 5)
    message = str(caught.value)
    assert "Name or service not known" in message
    assert "https://people.eecs.berkeley.edu/~hendrycks/data.tar" in message  # MMLU's source
    assert "raw.githubusercontent.com/openai/grade-school-math" in message  # GSM8K's
    log = (out / "helm.log").read_text()
    args = log.split("ARGS ", 1)[1].split()
    assert args[args.index("--conf-paths") + 1].endswith("run_specs_full_coarse_600_budget.conf")
    assert args[args.index("--suite") + 1] == "birbal-open"
    assert args[args.index("--max-eval-instances") + 1] == "5"
    assert args[args.index("--models-to-run") + 1] == "neurips/local"


def test_packaged_run_specs_are_the_challenges():
    conf = open_suite.run_specs_path()
    text = conf.read_text()
    # the project's design notes say 89 entries; the file holds 88 (counted)
    assert text.count("{description:") == 88 and text.count("model=neurips/local") == 88
    assert open_suite.run_spec_scenarios(conf) == ["big_bench", "mmlu", "truthful_qa", "summarization_cnndm",
                                                   "gsm", "bbq"]
    assert set(open_suite.run_spec_scenarios(conf)) <= set(open_suite.DATASET_SOURCES)
