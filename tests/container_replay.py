"""Replays what `docker build` and `docker run` do with this project's images, on a machine with no Docker engine.

Used by tests/test_container_contract.py (and runnable: `python tests/container_replay.py build train`). As root,
Linux namespaces give a process most of what a container gives it:

- The image: the Dockerfile is parsed (dockerfile-parse, the library), not restated here. Its ENV, SHELL, USER,
  WORKDIR and ENTRYPOINT are read from it; its COPY and RUN instructions are executed literally, in order, inside a
  private root where /opt (the venvs) and /tmp are what they are in the image, with two exceptions said out loud: the RUN
  that calls apt-get (the host provides Python 3.12 and a C compiler instead of Ubuntu's packages; `python3.12`
  resolves to BIRBAL_IMAGE_PYTHON) and the RUN that calls useradd (the host's /etc/passwd is not touched: /runs and
  /cache/huggingface are made owned by the image's USER instead, which is what that RUN does to them).
- Layers: each RUN up to and including the one that installs the lock is a cached layer (an overlay upper
  directory above the layers before it), named by the chain of instructions leading to it: COPYs by content, RUNs
  by text, the ENV and ARGs in force, the interpreter's version (under BIRBAL_CONTAINER_CACHE, default
  ~/.cache/birbal-repro/container-layers, so a fresh clone on the same machine reuses it). Images share a layer
  exactly where Docker's build cache would, FROM aside (see "the dependency layers" below). A layer is built under
  a lock, by one process at a time. The project's own layer is rebuilt on every call, in an overlay above the
  cached ones, as a code change rebuilds it in Docker.
- `docker run`: a new mount namespace whose root is a read-only tmpfs holding read-only binds of the host's /usr,
  /etc, /dev, /proc, /sys and the interpreter, the image's /opt (read-only), a fresh /tmp (1777), /runs owned
  by the image's USER and not writable by the caller, the `--mount` binds at their container paths, then a new user
  namespace mapping the `--user` uid:gid (one with no passwd entry) onto the caller, chroot into that root, cwd =
  WORKDIR, env = the Dockerfile's ENV (its PATH on top of the base image's default PATH) + HOME=/ (what Docker gives
  a uid with no passwd entry) + HOSTNAME + the `--env NAME` passthroughs present in the caller's environment.
  The ENTRYPOINT is run with the arguments after the image.

What differs from a real container, beyond the two skipped RUNs: the kernel, network and PID namespace are the
caller's (the test puts the whole chain in one private network namespace of its own, standing in for
`--network host` plus the serve container's published port); `--gpus` and `--shm-size` are ignored (no GPU here);
the base image's other ENV (CUDA_VERSION, NVIDIA_*, LD_LIBRARY_PATH) is absent, as is its filesystem: the host's
/usr stands in for Ubuntu 24.04's.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
IMAGE_PYTHON = Path(os.environ.get("BIRBAL_IMAGE_PYTHON", "/root/.pyenv/versions/3.12.1/bin/python3.12"))
LAYER_CACHE = Path(os.environ.get("BIRBAL_CONTAINER_CACHE",
                                  Path.home() / ".cache" / "birbal-repro" / "container-layers"))
# Docker's default PATH for a container whose image sets none; the CUDA bases prepend /usr/local/nvidia/bin and
# /usr/local/cuda/bin, which hold nothing the CLI runs.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SKIPPED_RUN_WORDS = ("apt-get", "useradd")
HOST_BINDS = ("/usr", "/etc", "/dev", "/proc", "/sys")
MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib64")


@dataclass
class Instruction:
    kind: str
    value: str
    env: dict[str, str]  # the ENV (and ARG) in force at this instruction
    shell: list[str]


@dataclass
class Image:
    name: str
    dockerfile: Path
    env: dict[str, str]
    workdir: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"only the exec form is replayed, got {value!r}"
    return parsed


def read_image(name: str) -> Image:
    """The Dockerfile's instructions and final ENV/WORKDIR/USER/ENTRYPOINT/CMD, as dockerfile-parse reads them."""
    path = REPO / f"Dockerfile.{name}"
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=True,
                              parent_env={"PATH": BASE_PATH})
    env: dict[str, str] = {"PATH": BASE_PATH}
    args: dict[str, str] = {}
    shell = ["/bin/sh", "-c"]
    workdir, user, entrypoint, cmd = "/", "0:0", [], []
    instructions = []
    for item in parser.structure:
        kind, value = item["instruction"], item["value"]
        if kind == "ENV":
            env = {"PATH": BASE_PATH, **_env_at(parser, item)}
        elif kind == "ARG":
            key, _, default = value.partition("=")
            args[key] = default
        elif kind == "SHELL":
            shell = _exec_form(value)
        elif kind == "WORKDIR":
            workdir = value
        elif kind == "USER":
            user = value
        elif kind == "ENTRYPOINT":
            entrypoint = _exec_form(value)
        elif kind == "CMD":
            cmd = _exec_form(value)
        elif kind in ("COPY", "RUN"):
            instructions.append(Instruction(kind, value, {**args, **env}, list(shell)))
    return Image(name, path, env, workdir, user, entrypoint, cmd, instructions)


def _env_at(parser: DockerfileParser, upto: dict) -> dict[str, str]:
    """The ENV in force right after instruction `upto` (dockerfile-parse's `envs` is the final one)."""
    sub = DockerfileParser(fileobj=io.BytesIO("".join(parser.lines[: upto["endline"] + 1]).encode()),
                           env_replace=True, parent_env={"PATH": BASE_PATH})
    return dict(sub.envs)


# --- the private root ---------------------------------------------------------------------------------------------

@dataclass
class Mount:
    target: str  # the path inside the private root
    source: str | None = None  # a host path to bind; None: a fresh tmpfs
    read_only: bool = True
    tmpfs_options: str = "mode=755"
    overlay: tuple[str, str, str] | None = None  # (lower, upper, work)


def _root_script(root: Path, mounts: list[Mount]) -> str:
    """Shell run as root inside `unshare -m`: lays out the private root under `root`, then execs "$@"."""
    q = shlex.quote
    lines = ["set -eu", f"mount -t tmpfs -o mode=755 tmpfs {q(str(root))}"]
    for name in MERGED_USR_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            lines.append(f"ln -s {q(os.readlink(host))} {q(str(root / name))}")
    ordered = [Mount(p, p) for p in HOST_BINDS] + [Mount(str(IMAGE_PYTHON.parents[1]), str(IMAGE_PYTHON.parents[1]))]
    ordered += sorted(mounts, key=lambda m: m.target.count("/"))
    for mount in ordered:
        target = q(str(root) + mount.target)
        if mount.source is not None and Path(mount.source).is_file():
            lines.append(f"mkdir -p {q(str(root) + str(Path(mount.target).parent))} && touch {target}")
        else:
            lines.append(f"mkdir -p {target}")
        if mount.overlay:
            lower, upper, work = (q(p) for p in mount.overlay)
            lines.append(f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {target}")
        elif mount.source is None:
            lines.append(f"mount -t tmpfs -o {q(mount.tmpfs_options)} tmpfs {target}")
        else:
            lines.append(f"mount --rbind {q(mount.source)} {target}")
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    lines.append(f"mount -o remount,ro {q(str(root))}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def in_private_root(mounts: list[Mount], argv: list[str], *, env: dict[str, str], cwd: str,
                    uid_gid: tuple[int, int] | None, **popen) -> subprocess.Popen:
    """Start argv in a private root laid out from `mounts`, as uid:gid (user namespace) or as root (None)."""
    scratch = Path(tempfile.mkdtemp(prefix="birbal-root-"))
    root = scratch / "root"
    root.mkdir()
    inner = ["env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
    if uid_gid is None:
        enter = ["chroot", str(root), "sh", "-c", f"cd {shlex.quote(cwd)} && exec \"$@\"", "sh", *inner]
    else:
        uid, gid = uid_gid
        enter = ["unshare", "--user", f"--map-user={uid}", f"--map-group={gid}", f"--root={root}", f"--wd={cwd}",
                 *inner]
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _root_script(root, mounts), "sh",
               *enter]
    return subprocess.Popen(command, **popen)


def run_in_private_root(mounts, argv, *, env, cwd, uid_gid, timeout=None, **popen) -> subprocess.CompletedProcess:
    process = in_private_root(mounts, argv, env=env, cwd=cwd, uid_gid=uid_gid, **popen)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


# --- docker build ---------------------------------------------------------------------------------------------------

def _skipped(instruction: Instruction) -> bool:
    return instruction.kind == "RUN" and any(word in instruction.value for word in SKIPPED_RUN_WORDS)


def _python_version() -> str:
    return subprocess.run([str(IMAGE_PYTHON), "-c", "import sys; print(sys.version)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def _split_layers(image: Image) -> tuple[list[Instruction], list[Instruction]]:
    """(dependency layers: up to the RUN that installs the copied lock, project layers: the rest)."""
    locked = [i for i, instruction in enumerate(image.instructions)
              if instruction.kind == "RUN" and "--require-hashes" in instruction.value]
    if locked:
        return image.instructions[: locked[-1] + 1], image.instructions[locked[-1] + 1:]
    raise AssertionError(f"{image.dockerfile.name}: no RUN installs a hash-checked lock")


def _copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    parts = shlex.split(instruction.value)
    assert not any(p.startswith("--") for p in parts), f"COPY flags are not replayed: {instruction.value}"
    return parts[:-1], parts[-1]


def _stage_copies(instruction: Instruction, staging: Path) -> None:
    """Put a COPY's sources from the build context where the RUNs will see them (staging = the private /tmp)."""
    sources, dest = _copy_sources(instruction)
    assert dest.startswith("/tmp/"), f"only COPY into /tmp is replayed, got {dest}"
    target = staging / dest.removeprefix("/tmp/")
    for source in sources:
        path = REPO / source
        if path.is_dir():
            into = target if len(sources) == 1 and not dest.endswith("/") else target / path.name
            shutil.copytree(path, into, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            into = target / path.name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)


def _run_layers(instructions: list[Instruction], opt_mount: Mount, log: Path) -> None:
    """COPY and RUN, in order, as root in the private root (network: the caller's, as `docker build` has)."""
    staging = Path(tempfile.mkdtemp(prefix="birbal-build-tmp-"))
    staging.chmod(0o1777)
    # `python3.12` (apt's, in the image) resolves to the host interpreter's folder, bound at its own path in every
    # private root, so the venv's `home` stays valid when it runs.
    shim = IMAGE_PYTHON.parent
    try:
        for instruction in instructions:
            if _skipped(instruction):
                continue
            if instruction.kind == "COPY":
                _stage_copies(instruction, staging)
                continue
            env = {**instruction.env, "PATH": f"{instruction.env['PATH']}:{shim}", "HOME": "/root"}
            mounts = [opt_mount, Mount("/tmp", str(staging), read_only=False)]
            with log.open("a") as out:
                out.write(f"+ RUN {instruction.value}\n")
                out.flush()
                result = run_in_private_root(mounts, [*instruction.shell, instruction.value], env=env, cwd="/",
                                             uid_gid=None, stdout=out, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise RuntimeError(f"RUN failed ({result.returncode}): {instruction.value}\n{log.read_text()[-4000:]}")
        # /tmp is not part of a cached layer: a RUN must remove what the COPYs before it put there (ours do), or the
        # next layer, built on a later call, would not see what it would see in Docker.
        left = sorted(p.name for p in staging.iterdir())
        if left:
            raise RuntimeError(f"the RUNs left {left} in /tmp; the replay's layers do not carry /tmp")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the dependency layers ------------------------------------------------------------------------------------------
# One cached layer per RUN of the dependency part, as Docker's build cache keeps one per instruction, each named by
# the chain of instructions that leads to it: every COPY by the bytes it copies and where to, every RUN by its text,
# each with the ENV and ARGs in force, and the interpreter (which stands in for the base image). Two images share a
# layer exactly when that whole chain is equal, which is when Docker's cache shares it too, except that FROM is not
# part of the key (the host's /usr stands in for every base, so the base cannot change what a RUN writes here).
# Dockerfile.helm is written so that its chain up to the /opt/venv install is Dockerfile.serve's (and, but for FROM,
# Dockerfile.train's): the project's venv, 7.7 GB with torch's CUDA build, is built once for all three images, and
# the helm image adds only its own layer, /opt/helm-venv. Each layer is an overlay upper directory above the ones
# before it, so what a RUN writes is exactly what it wrote when that RUN ran on top of them.

def _layer_key(instructions: list[Instruction]) -> str:
    key = hashlib.sha256()
    for instruction in instructions:
        if instruction.kind == "COPY":  # by content and destination: train.txt and serve.txt may be one lock
            sources, dest = _copy_sources(instruction)
            key.update(f"COPY {dest}\n".encode())
            for source in sources:
                key.update(hashlib.sha256((REPO / source).read_bytes()).digest())
        else:
            key.update(f"{instruction.kind} {instruction.value}\n".encode())
        key.update(json.dumps(instruction.env, sort_keys=True).encode())
    key.update(_python_version().encode())
    key.update(b"layer root: /opt")  # a layer holds /opt (/opt/venv, and /opt/helm-venv in Dockerfile.helm)
    return key.hexdigest()[:16]


def _dependency_steps(image: Image) -> list[tuple[list[Instruction], list[Instruction]]]:
    """Per dependency layer: (the chain of instructions up to and including its RUN, the instructions it replays:
    the COPYs since the previous layer's RUN and its RUN)."""
    deps, _ = _split_layers(image)
    steps, since = [], 0
    for i, instruction in enumerate(deps):
        if instruction.kind == "RUN" and not _skipped(instruction):
            steps.append((deps[: i + 1], deps[since: i + 1]))
            since = i + 1
    return steps


def layer_paths(image: Image) -> list[Path]:
    """Where the dependency layers of `image` are cached, lowest first."""
    return [LAYER_CACHE / f"deps-{_layer_key(chain)}" for chain, _ in _dependency_steps(image)]


def layer_path(image: Image) -> Path:
    """The topmost dependency layer of `image`."""
    return layer_paths(image)[-1]


def _overlay(lowers: list[Path], upper: Path, work: Path) -> tuple[str, str, str]:
    """Overlay options for /opt: `lowers` lowest first (overlayfs lists the top one first)."""
    return ":".join(str(p) for p in reversed(lowers)), str(upper), str(work)


def dependency_layers(image: Image) -> list[Path]:
    """The cached dependency layers of `image`, lowest first (each built on a miss: hash-checked wheels)."""
    built: list[Path] = []
    for (_chain, replayed), layer in zip(_dependency_steps(image), layer_paths(image), strict=True):
        LAYER_CACHE.mkdir(parents=True, exist_ok=True)
        # One builder per layer: a second caller (another CI run, or the tests while .ci/run builds in the
        # background) waits here for the first, then finds the layer complete.
        with open(layer.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _build_layer(layer, built, replayed)
        built.append(layer)
    return built


def _build_layer(layer: Path, built: list[Path], replayed: list[Instruction]) -> None:
    """Build `layer` above `built` unless it is complete (under its lock)."""
    if (layer / ".complete").is_file():
        return
    shutil.rmtree(layer, ignore_errors=True)
    work = layer.with_suffix(".work")
    shutil.rmtree(work, ignore_errors=True)
    layer.mkdir(parents=True)
    work.mkdir()
    log = layer.with_suffix(".log")
    log.write_text("")
    started = time.monotonic()
    if built:
        mount = Mount("/opt", overlay=_overlay(built, layer, work), read_only=False)
    else:
        mount = Mount("/opt", str(layer), read_only=False)
    try:
        _run_layers(replayed, mount, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with log.open("a") as out:
        out.write(f"+ layer built in {time.monotonic() - started:.1f} s\n")
    (layer / ".complete").write_text(layer.name + "\n")


def dependency_layer(image: Image) -> Path:
    """Build (or find) every dependency layer of `image`; returns the topmost."""
    return dependency_layers(image)[-1]


@dataclass
class BuiltImage:
    image: Image
    lowers: list[Path]
    scratch: Path

    @property
    def upper(self) -> Path:
        return self.scratch / "upper"

    def venv_mount(self, read_only: bool = True) -> Mount:
        return Mount("/opt", overlay=_overlay(self.lowers, self.upper, self.scratch / "work"), read_only=read_only)


def build(name: str, scratch: Path) -> BuiltImage:
    """The dependency layers (cached) plus a fresh project layer in `scratch` (an overlay's upper directory)."""
    image = read_image(name)
    lowers = dependency_layers(image)
    built = BuiltImage(image, lowers, scratch)
    built.upper.mkdir(parents=True, exist_ok=True)
    (scratch / "work").mkdir(exist_ok=True)
    _, project = _split_layers(image)
    _run_layers(project, built.venv_mount(read_only=False), scratch / "build.log")
    return built


# --- docker run ---------------------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """What a `docker run` argv says, for the flags birbal.containers emits."""

    image_ref: str
    args: list[str]
    user: str | None = None
    mounts: list[tuple[str, str]] = field(default_factory=list)  # (host source, container target)
    env_names: list[str] = field(default_factory=list)
    detach: bool = False
    publish: str | None = None
    name: str | None = None
    remove: bool = False


def parse_run(argv: list[str]) -> RunSpec:
    assert argv[:2] == ["docker", "run"], argv
    flags_with_value = {"--name", "--publish", "--gpus", "--user", "--network", "--shm-size", "--mount", "--env"}
    spec = RunSpec("", [])
    i = 2
    while i < len(argv):
        arg = argv[i]
        if arg in flags_with_value:
            value = argv[i + 1]
            i += 2
            if arg == "--user":
                spec.user = value
            elif arg == "--mount":
                fields = dict(part.split("=", 1) for part in value.split(","))
                assert fields["type"] == "bind", value
                spec.mounts.append((fields["source"], fields["target"]))
            elif arg == "--env":
                spec.env_names.append(value)
            elif arg == "--publish":
                spec.publish = value
            elif arg == "--name":
                spec.name = value
        elif arg in ("--rm", "--detach"):
            spec.remove |= arg == "--rm"
            spec.detach |= arg == "--detach"
            i += 1
        elif arg.startswith("-"):
            raise AssertionError(f"docker run flag not replayed: {arg}")
        else:
            spec.image_ref, spec.args = arg, argv[i + 1:]
            break
    return spec


def container_env(image: Image, spec: RunSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    env = {"HOSTNAME": "birbal-replay", **image.env}
    env.setdefault("HOME", "/")  # Docker: HOME=/ for a --user with no passwd entry in the image
    for name in spec.env_names:
        if name in environ:
            env[name] = environ[name]
    return env


def start(built: BuiltImage, argv: list[str], **popen) -> subprocess.Popen:
    """Start `docker run ...` (argv, as birbal.containers writes it) in the replayed container."""
    spec = parse_run(argv)
    image = built.image
    uid_gid = tuple(int(x) for x in spec.user.split(":")) if spec.user else image.uid_gid
    owner_uid, owner_gid = image.uid_gid
    mounts = [built.venv_mount(),
              Mount("/tmp", None, read_only=False, tmpfs_options="mode=1777"),
              # the image's `mkdir -p /runs /cache/huggingface && chown <USER> ...`, without editing /etc/passwd
              Mount("/runs", None, read_only=False, tmpfs_options=f"mode=755,uid={owner_uid},gid={owner_gid}"),
              Mount("/cache", None, read_only=False, tmpfs_options="mode=755")]
    mounts += [Mount(target, source, read_only=False) for source, target in spec.mounts]
    return in_private_root(mounts, [*image.entrypoint, *spec.args], env=container_env(image, spec),
                           cwd=image.workdir, uid_gid=uid_gid, **popen)


def _finish(process: subprocess.Popen, name: str, timeout: float) -> dict:
    out, _ = process.communicate(timeout=timeout)
    return {"stage": name, "returncode": process.returncode, "log_tail": out[-6000:]}


def chain(run_dir: Path, hub_cache: Path, scratch: Path, uid: int, profile: str, overrides: list[str],
          stage_timeout_s: float = 900, first_evaluate: list[str] | None = None) -> dict:
    """prepare-data -> train -> export -> serve -> evaluate -> report, each the `docker run` that
    `invoke reproduce --runtime docker` runs (birbal.containers), replayed; stops at the first failure.
    `first_evaluate`: extra arguments of one more evaluate run before the recipe's own (e.g. `--suite quick`),
    in the same image against the same server, as `invoke evaluate --runtime docker` would run it.

    Run it in a network namespace of its own (`unshare -n`): the server's 0.0.0.0:8080 is then this chain's alone,
    as a published port is on a judge's host. The dependency layers must already be built (they download).
    """
    import time

    sys.path.insert(0, str(REPO / "src"))
    from birbal import __version__, containers
    from birbal.evaluate.client import wait_until_healthy

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    user = f"{uid}:{uid}"
    common = {"profile": profile, "run_dir": run_dir, "hub_cache": hub_cache, "overrides": overrides, "user": user,
              "version": __version__, "revision": None}
    images = {name: build(name, scratch / name) for name in sorted(set(containers.STAGE_IMAGE.values()))}
    result: dict = {"stages": [], "user": user}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    for stage in ("prepare-data", "train", "export"):
        argv = containers.reproduce_stage_command(stage, **common)
        started = time.monotonic()
        done = _finish(start(images[containers.STAGE_IMAGE[stage]], argv, **popen), stage, stage_timeout_s)
        result["stages"].append({**done, "argv": argv, "seconds": round(time.monotonic() - started, 1)})
        if done["returncode"] != 0:
            return result
    serve_argv = containers.reproduce_stage_command("serve", **common)
    spec = parse_run(serve_argv)
    host_port = int(spec.publish.split(":")[1])
    started = time.monotonic()
    server = start(images["serve"], serve_argv, **popen)
    try:
        url = f"http://127.0.0.1:{host_port}"
        try:
            wait_until_healthy(url, stage_timeout_s, server, poll_s=0.5)
        except Exception as err:  # noqa: BLE001 - recorded with the server's log, which says why
            server.kill()
            done = _finish(server, "serve", 60)
            result["stages"].append({**done, "argv": serve_argv, "error": str(err)})
            return result
        result["serve_healthy_after_s"] = round(time.monotonic() - started, 1)
        evaluations = []
        for name, extra in ([("evaluate-first", first_evaluate)] if first_evaluate else []) + [("evaluate", [])]:
            argv = containers.reproduce_stage_command("evaluate", **common, extra=["--url", url, *extra])
            started = time.monotonic()
            done = _finish(start(images[containers.STAGE_IMAGE["evaluate"]], argv, **popen), name, stage_timeout_s)
            evaluations.append({**done, "argv": argv, "seconds": round(time.monotonic() - started, 1)})
            if done["returncode"] != 0:
                break
    finally:
        if server.poll() is None:
            server.terminate()  # what `docker stop` sends
        served = _finish(server, "serve", 60)
    result["stages"].append({**served, "argv": serve_argv})
    result["stages"] += evaluations
    if evaluations[-1]["returncode"] != 0 or evaluations[-1]["stage"] != "evaluate":
        return result
    argv = containers.report_command(run_dir=run_dir, user=user, version=__version__, revision=None)
    done = _finish(start(images["train"], argv, **popen), "report", stage_timeout_s)
    result["stages"].append({**done, "argv": argv})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    build_parser = sub.add_parser("build", help="build (or find cached) an image's dependency layer")
    build_parser.add_argument("image", choices=["train", "serve", "helm"])
    chain_parser = sub.add_parser("chain", help="replay the docker chain (run under `unshare -n`)")
    for name in ("run-dir", "hub-cache", "scratch", "json"):
        chain_parser.add_argument(f"--{name}", type=Path, required=True)
    chain_parser.add_argument("--uid", type=int, required=True)
    chain_parser.add_argument("--profile", default="smoke")
    chain_parser.add_argument("--set", dest="overrides", action="append", default=[])
    chain_parser.add_argument("--first-evaluate", default="", help="arguments of an evaluate run before the "
                              "recipe's own, e.g. '--suite quick'")
    args = parser.parse_args(argv)
    if args.action == "build":
        print(dependency_layer(read_image(args.image)))
        return 0
    result = chain(args.run_dir, args.hub_cache, args.scratch, args.uid, args.profile, args.overrides,
                   first_evaluate=shlex.split(args.first_evaluate) or None)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
