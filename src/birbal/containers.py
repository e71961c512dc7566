"""Exact `docker` command lines for building the images and running each stage in its container.

Pure functions returning lists of strings: `invoke build`/`invoke reproduce --runtime docker` run them, and their
`--dry-run` prints them (shlex.join). Nothing here talks to an engine except `docker_available` and the
`inspect`/manifest helpers, which take the engine's output as text so they stay testable without Docker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from birbal.fsutil import atomic_write_json
from birbal.rundir import STAGES, utc_now

IMAGES = ("train", "serve", "helm")
DOCKERFILES = {"train": "Dockerfile.train", "serve": "Dockerfile.serve", "helm": "Dockerfile.helm"}
# Which image runs which stage. evaluate runs where HELM is (helm-run for the open suite, HELM's client classes for
# the quick one): Dockerfile.helm, the package plus HELM's own hash-locked venv (BIRBAL_HELM_PYTHON).
STAGE_IMAGE = {"prepare-data": "train", "train": "train", "export": "train", "serve": "serve", "evaluate": "helm"}
DEFAULT_REPOSITORY = "birbal-repro"
# The bases are linux/amd64 manifests (docs/PINS.md): build for that platform even on an arm64 host.
PLATFORM = "linux/amd64"
CONTAINER_RUNS = "/runs"
CONTAINER_HUB_CACHE = "/cache/huggingface"
CONTAINER_PORT = 8080  # Dockerfile.serve EXPOSEs and health-checks this port
SERVER_CONTAINER_PREFIX = "birbal-serve-"
# Passed through by name only (`-e NAME`): docker copies the value from the caller's environment, so a token never
# appears on a command line, in `--dry-run` output, or in shell history.
PASSTHROUGH_ENV = ("HF_TOKEN",)
BUILD_MANIFEST_SCHEMA = 1


def image_tags(image: str, version: str, revision: str | None, repository: str = DEFAULT_REPOSITORY) -> list[str]:
    """`<repo>-<image>:<version>` and, with a git revision, `<repo>-<image>:<version>-<rev12>` (most specific last)."""
    if image not in IMAGES:
        raise ValueError(f"unknown image {image!r}; images: {', '.join(IMAGES)}")
    name = f"{repository}-{image}"
    tags = [f"{name}:{version}"]
    if revision:
        tags.append(f"{name}:{version}-{revision[:12]}")
    return tags


def build_command(image: str, *, version: str, revision: str | None, source: str = "unknown",
                  context: str | Path = ".", no_cache: bool = False, repository: str = DEFAULT_REPOSITORY,
                  extra_tags: Sequence[str] = ()) -> list[str]:
    """`docker build` of one image from the repository root, tagged and labelled with version and revision."""
    command = ["docker", "build", "--file", str(Path(context) / DOCKERFILES[image]), "--platform", PLATFORM]
    for tag in [*image_tags(image, version, revision, repository), *extra_tags]:
        command += ["--tag", tag]
    command += ["--build-arg", f"VERSION={version}", "--build-arg", f"REVISION={revision or 'unknown'}",
                "--build-arg", f"SOURCE={source}"]
    if no_cache:
        command.append("--no-cache")
    command.append(str(context))
    return command


def server_container_name(run_id: str) -> str:
    return f"{SERVER_CONTAINER_PREFIX}{run_id}"


def stage_args(stage: str, profile: str, run_id: str, overrides: Sequence[str] = ()) -> list[str]:
    """The CLI arguments after the entrypoint: `<stage> --profile P --run-dir /runs/<id> [--set k=v ...]`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if "/" in profile or profile.endswith((".yaml", ".yml")):
        # A host path is not visible inside the container; the images carry the profiles by name.
        raise ValueError(f"profile {profile!r}: in a container only profile names work (see configs/)")
    args = [stage, "--profile", profile, "--run-dir", f"{CONTAINER_RUNS}/{run_id}"]
    for override in overrides:
        args += ["--set", override]
    return args


def run_command(stage: str, *, image: str, profile: str, run_dir: str | Path, hub_cache: str | Path,
                overrides: Sequence[str] = (), gpus: str | None = "all", user: str | None = None,
                shm_size: str = "16g", host_port: int = CONTAINER_PORT, bind_address: str = "127.0.0.1",
                network: str | None = None, env_passthrough: Sequence[str] = PASSTHROUGH_ENV) -> list[str]:
    """`docker run` of one stage in its image.

    `image` is the reference to run (a tag from `image_tags` or `name@sha256:...`). `run_dir` and `hub_cache` are
    host paths, bind-mounted at /runs/<run-id> and /cache/huggingface (they must exist: `--mount` refuses to
    create them, unlike `-v`, which would make root-owned folders). `gpus`: "all", "device=0", or None for a
    CPU-only run. `user`: "uid:gid", so files written into the mounts belong to the caller. The serve stage runs
    detached under a fixed name with its port published on `bind_address:host_port`; every other stage runs in
    the foreground. `network`: e.g. "host" for evaluate, so it reaches the published server port on 127.0.0.1.
    """
    run_dir = Path(run_dir)
    # The server is not `--rm`: when it dies, its log must outlive it (`ServeContainer` prints it, then removes it).
    command = ["docker", "run"] if stage == "serve" else ["docker", "run", "--rm"]
    if stage == "serve":
        command += ["--detach", "--name", server_container_name(run_dir.name),
                    "--publish", f"{bind_address}:{host_port}:{CONTAINER_PORT}"]
    if gpus:
        command += ["--gpus", gpus]
    if user:
        command += ["--user", user]
    if network:
        command += ["--network", network]
    command += ["--shm-size", shm_size,
                "--mount", f"type=bind,source={run_dir},target={CONTAINER_RUNS}/{run_dir.name}",
                "--mount", f"type=bind,source={Path(hub_cache)},target={CONTAINER_HUB_CACHE}"]
    for name in env_passthrough:
        if "=" in name:
            raise ValueError(f"environment passthrough {name!r} must be a bare name: values never go on the command line")
        command += ["--env", name]
    command.append(image)
    command += stage_args(stage, profile, run_dir.name, overrides)
    if stage == "serve":
        # Inside its own network namespace the server must listen on every interface: docker forwards the published
        # port to the container's eth0, which a server on the recipe's 127.0.0.1 never sees.
        command += ["--host", "0.0.0.0", "--port", str(CONTAINER_PORT)]
    return command


def reproduce_stage_command(stage: str, *, profile: str, run_dir: str | Path, hub_cache: str | Path,
                            overrides: Sequence[str] = (), user: str, version: str, revision: str | None,
                            extra: Sequence[str] = ()) -> list[str]:
    """The `docker run` that `invoke <stage>/reproduce --runtime docker` runs for one stage (tasks.py calls this;
    the container contract test replays exactly this). `user`: the caller's "uid:gid"."""
    image = image_tags(STAGE_IMAGE[stage], version, revision)[-1]
    return run_command(stage, image=image, profile=profile, run_dir=Path(run_dir).resolve(), hub_cache=hub_cache,
                       overrides=overrides, user=user, network="host" if stage == "evaluate" else None,
                       gpus=None if stage == "evaluate" else "all") + list(extra)


def report_command(*, run_dir: str | Path, user: str, version: str, revision: str | None) -> list[str]:
    """`birbal report` in the train image (it has matplotlib), so the host needs nothing but Docker."""
    run_dir = Path(run_dir).resolve()
    return ["docker", "run", "--rm", "--user", user,
            "--mount", f"type=bind,source={run_dir},target={CONTAINER_RUNS}/{run_dir.name}",
            image_tags("train", version, revision)[-1], "report", "--run-dir", f"{CONTAINER_RUNS}/{run_dir.name}"]


def stop_command(run_id: str, timeout_s: int = 30) -> list[str]:
    """Stops the detached server of a run (SIGTERM, then SIGKILL after `timeout_s`); `remove_command` removes it."""
    return ["docker", "stop", "--time", str(timeout_s), server_container_name(run_id)]


def logs_command(run_id: str) -> list[str]:
    return ["docker", "logs", server_container_name(run_id)]


def remove_command(run_id: str) -> list[str]:
    return ["docker", "rm", "--force", server_container_name(run_id)]


def state_command(run_id: str) -> list[str]:
    """`docker container inspect` printing `<status> <exit code>`, e.g. `running 0` or `exited 8`."""
    return ["docker", "container", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
            server_container_name(run_id)]


class ServeContainerError(RuntimeError):
    """The server container exited, or never became healthy; the message carries its log's tail."""


class ServeContainer:
    """The detached server of `invoke reproduce --runtime docker`: start, wait for /health, stop, keep the log.

    The wait ends as soon as the container is no longer running (no 600 s of polling a dead server), and says
    why with the container's own log. `close()` stops it, saves its whole log beside the run (`log_path`) and
    removes it; a failure there is printed, never raised over the error that brought us there.
    `run` is the subprocess boundary (tests fake only that; the commands are the real strings).
    """

    LOG_TAIL_LINES = 60

    def __init__(self, run_id: str, log_path: Path, run: Runner = subprocess.run,
                 echo: Callable[[str], None] = print) -> None:
        self.run_id, self.log_path, self._run, self._echo = run_id, Path(log_path), run, echo

    def _call(self, command: list[str]) -> subprocess.CompletedProcess:
        return self._run(command, capture_output=True, text=True, check=False)

    def start(self, command: list[str]) -> None:
        """Remove a leftover container of the same name (a crashed earlier run), then `docker run --detach`."""
        self._call(remove_command(self.run_id))  # "No such container" is the usual answer, and fine
        result = self._call(command)
        if result.returncode != 0:
            raise ServeContainerError(f"docker run of the server failed ({result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()}")

    def state(self) -> tuple[str, int] | None:
        """(status, exit code), or None when there is no such container."""
        result = self._call(state_command(self.run_id))
        if result.returncode != 0:
            return None
        status, _, code = result.stdout.strip().partition(" ")
        return status, int(code or 0)

    def log_tail(self) -> str:
        result = self._call(logs_command(self.run_id))
        lines = (result.stdout + result.stderr).splitlines()
        return "\n".join(lines[-self.LOG_TAIL_LINES:])

    def wait_healthy(self, url: str, timeout_s: float, check: Callable[[str], None],
                     clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None,
                     poll_s: float = 1.0) -> None:
        """Poll `check(url)` (raises until healthy) while the container runs; fail at once if it stops."""
        import time

        clock, sleep = clock or time.monotonic, sleep or time.sleep
        deadline = clock() + timeout_s
        last = "no answer yet"
        while True:
            state = self.state()
            if state is None or state[0] not in ("created", "running", "restarting"):
                how = "is gone" if state is None else f"exited ({state[1]})" if state[0] == "exited" else state[0]
                raise ServeContainerError(f"the server container {server_container_name(self.run_id)} {how} before "
                                          f"{url} became healthy; its log ends:\n{self.log_tail()}")
            try:
                check(url)
                return
            except Exception as err:  # noqa: BLE001 - any failed probe means "not yet"; the last one is reported
                last = str(err)
            if clock() >= deadline:
                raise ServeContainerError(f"the server at {url} was not healthy within {timeout_s:.0f} s ({last}); "
                                          f"its log ends:\n{self.log_tail()}")
            sleep(poll_s)

    def close(self, stop_timeout_s: int = 30) -> list[str]:
        """Stop (if running), save the log, remove. Returns the problems met, each already printed."""
        problems = []
        state = self.state()
        if state is None:
            return problems
        if state[0] == "running":
            stopped = self._call(stop_command(self.run_id, stop_timeout_s))
            if stopped.returncode != 0:
                problems.append(f"docker stop: {(stopped.stderr or stopped.stdout).strip()}")
        logs = self._call(logs_command(self.run_id))
        if logs.returncode == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text(logs.stdout + logs.stderr)
        else:
            problems.append(f"docker logs: {(logs.stderr or logs.stdout).strip()}")
        removed = self._call(remove_command(self.run_id))
        if removed.returncode != 0:
            problems.append(f"docker rm: {(removed.stderr or removed.stdout).strip()}")
        for problem in problems:
            self._echo(f"warning: server container cleanup: {problem}")
        return problems


def health_url(host_port: int = CONTAINER_PORT, bind_address: str = "127.0.0.1") -> str:
    return f"http://{bind_address}:{host_port}/health"


def inspect_command(image_ref: str) -> list[str]:
    """`docker image inspect` printing one JSON object per line; parse with `parse_inspect`."""
    return ["docker", "image", "inspect", "--format", "{{json .}}", image_ref]


@dataclass(frozen=True)
class BuiltImage:
    """What the engine says about a built image: its content id, registry digests (only once pushed) and labels."""

    image: str
    ref: str
    id: str
    repo_digests: list[str] = field(default_factory=list)
    repo_tags: list[str] = field(default_factory=list)
    created: str | None = None
    architecture: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def parse_inspect(image: str, ref: str, text: str) -> BuiltImage:
    """Parse `docker image inspect --format '{{json .}}'` output for one image."""
    try:
        raw = json.loads(text.strip().splitlines()[0])
    except (json.JSONDecodeError, IndexError) as err:
        raise ValueError(f"docker image inspect {ref}: output is not JSON: {text[:200]!r}") from err
    if isinstance(raw, list):  # plain `docker image inspect` prints a list
        raw = raw[0]
    config = raw.get("Config") or {}
    return BuiltImage(image=image, ref=ref, id=raw["Id"], repo_digests=list(raw.get("RepoDigests") or []),
                      repo_tags=list(raw.get("RepoTags") or []), created=raw.get("Created"),
                      architecture=raw.get("Architecture"), labels=dict(config.get("Labels") or {}))


def write_build_manifest(path: str | Path, images: Mapping[str, BuiltImage] | Sequence[BuiltImage],
                         extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record the built images (ids, digests, labels) as JSON, atomically; returns what was written."""
    items = images.values() if isinstance(images, Mapping) else images
    payload: dict[str, Any] = {"schema_version": BUILD_MANIFEST_SCHEMA, "written_at": utc_now(),
                               "images": {item.image: asdict(item) for item in items}}
    payload.update(extra or {})
    atomic_write_json(Path(path), payload)
    return payload


Runner = Callable[..., subprocess.CompletedProcess]


def docker_available(which: Callable[[str], str | None] = shutil.which, run: Runner = subprocess.run) -> str | None:
    """None when a Docker engine answers; otherwise one line saying why not and what to do."""
    if which("docker") is None:
        return "docker not found on PATH: install Docker Engine (and the NVIDIA Container Toolkit), or use --runtime local"
    try:
        result = run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                     timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"docker engine not reachable ({err}); start it, or use --runtime local"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return f"docker engine not reachable: {detail[-1] if detail else f'exit {result.returncode}'}; " \
               "start it (or fix permissions on its socket), or use --runtime local"
    return None
