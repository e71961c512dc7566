"""verify_run on a small real run dir: clean, tampered, missing, over budget, and against another manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from birbal.fsutil import hash_tree
from birbal.rundir import RunDir
from birbal.verify import verify_run

LIMITS = {"budget_hours": 24, "budget_used_s": 3600.0, "max_gpu_memory_gib": 24, "peak_gpu_memory_gib": 21.5}


def make_run(root: Path, train_details: dict | None = None) -> RunDir:
    run = RunDir(root)
    data = run.stage_dir("prepare-data")
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"question": "2+2?", "answer": "4", "source": "fixture"}\n')
    (data / "eval.jsonl").write_text('{"question": "3+3?", "answer": "6", "source": "fixture"}\n')
    record = run.begin("prepare-data", {"data": "digest"})
    run.finish(record, hash_tree(data, exclude=("stage.json",)))
    train = run.stage_dir("train")
    (train / "adapter").mkdir(parents=True)
    (train / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (train / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    record = run.begin("train", {"data": run.outputs_digest("prepare-data")})
    run.finish(record, hash_tree(train, exclude=("stage.json",)), details=dict(LIMITS if train_details is None
                                                                                  else train_details))
    return run


def test_a_clean_run_verifies(tmp_path):
    run = make_run(tmp_path / "r1")
    assert verify_run(run.path) == []


def test_tampered_and_missing_outputs_are_reported(tmp_path):
    run = make_run(tmp_path / "r1")
    (run.path / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights" * 99 + b"\x01")
    (run.path / "data" / "eval.jsonl").unlink()
    problems = verify_run(run.path)
    assert len(problems) == 2, problems
    assert problems[0] == "data/eval.jsonl: recorded in data/stage.json but missing"
    assert problems[1].startswith("train/adapter/adapter_model.safetensors: sha256 ") and "recorded" in problems[1]


def test_budget_and_memory_cap(tmp_path):
    over = {**LIMITS, "budget_used_s": 24 * 3600 + 1, "peak_gpu_memory_gib": 24.3}
    problems = verify_run(make_run(tmp_path / "r1", over).path)
    assert problems == ["train: used 86401 s of wall clock, over its budget of 24 h (86400 s)",
                        "train: peak GPU memory 24.3 GiB, over its cap of 24 GiB"]
    # a record that keeps the last step's plan names the stall that outran it
    plan = {"step": 9001, "planned_s": 412.5, "left_s": 430.0, "took_s": 431.0}
    stalled = verify_run(make_run(tmp_path / "r4", {**over, "peak_gpu_memory_gib": 21.5,
                                                    "last_step_plan": plan}).path)
    assert stalled == ["train: used 86401 s of wall clock, over its budget of 24 h (86400 s): step 9001 was "
                       "started with 430.0 s left and 412.5 s planned, and took 431.0 s"]
    # A CPU run has no cap: a null cap is not a problem, missing keys are.
    assert verify_run(make_run(tmp_path / "r2", {**LIMITS, "max_gpu_memory_gib": None,
                                                 "peak_gpu_memory_gib": None}).path) == []
    missing = verify_run(make_run(tmp_path / "r3", {"budget_hours": 24}).path)
    assert missing == ["train: stage.json details lack budget_used_s, max_gpu_memory_gib, peak_gpu_memory_gib: "
                       "the budget and memory cap cannot be checked"]


def test_incomplete_stage_is_a_problem_but_its_limits_are_not_checked(tmp_path):
    run = make_run(tmp_path / "r1")
    record = run.begin("export", {"adapter": run.outputs_digest("train")})
    run.fail(record, "merge failed: out of memory")
    assert verify_run(run.path) == ["export: status failed (merge failed: out of memory)"]


def test_against_another_manifest(tmp_path):
    first = make_run(tmp_path / "r1")
    second_path = tmp_path / "r2"
    shutil.copytree(first.path, second_path)
    assert verify_run(second_path, against_manifest=first.path / "manifest.json") == []
    assert verify_run(second_path, against_manifest=first.path) == []  # a run dir works too
    # A different (but self-consistent) training result: the comparison names the file.
    other = make_run(tmp_path / "r3")
    adapter = other.path / "train" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(b"different")
    record = other.record("train")
    other.finish(other.begin("train", record.inputs), hash_tree(other.stage_dir("train"), exclude=("stage.json",)),
                 details=dict(LIMITS))
    problems = verify_run(other.path, against_manifest=first.path)
    assert len(problems) == 1 and problems[0].startswith("train: adapter/adapter_model.safetensors differs")


def test_stale_manifest_and_missing_dir(tmp_path):
    run = make_run(tmp_path / "r1")
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["stages"]["train"]["outputs"]["metrics.jsonl"] = "0" * 64
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_run(run.path)
    assert len(problems) == 1 and problems[0].startswith("manifest.json: train: metrics.jsonl differs")
    assert verify_run(tmp_path / "nope") == [f"{tmp_path / 'nope'}: no such run directory"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify_run(empty) == [f"{empty}: no stage records (nothing has run here)"]
