"""Issue 14: a run that verifies is the run it claims. Records never overwritten by failures, upstream outputs
re-hashed before they are trusted, recipe changes named, run files readable."""

from __future__ import annotations

import json
import os
import stat

import pytest

from birbal.errors import RunDirError
from birbal.fsutil import atomic_write_text, hash_tree
from birbal.rundir import RunDir, flatten
from birbal.stages import run_stage


def _body(content="x", name="out.txt"):
    def body(folder):
        atomic_write_text(folder / name, content)
        return hash_tree(folder), {"n": 1}, "finished"
    return body


def _boom(folder):
    raise RuntimeError("no server")


def test_a_failure_never_overwrites_a_complete_record(tmp_path):
    run = RunDir(tmp_path / "run")
    run.recipe_yaml = "name: first\n"
    run_stage(run, "evaluate", {"a": 1}, _body())
    complete = (run.stage_dir("evaluate") / "stage.json").read_bytes()
    run.recipe_yaml = "name: second\n"
    with pytest.raises(RuntimeError):
        run_stage(run, "evaluate", {"a": 1}, _boom, force=True)
    assert (run.stage_dir("evaluate") / "stage.json").read_bytes() == complete
    attempt = run.attempt("evaluate")
    assert attempt.status == "failed" and attempt.error == "RuntimeError: no server"
    assert run.is_complete("evaluate")
    # recipe.yaml still describes the finished stage, not the failed call
    assert (run.path / "recipe.yaml").read_text() == "name: first\n"
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["stages"]["evaluate"]["status"] == "complete"
    assert manifest["stages"]["evaluate"]["attempt"]["status"] == "failed"
    # the next completion clears the failed attempt
    run_stage(run, "evaluate", {"a": 1}, _body(), force=True)
    assert run.attempt("evaluate") is None
    assert (run.path / "recipe.yaml").read_text() == "name: second\n"


def test_the_attempt_file_is_not_an_output(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError):
        run_stage(run, "export", {"a": 1}, _boom)
    record = run_stage(run, "export", {"a": 1}, _body())
    assert sorted(record.outputs) == ["out.txt"]


def test_downstream_trusts_upstream_only_after_rehash(tmp_path):
    run = RunDir(tmp_path / "run")
    run_stage(run, "prepare-data", {"a": 1}, _body("row\n" * 209, "train.jsonl"))
    assert run.verified_outputs_digest("prepare-data") == run.record("prepare-data").outputs_digest
    # cut at a line boundary: still looks like a valid file
    atomic_write_text(run.stage_dir("prepare-data") / "train.jsonl", "row\n" * 50)
    fresh = RunDir(run.path)
    with pytest.raises(RunDirError, match=r"data/train\.jsonl: sha256 .* on disk, .* recorded"):
        fresh.verified_outputs_digest("prepare-data")
    # and the stage itself is not skipped as complete: it runs again, saying why
    assert run_stage(fresh, "prepare-data", {"a": 1}, _body("row\n" * 209, "train.jsonl")) is not None


def test_a_changed_recipe_is_named_when_a_finished_stage_reruns(tmp_path, capfd):
    run = RunDir(tmp_path / "run")
    run.recipe_values = flatten({"data": {"eval_fraction": 0.1}, "evaluate": {"suite": "quick"}})
    run_stage(run, "prepare-data", {"recipe": "d1"}, _body())
    run.recipe_values = flatten({"data": {"eval_fraction": 0.3}, "evaluate": {"suite": "open"}})
    run_stage(run, "prepare-data", {"recipe": "d2"}, _body())
    err = capfd.readouterr().err
    assert "recipe changed since it completed (data.eval_fraction: 0.1 -> 0.3)" in err
    assert "evaluate.suite" not in err  # not a key prepare-data depends on


def test_run_files_are_readable_by_others_under_the_usual_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "run")
        run.recipe_yaml = "name: x\n"
        run_stage(run, "export", {"a": 1}, _body())
        from birbal.fsutil import atomic_directory

        with atomic_directory(run.path / "folder") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    for path in (run.path / "manifest.json", run.path / "recipe.yaml", run.stage_dir("export") / "stage.json",
                 run.stage_dir("export") / "out.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((run.path / "folder").stat().st_mode) == 0o755


def test_a_read_only_run_dir_can_be_read(tmp_path):
    run = RunDir(tmp_path / "run")
    run_stage(run, "export", {"a": 1}, _body())
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir(tmp_path / "typo", writable=False)
    assert not (tmp_path / "typo").exists()
    reader = RunDir(run.path, writable=False)
    assert reader.run_id == run.run_id and reader.manifest()["stages"]["export"]["status"] == "complete"


# ---- the server proves whose model it serves (items 1, d) -------------------------------------------------


@pytest.fixture(scope="module")
def server_of_run_a(tmp_path_factory):
    """Run A's real server (its identity from its export record), uvicorn on a free port."""
    from serve_model import engine, exported_run_dir, identity, serve_cfg, serving

    from birbal.serve.app import create_app

    run_a = exported_run_dir(tmp_path_factory.mktemp("a") / "run")
    with serving(create_app(engine("none"), serve_cfg(postprocess="none"), identity(run_a))) as (url, port):
        yield run_a, url, port


def test_health_reports_the_run_and_the_model_digest(server_of_run_a):
    import httpx

    run_a, url, _ = server_of_run_a
    health = httpx.get(f"{url}/health").json()
    assert health["run_id"] == run_a.run_id and health["run_id"].startswith("run-")
    assert health["model_digest"] == run_a.record("export").outputs_digest and health["model_stage"] == "export"


def test_evaluate_refuses_the_server_of_another_run_naming_both(server_of_run_a, tmp_path, monkeypatch):
    from serve_model import exported_run_dir

    from birbal.config import load_recipe
    from birbal.errors import EvaluateError
    from birbal.evaluate.stage import evaluate_stage

    monkeypatch.delenv("BIRBAL_HELM_PYTHON", raising=False)
    run_a, url, _ = server_of_run_a
    run_b = exported_run_dir(tmp_path / "run")  # the very same model: only the run differs
    with pytest.raises(EvaluateError) as caught:
        evaluate_stage(load_recipe("smoke").model_copy(update={"serve": load_recipe("smoke").serve.model_copy(
            update={"postprocess": "none"})}), run_b, url, "quick", 1)
    message = str(caught.value)
    assert f"serves run {run_a.run_id}" in message and f"this run is {run_b.run_id}" in message
    assert run_b.record("evaluate") is None and run_b.attempt("evaluate").status == "failed"
    assert not (run_b.stage_dir("evaluate") / "quick").exists()


def test_a_busy_port_fails_serve_loudly_and_reproduces_wait_notices(server_of_run_a, tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from serve_model import exported_run_dir

    from birbal.errors import EvaluateError
    from birbal.evaluate.client import wait_until_healthy

    _, url, port = server_of_run_a
    run_b = exported_run_dir(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "birbal", "serve", "--profile", "smoke", "--run-dir",
                             str(run_b.path), "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with pytest.raises(EvaluateError, match=r"exited \(8\).*answered by the server of another run \(run-"):
        wait_until_healthy(url, 120, proc, poll_s=0.2, run_id=run_b.run_id)
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr.read()
    attempt = run_b.attempt("serve")
    assert attempt.status == "failed" and "Address already in use" in attempt.error


def test_the_port_accepts_connections_once_bound():
    """The serve stage writes the url into its record right after the bind; a client that reads it and connects at
    once must be queued, not refused (tests/test_serve_live.py's fixture met ECONNREFUSED in CI before the port
    listened from the bind)."""
    import socket

    from birbal.serve.stage import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=2):
            pass  # connected: the kernel queued it for the server's accept
    finally:
        sock.close()


def test_every_file_the_docs_and_configs_cite_exists():
    """docs/*.md and tests/*.py (::test) named in configs/, docs/ and the README are there (issue 14 found two that
    were not)."""
    import re

    from conftest import REPO

    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs").glob("*.yaml"))]
    missing = []
    for path in texts:
        for ref, test in re.findall(r"\b((?:docs|tests)/[A-Za-z0-9_./-]+\.(?:md|py))(?:::(\w+))?", path.read_text()):
            target = REPO / ref
            if not target.is_file() or (test and f"def {test}(" not in target.read_text()):
                missing.append(f"{path.name}: {ref}{'::' + test if test else ''}")
    assert missing == []


def _invoke(*args: str):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def test_report_and_verify_help_and_a_typo_d_run_dir(tmp_path):
    from conftest import run_cli

    for verb in ("report", "verify"):
        result = _invoke(verb, "--help")
        assert result.returncode == 0 and "--run-dir" in result.stdout and "--help" not in result.stderr
    typo = tmp_path / "runs" / "smoek"
    result = run_cli("report", "--run-dir", str(typo), check=False)
    assert result.returncode == 3 and "does not exist" in result.stderr and not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("report", "--run-dir", str(empty), check=False)
    assert result.returncode == 3 and "holds no run" in result.stderr and not (empty / "report.md").exists()


def test_the_cli_and_invoke_agree_on_flags(tmp_path):
    from conftest import REPO, run_cli

    dry = _invoke("train", "--config", "configs/smoke.yaml", "--force", "--runtime", "local", "--dry-run",
                  "--run-dir", str(tmp_path / "r"))
    assert dry.returncode == 0, dry.stderr
    assert f"train --config {REPO / 'configs' / 'smoke.yaml'} --run-dir {tmp_path / 'r'} --force" in dry.stderr
    for verb in ("prepare-data", "export"):
        assert "--force" in _invoke(verb, "--help").stdout and "--config" in _invoke(verb, "--help").stdout
    result = run_cli("verify", "--run-dir", str(tmp_path / "nothing"), check=False)
    assert result.returncode == 1 and "no such run directory" in result.stderr
