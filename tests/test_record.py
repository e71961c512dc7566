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
