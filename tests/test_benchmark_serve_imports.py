"""benchmarks/serve_imports.py's plumbing, run here so that a GPU session's minute on it is not lost to a bug: the
server's imports in its order, in fresh interpreters, as installed and with no bytecode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_the_imports_benchmark_reports_each_phase_and_the_bytecode_it_read(tmp_path):
    out = tmp_path / "serve_imports.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_imports.py"), "--out", str(out),
                           "--repeats", "1"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    installed, none = report["arms"]["as installed"], report["arms"]["no bytecode"]
    phases = ["torch", "birbal.models (plan)", "imports.server", "transformers' tokenizer", "load.imports",
              "modeling_mistral", "birbal.serve.engine"]
    for arm in (installed, none):
        assert list(arm["phases_s"]) == phases and all(s >= 0 for s in arm["phases_s"].values())
        assert arm["phases_s"]["torch"] > 0 and arm["modules"] > 1000  # torch, transformers and peft were imported
    # every module compiled from source in the baseline arm: the count is exact there, so the check can fail
    assert none["bytecode_missing"] == none["modules"] == installed["modules"]
    assert "| load.imports |" in done.stdout  # the table
