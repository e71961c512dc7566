"""Bad input to any stage exits non-zero with one clear line and leaves no stage marked complete."""

import json
import shutil

import pytest
from conftest import run_cli


@pytest.mark.parametrize("args, code, words", [
    (["prepare-data", "--profile", "nope"], 2, "unknown profile 'nope'"),
    (["prepare-data", "--config", "missing.yaml"], 2, "config file not found"),
    (["prepare-data", "--profile", "smoke", "--set", "train.learning_rate=-1"], 2, "train.learning_rate"),
    (["prepare-data", "--profile", "smoke", "--set", "bogus"], 2, "section.key=value"),
    (["train", "--profile", "smoke"], 3, "stage 'prepare-data' is not complete"),
    (["export", "--profile", "smoke"], 3, "not complete"),
])
def test_bad_input_is_one_line_and_nothing_complete(tmp_path, args, code, words):
    run = tmp_path / "run"
    result = run_cli(*args, "--run-dir", str(run), check=False)
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("birbal: error:")]
    assert len(errors) == 1 and words in errors[0]
    manifest = run / "manifest.json"
    if manifest.is_file():
        assert all(s["status"] != "complete" for s in json.loads(manifest.read_text())["stages"].values())


def test_run_dir_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    result = run_cli("prepare-data", "--profile", "smoke", "--run-dir", str(tmp_path / "f" / "run"), check=False)
    assert result.returncode == 3 and "cannot be created" in result.stderr


def test_validate_prints_the_resolved_recipe():
    result = run_cli("validate", "--profile", "birbal-4090")
    assert "learning_rate: 2.0e-05" in result.stdout and "r: 128" in result.stdout


def test_smoke_run_manifest_lists_complete_stages_and_a_falling_loss(smoke_run, tmp_path):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    for stage in ("prepare-data", "train", "export"):
        assert manifest["stages"][stage]["status"] == "complete"
    details = manifest["stages"]["train"]["details"]
    assert details["final_train_loss"] < details["first_train_loss"] - 2.0
    assert (smoke_run / "export" / "merged" / "model.safetensors").is_file()
    assert manifest["stages"]["export"]["details"]["merge_max_logit_diff"] < 1e-3
    # a second invocation skips every complete stage (on a copy: the pytest-xdist workers share smoke_run, which
    # other tests hash before and after they read it, while this one takes the run's lock)
    again_dir = tmp_path / "again"
    shutil.copytree(smoke_run, again_dir, symlinks=True)
    again = run_cli("train", "--profile", "smoke", "--run-dir", str(again_dir))
    assert "skipped" in again.stderr


def test_4090_published_data_without_hub_names_what_it_tried_to_fetch(tmp_path):
    run = tmp_path / "run"
    result = run_cli("prepare-data", "--profile", "birbal-4090", "--run-dir", str(run), check=False,
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 4
    errors = [line for line in result.stderr.splitlines() if line.startswith("birbal: error:")]
    assert len(errors) == 1
    assert "train_dataset.json of dataset upaya07/NeurIPS-LLM-data at revision 5d3ce1ca" in errors[0]
    assert not (run / "data" / "stage.json").exists()  # a failure never writes the stage record
    record = json.loads((run / "data" / "stage.attempt.json").read_text())
    assert record["status"] == "failed" and not (run / "data" / "train.jsonl").exists()
