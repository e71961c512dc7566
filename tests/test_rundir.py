import json

import pytest

from birbal.errors import RunDirError
from birbal.fsutil import atomic_directory, atomic_write_text
from birbal.rundir import RunDir
from birbal.stages import run_stage


def _body(content="x"):
    def body(folder):
        atomic_write_text(folder / "out.txt", content)
        from birbal.fsutil import hash_tree

        return hash_tree(folder, exclude=("stage.json",)), {"n": 1}, "finished"
    return body


def test_complete_stage_is_skipped_until_inputs_change(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run_stage(run, "export", {"a": 1}, _body()) is not None
    assert run.is_complete("export")
    assert run_stage(run, "export", {"a": 1}, _body()) is None          # skipped
    assert run_stage(run, "export", {"a": 2}, _body("y")) is not None   # inputs changed: re-run
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["stages"]["export"]["status"] == "complete"
    assert manifest["stages"]["export"]["outputs"] == {"out.txt": run.record("export").outputs["out.txt"]}


def test_a_failed_or_killed_stage_is_never_complete(tmp_path):
    run = RunDir(tmp_path / "run")

    def boom(folder):
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        run_stage(run, "train", {"a": 1}, boom)
    assert run.latest("train").status == "failed" and not run.is_complete("train")
    run.begin("export", {"a": 1})  # a process killed after begin leaves `running`
    assert not run.is_complete("export") and run.latest("export").status == "running"


def test_missing_output_or_corrupt_record_means_incomplete(tmp_path):
    run = RunDir(tmp_path / "run")
    run_stage(run, "export", {"a": 1}, _body())
    (run.stage_dir("export") / "out.txt").unlink()
    assert not run.is_complete("export")
    run_stage(run, "export", {"a": 1}, _body())
    (run.stage_dir("export") / "stage.json").write_text('{"stage": "export", "status": "compl')  # torn
    assert run.record("export") is None and not run.is_complete("export")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(ValueError):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"12")
            raise ValueError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_run_dir_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match="cannot be created"):
        RunDir(blocker / "run")
