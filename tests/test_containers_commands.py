"""The exact docker command lines `invoke build` / `invoke reproduce --runtime docker --dry-run` print."""

from __future__ import annotations

import json
import subprocess

import pytest

from birbal import containers as c
from birbal.rundir import STAGES

REV = "0123456789abcdef0123456789abcdef01234567"
RUN_DIR = "/home/ana/birbal/runs/r1"
CACHE = "/home/ana/.cache/huggingface"


@pytest.mark.parametrize("image", c.IMAGES)
def test_build_command(image):
    assert c.build_command(image, version="0.1.0", revision=REV, source="https://example.org/birbal.git") == [
        "docker", "build", "--file", f"Dockerfile.{image}", "--platform", "linux/amd64",
        "--tag", f"birbal-repro-{image}:0.1.0", "--tag", f"birbal-repro-{image}:0.1.0-0123456789ab",
        "--build-arg", "VERSION=0.1.0", "--build-arg", f"REVISION={REV}",
        "--build-arg", "SOURCE=https://example.org/birbal.git", ".",
    ]


def test_build_command_options():
    command = c.build_command("serve", version="0.1.0", revision=None, no_cache=True, context="/src/birbal",
                              extra_tags=["me/serve:latest"])
    assert command[:4] == ["docker", "build", "--file", "/src/birbal/Dockerfile.serve"]
    assert command[-2:] == ["--no-cache", "/src/birbal"]
    assert "REVISION=unknown" in command and "birbal-repro-serve:0.1.0" in command and "me/serve:latest" in command
    assert sum(arg == "--tag" for arg in command) == 2


EXPECTED_MOUNTS = ["--mount", f"type=bind,source={RUN_DIR},target=/runs/r1",
                   "--mount", f"type=bind,source={CACHE},target=/cache/huggingface"]


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "serve"])
def test_foreground_stage_run_commands(stage):
    image = f"birbal-repro-{c.STAGE_IMAGE[stage]}:0.1.0"
    command = c.run_command(stage, image=image, profile="birbal-4090", run_dir=RUN_DIR, hub_cache=CACHE,
                            user="1000:1000", overrides=["train.budget_hours=1"])
    assert command == ["docker", "run", "--rm", "--gpus", "all", "--user", "1000:1000", "--shm-size", "16g",
                       *EXPECTED_MOUNTS, "--env", "HF_TOKEN", image,
                       stage, "--profile", "birbal-4090", "--run-dir", "/runs/r1", "--set", "train.budget_hours=1"]


def test_serve_runs_detached_named_and_published():
    command = c.run_command("serve", image="birbal-repro-serve:0.1.0", profile="birbal-4090", run_dir=RUN_DIR,
                            hub_cache=CACHE, user="1000:1000", host_port=9000)
    assert command == ["docker", "run", "--detach", "--name", "birbal-serve-r1",
                       "--publish", "127.0.0.1:9000:8080", "--gpus", "all", "--user", "1000:1000",
                       "--shm-size", "16g", *EXPECTED_MOUNTS, "--env", "HF_TOKEN", "birbal-repro-serve:0.1.0",
                       "serve", "--profile", "birbal-4090", "--run-dir", "/runs/r1", "--host", "0.0.0.0",
                       "--port", "8080"]
    assert c.stop_command("r1") == ["docker", "stop", "--time", "30", "birbal-serve-r1"]
    assert c.health_url(9000) == "http://127.0.0.1:9000/health"


def test_evaluate_on_the_host_network_without_gpu():
    command = c.run_command("evaluate", image="birbal-repro-train:0.1.0", profile="smoke", run_dir=RUN_DIR,
                            hub_cache=CACHE, gpus=None, network="host", shm_size="1g")
    assert "--gpus" not in command and "--user" not in command
    assert command[command.index("--network") + 1] == "host"
    assert command[command.index("--shm-size") + 1] == "1g"


def test_token_is_passed_by_name_never_by_value(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecretsecret")
    for stage in STAGES:
        command = c.run_command(stage, image="x", profile="birbal-4090", run_dir=RUN_DIR, hub_cache=CACHE)
        assert command[command.index("--env") + 1] == "HF_TOKEN"
        assert not any("hf_secret" in arg or "HF_TOKEN=" in arg for arg in command)
    with pytest.raises(ValueError, match="bare name"):
        c.run_command("train", image="x", profile="p", run_dir=RUN_DIR, hub_cache=CACHE,
                      env_passthrough=["HF_TOKEN=hf_abc"])


def test_bad_stage_and_host_profile_paths_are_refused():
    with pytest.raises(ValueError, match="unknown stage"):
        c.run_command("deploy", image="x", profile="p", run_dir=RUN_DIR, hub_cache=CACHE)
    with pytest.raises(ValueError, match="profile names"):
        c.run_command("train", image="x", profile="configs/mine.yaml", run_dir=RUN_DIR, hub_cache=CACHE)


def test_every_stage_has_an_image_with_a_dockerfile():
    assert set(c.STAGE_IMAGE) == set(STAGES)
    assert set(c.STAGE_IMAGE.values()) <= set(c.DOCKERFILES)


INSPECT = json.dumps({
    "Id": "sha256:" + "a" * 64, "RepoTags": ["birbal-repro-train:0.1.0"],
    "RepoDigests": ["registry.example/birbal-repro-train@sha256:" + "b" * 64], "Created": "2026-11-28T10:00:00Z",
    "Architecture": "amd64", "Config": {"Labels": {"org.opencontainers.image.revision": REV}},
})


def test_inspect_and_build_manifest(tmp_path):
    assert c.inspect_command("birbal-repro-train:0.1.0") == [
        "docker", "image", "inspect", "--format", "{{json .}}", "birbal-repro-train:0.1.0"]
    built = c.parse_inspect("train", "birbal-repro-train:0.1.0", INSPECT + "\n")
    assert built.id == "sha256:" + "a" * 64 and built.labels["org.opencontainers.image.revision"] == REV
    out = tmp_path / "build" / "images.json"
    c.write_build_manifest(out, [built], extra={"git_revision": REV})
    written = json.loads(out.read_text())
    assert written["images"]["train"]["repo_digests"] == ["registry.example/birbal-repro-train@sha256:" + "b" * 64]
    assert written["git_revision"] == REV and written["schema_version"] == 1
    with pytest.raises(ValueError, match="not JSON"):
        c.parse_inspect("train", "x", "Error: No such image: x")


def test_docker_available_reasons():
    assert "not found on PATH" in c.docker_available(which=lambda _: None)

    def refused(*args, **kwargs):
        return subprocess.CompletedProcess(args[0], 1, "", "Cannot connect to the Docker daemon at "
                                                        "unix:///var/run/docker.sock. Is the docker daemon running?\n")
    reason = c.docker_available(which=lambda _: "/usr/bin/docker", run=refused)
    assert reason.startswith("docker engine not reachable: Cannot connect") and "--runtime local" in reason

    def answers(*args, **kwargs):
        return subprocess.CompletedProcess(args[0], 0, "27.3.1\n", "")
    assert c.docker_available(which=lambda _: "/usr/bin/docker", run=answers) is None
