"""The invoke tasks as a user runs them: `--dry-run` command lines, and bad input as one line."""

import os
import subprocess
import sys

from conftest import REPO


def invoke(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "HF_HOME": "/hub-cache", "HF_TOKEN": "hf_secret_never_printed"}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_docker_reproduce_dry_run_prints_every_stage(tmp_path):
    run = tmp_path / "r1"
    result = invoke("reproduce", "--profile", "birbal-4090", "--runtime", "docker", "--run-dir", str(run),
                    "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line[2:] for line in result.stderr.splitlines() if line.startswith("$ ")]
    mounts = (f"--mount type=bind,source={run},target=/runs/r1 "
              "--mount type=bind,source=/hub-cache,target=/cache/huggingface --env HF_TOKEN")
    for stage, line in zip(("prepare-data", "train", "export"), lines[:3], strict=True):
        assert line.startswith("docker run --rm --gpus all --user ")
        assert mounts in line and "birbal-repro-train:0.1.0" in line
        assert line.endswith(f"{stage} --profile birbal-4090 --run-dir /runs/r1")
    assert lines[3] == "docker rm --force birbal-serve-r1"  # a leftover server of a crashed run
    serve = lines[4]
    # Not --rm: the log must outlive a crash; listening on 0.0.0.0 inside, so the published port reaches it.
    assert serve.startswith("docker run --detach --name birbal-serve-r1 --publish 127.0.0.1:8080:8080 --gpus all")
    assert "birbal-repro-serve:0.1.0" in serve
    assert serve.endswith("serve --profile birbal-4090 --run-dir /runs/r1 --host 0.0.0.0 --port 8080")
    evaluate = lines[5]
    assert "--network host" in evaluate and "--gpus" not in evaluate
    assert evaluate.endswith("evaluate --profile birbal-4090 --run-dir /runs/r1 --url http://127.0.0.1:8080")
    assert lines[6] == "docker stop --time 30 birbal-serve-r1"
    # The report runs in the train image too: the host needs nothing but Docker and invoke.
    assert lines[7].startswith("docker run --rm --user ") and "birbal-repro-train:0.1.0" in lines[7]
    assert lines[7].endswith("report --run-dir /runs/r1")
    assert "hf_secret_never_printed" not in result.stderr + result.stdout
    assert not run.exists()  # a dry run writes nothing


def test_local_dry_run_and_budget_override(tmp_path):
    result = invoke("reproduce", "--profile", "smoke", "--runtime", "local", "--run-dir", str(tmp_path / "r"),
                    "--budget-hours", "0.5", "--set", "train.learning_rate=0.001", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line[2:] for line in result.stderr.splitlines() if line.startswith("$ ")]
    assert "-m birbal train --profile smoke" in lines[1]
    assert lines[1].endswith("--set train.learning_rate=0.001 --budget-hours 0.5")
    assert lines[3].endswith("--host 127.0.0.1 --port 8089 &")  # the port evaluate is pointed at


def test_reproduce_takes_a_recipe_file_of_ones_own(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: smoke\nname: my-smoke\ntrain:\n  learning_rate: 2.0e-3\n")
    result = invoke("reproduce", "--config", str(recipe), "--runtime", "local", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line[2:] for line in result.stderr.splitlines() if line.startswith("$ ")]
    stages = [line for line in lines if " -m birbal " in line and " report " not in line]
    assert [line.split(" -m birbal ")[1].split()[0] for line in stages] == \
        ["prepare-data", "train", "export", "serve", "evaluate"]
    for line in stages:  # every stage reads the file, and the run is named after it, not after a profile
        assert f"--config {recipe.resolve()}" in line and "--profile" not in line, line
        assert f"--run-dir {REPO / 'runs' / 'my-smoke'}" in line, line
    refused = invoke("reproduce", "--config", str(recipe), "--runtime", "docker", "--dry-run")
    assert refused.returncode == 2 and "--config works with --runtime local" in refused.stderr
    missing = invoke("reproduce", "--config", str(tmp_path / "nope.yaml"), "--runtime", "local", "--dry-run")
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_build_dry_run_tags_with_version_and_revision():
    result = invoke("build", "--dry-run", "--no-cache")
    assert result.returncode == 0, result.stderr
    builds = [line for line in result.stderr.splitlines() if line.startswith("$ docker build")]
    assert len(builds) == 3 and all("--no-cache" in b and "--tag birbal-repro-" in b for b in builds)
    assert "Dockerfile.train" in builds[0] and "Dockerfile.serve" in builds[1] and "Dockerfile.helm" in builds[2]


def test_bad_profile_is_one_line(tmp_path):
    for args in (["reproduce", "--profile", "nope", "--runtime", "local"],
                 ["train", "--profile", "nope", "--runtime", "local"]):
        result = invoke(*args, "--run-dir", str(tmp_path / "r"))
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "unknown profile 'nope'" in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_build_without_docker_engine_says_so():
    result = invoke("build")
    if result.returncode == 0:  # a machine with a working engine built the images: nothing to check here
        return
    assert result.returncode == 1 and "invoke build:" in result.stderr and "Traceback" not in result.stderr


def test_reproduce_stops_at_preflight_without_a_gpu(tmp_path):
    import shutil

    import pytest

    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine would start the real 7B run")
    run = tmp_path / "r"
    result = invoke("reproduce", "--profile", "birbal-4090", "--runtime", "local", "--run-dir", str(run))
    assert result.returncode == 1
    assert "FAIL gpu: no NVIDIA GPU visible" in result.stderr and "preflight: " in result.stderr
    assert "ok   hf-token: HF_TOKEN is set" in result.stderr and "hf_secret_never_printed" not in result.stderr
    assert not (run / "manifest.json").exists()  # no stage started
