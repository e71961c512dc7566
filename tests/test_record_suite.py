"""Issue 14, open suite: one failing run spec does not discard the suite, the message is the right one, and the
scenarios cache a user filled by hand survives. helm-run is replaced by a script replaying what crfm-helm 0.5.16
does when one run spec raises (its Runner logs the traceback, finishes the others, then raises
`RunnerError: Failed runs: [...]` and exits 1); the runs it leaves are real HELM output (tests/fixtures)."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from birbal.errors import EvaluateError
from birbal.evaluate import open_suite

FIXTURE = Path(__file__).parent / "fixtures" / "helm_output" / "runs" / "birbal-open"
GOOD = "mmlu:subject=anatomy,method=multiple_choice_joint,model=neurips_local,data_augmentation=canonical"
BAD = "gsm:model=neurips_local"

PARTIAL_HELM_RUN = f'''\
import shutil, sys
from pathlib import Path
args = sys.argv[1:]
output = Path(args[args.index("--output-path") + 1])
suite = output / "runs" / args[args.index("--suite") + 1]
suite.mkdir(parents=True, exist_ok=True)
shutil.copytree({str(FIXTURE / GOOD)!r}, suite / {GOOD!r})
print("  Running {BAD} {{")
print("Error when running {BAD}:")
print("Traceback (most recent call last):")
print("KeyError: 'answer'")
print('helm.benchmark.runner.RunnerError: Failed runs: ["{BAD}"]', file=sys.stderr)
sys.exit(1)
'''


def _helm_venv(tmp_path: Path, helm_run: str) -> Path:
    venv_bin = tmp_path / "helm-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    for name, body in (("helm-run", helm_run), ("helm-summarize", "import sys\nsys.exit(0)\n")):
        (venv_bin / name).write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        (venv_bin / name).chmod(0o755)
    return venv_bin / "python"


def test_one_failing_run_spec_keeps_the_others_and_the_scenarios_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIRBAL_HELM_PYTHON", str(_helm_venv(tmp_path, PARTIAL_HELM_RUN)))
    out = tmp_path / "evaluate" / "helm"
    cache = out / "benchmark_output" / "scenarios" / "mmlu"
    cache.mkdir(parents=True)
    (cache / "data.tar").write_bytes(b"filled by hand on an offline machine")
    summary = open_suite.run_open("http://127.0.0.1:1", out, 5)
    assert summary["failed_runs"] == [BAD] and summary["helm_run_exit"] == 1
    assert summary["runs"] == 1 and any(r.get("value") is not None for r in summary["rows"])
    assert (cache / "data.tar").read_bytes() == b"filled by hand on an offline machine"
    assert str(tmp_path) not in " ".join(summary["command"])  # comparable between run dirs


def test_a_suite_where_nothing_ran_keeps_the_earlier_results(tmp_path, monkeypatch):
    fails = "import sys\nprint('KeyError: boom')\nsys.exit(1)\n"
    monkeypatch.setenv("BIRBAL_HELM_PYTHON", str(_helm_venv(tmp_path, fails)))
    out = tmp_path / "helm"
    earlier = out / "benchmark_output" / "runs" / open_suite.HELM_SUITE / GOOD
    shutil.copytree(FIXTURE / GOOD, earlier)
    (out / "helm.log").write_text("the earlier evaluation's log\n")
    with pytest.raises(EvaluateError) as caught:
        open_suite.run_open("http://127.0.0.1:1", out, 5)
    assert "could not download" not in str(caught.value) and "no finished run" in str(caught.value)
    assert (earlier / "stats.json").is_file()
    assert (out / "helm.log").read_text() == "the earlier evaluation's log\n"
    assert "KeyError: boom" in (out / "helm.failed.log").read_text()


def test_our_own_server_refusing_is_not_blamed_on_downloads():
    lines = ["httpx.ConnectError: [Errno 111] Connection refused (http://127.0.0.1:8089/process)"]
    assert open_suite.download_failure(lines, ["mmlu"]) is None
    offline = ["urllib.error.URLError: <urlopen error [Errno -2] Name or service not known>"]
    message = open_suite.download_failure(offline, ["mmlu"], Path("/r/evaluate/helm/benchmark_output/scenarios"))
    assert "into /r/evaluate/helm/benchmark_output/scenarios (evaluate keeps it)" in message
