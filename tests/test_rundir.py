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


def test_the_served_adapter_is_re_hashed_without_the_merged_weights(tmp_path):
    """Serving the adapter (birbal-4090) verifies export/adapter/ only: the merged weights beside it are not what
    the server loads, and re-hashing them was most of a restart at 7B. Serving merged verifies every output."""
    from birbal.fsutil import sha256_file

    run_dir = RunDir(tmp_path / "run")
    export = run_dir.stage_dir("export")
    for rel, text in (("adapter/adapter_model.safetensors", "lora"), ("adapter/adapter_config.json", "{}"),
                      ("merged/model.safetensors", "weights")):
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        (export / rel).write_text(text)
    record = run_dir.begin("export", {"test": "digest"})
    run_dir.finish(record, outputs={rel: sha256_file(export / rel) for rel in
                                    ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                     "merged/model.safetensors")})
    adapter_digest, _ = run_dir.model_digest("adapter")
    (export / "merged/model.safetensors").write_text("changed")
    assert RunDir(run_dir.path).model_digest("adapter")[0] == adapter_digest
    with pytest.raises(RunDirError, match="merged/model.safetensors: sha256"):
        RunDir(run_dir.path).model_digest("merged")
    (export / "adapter/adapter_config.json").write_text('{"r": 9}')
    with pytest.raises(RunDirError, match="adapter/adapter_config.json: sha256"):
        RunDir(run_dir.path).model_digest("adapter")
    (export / "adapter/adapter_config.json").write_text("{}")
    (export / "adapter/adapter_model.safetensors").unlink()
    with pytest.raises(RunDirError, match="adapter_model.safetensors: recorded in .* but missing"):
        RunDir(run_dir.path).model_digest("adapter")
