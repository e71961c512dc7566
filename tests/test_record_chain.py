"""Issue 14 on a real finished smoke run (the session's `invoke smoke`, copied before each change): changed data
never resumes the old model, a wrong --set or a failing stage leaves complete records as they were, a corrupt
latest checkpoint falls back to the one before, verify reads a read-only run, and the output says only what a
user can act on."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import free_port, run_cli

from birbal.train import checkpoint as ckpt
from birbal.verify import verify_run


@pytest.fixture
def finished(smoke_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, symlinks=True)
    return run


def _cli(stage: str, run: Path, *extra: str, check: bool = False):
    return run_cli(stage, "--profile", "smoke", "--run-dir", str(run), *extra, check=check)


def test_changed_data_never_resumes_the_old_model_and_failures_keep_complete_records(finished):
    train_record = (finished / "train" / "stage.json").read_bytes()
    recipe = (finished / "recipe.yaml").read_bytes()
    # a wrong --set on a finished run: refused naming the key, the complete record untouched
    wrong = _cli("train", finished, "--set", "train.learning_rate=0.5")
    assert wrong.returncode == 6 and "train.learning_rate: 0.01 -> 0.5" in wrong.stderr, wrong.stderr[-2000:]
    assert (finished / "train" / "stage.json").read_bytes() == train_record
    assert json.loads((finished / "train" / "stage.attempt.json").read_text())["status"] == "failed"
    assert (finished / "recipe.yaml").read_bytes() == recipe  # a failed call does not rewrite it
    # changed data: prepare-data re-splits, train refuses the checkpoints trained on what are now eval rows
    assert _cli("prepare-data", finished, "--set", "data.eval_fraction=0.3").returncode == 0
    changed = _cli("train", finished, "--set", "data.eval_fraction=0.3")
    assert changed.returncode == 6, changed.stderr[-2000:]
    assert "trained on other data" in changed.stderr and "data.eval_fraction: 0.1 -> 0.3" in changed.stderr
    assert "resuming from" not in changed.stderr
    assert (finished / "train" / "stage.json").read_bytes() == train_record
    # and verify says the train record no longer belongs to the data beside it
    assert any(p.startswith("train: made from prepare-data outputs") for p in verify_run(finished))


def test_an_input_cut_at_a_line_boundary_is_not_trained_on(finished):
    train_jsonl = finished / "data" / "train.jsonl"
    lines = train_jsonl.read_text().splitlines(keepends=True)
    train_jsonl.write_text("".join(lines[:50]))
    result = _cli("train", finished)
    assert result.returncode == 3 and "data/train.jsonl: sha256" in result.stderr, result.stderr[-2000:]
    # prepare-data sees its output changed and redoes it; then train is complete again, nothing retrained
    redo = _cli("prepare-data", finished)
    assert "its outputs no longer match its record (data/train.jsonl" in redo.stderr
    assert len(train_jsonl.read_text().splitlines()) == len(lines)
    assert "train: complete with unchanged inputs, skipped" in _cli("train", finished).stderr


def test_evaluate_without_a_server_leaves_the_complete_evaluation(finished):
    before = (finished / "evaluate" / "stage.json").read_bytes()
    result = _cli("evaluate", finished, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 9 and "not reachable" in result.stderr
    assert (finished / "evaluate" / "stage.json").read_bytes() == before
    assert verify_run(finished) == []
    report = run_cli("report", "--run-dir", str(finished))
    text = Path(report.stdout.strip()).read_text()
    assert "quick: multiple choice" in text and "The last evaluate attempt failed" in text


@pytest.mark.parametrize("damage", ["safetensors", "json", "missing"])
def test_each_truncated_checkpoint_file_is_named(finished, damage):
    folder = ckpt.list_checkpoints(finished / "train" / "checkpoints")[-1][1]
    target = {"safetensors": folder / "adapter" / "adapter_model.safetensors", "json": folder / ckpt.STATE,
              "missing": folder / "optimizer.pt"}[damage]
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ckpt.CorruptCheckpoint, match=rf"{folder.name} is unreadable \({target.relative_to(folder)}"):
        ckpt.read_checkpoint(folder)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(finished):
    checkpoints = ckpt.list_checkpoints(finished / "train" / "checkpoints")
    assert len(checkpoints) >= 2
    (_, previous), (_, latest) = checkpoints[-2], checkpoints[-1]
    weights = latest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = _cli("train", finished, "--force", check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"{latest.name} is unreadable" in warnings[0]
    assert f"resuming from {previous.name}" in result.stderr
    assert (latest.parent / f"{latest.name}.corrupt").is_dir()
    # train's outputs are re-recorded (its timing logs differ), so the export made before says it is stale
    problems = verify_run(finished)
    assert len(problems) == 1 and problems[0].startswith("export: made from train outputs"), problems


def test_verify_reads_a_run_its_user_cannot_write(smoke_run, tmp_path_factory):
    """Another user's run (root can write anywhere, so the check runs as `nobody` where it is root)."""
    import subprocess
    import sys
    import tempfile

    from conftest import REPO

    root = Path(tempfile.mkdtemp(prefix="birbal-readonly-"))
    run = root / "archived"
    shutil.copytree(smoke_run, run, symlinks=True, ignore=shutil.ignore_patterns("cache"))
    for path in [root, run, *run.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    command = [sys.executable, "-m", "birbal", "verify", "--run-dir", str(run)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: cannot check as a user without write access")
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd="/",
                                env={**os.environ, "PYTHONPATH": str(REPO / "src"), "HOME": "/tmp"}, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "every recorded output matches" in result.stdout
    finally:
        for path in [root, run, *run.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)


def test_the_output_says_only_what_a_user_can_act_on(smoke_run):
    err = (smoke_run / "invoke-smoke.err").read_text()
    assert "gemm_4bit_forward" not in err
    assert err.count("prepare-data: 209 train") <= 1 and "train / " in err
    assert '"POST /process HTTP/1.1"' not in err  # no access line per request
    lines = [line for line in err.splitlines() if line.startswith("[birbal] evaluate:")]
    assert lines[-1].startswith("[birbal] evaluate: finished in") and any("EM" in line for line in lines)
    adapter = json.loads((smoke_run / "train" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-random-mistral"
    assert adapter["target_modules"] == sorted(adapter["target_modules"])
    assert str(smoke_run) not in (smoke_run / "train" / "adapter" / "README.md").read_text()
    for name in ("manifest.json", "recipe.yaml", "train/stage.json", "train/adapter/adapter_model.safetensors"):
        assert stat.S_IMODE((smoke_run / name).stat().st_mode) & 0o044 == 0o044, name

