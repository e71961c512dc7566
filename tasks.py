"""User verbs for birbal-repro: `invoke --list`, `invoke <task> --help`.

Tasks hold no ML logic: each calls the one CLI (`python -m birbal <stage> ...`), natively or through
`docker run` (see `birbal.containers`). Every task prints the exact commands it runs; `--dry-run` prints them
and runs nothing (no server is started, no file is written).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from invoke import Collection, Exit, task

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "src"))  # tasks import the package's pure helpers; the CLI runs in subprocesses

STAGES = ("prepare-data", "train", "export", "serve", "evaluate")
HUB_CACHE = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))

PROFILE_HELP = "recipe profile under configs/ (birbal-4090, smoke)"
RUN_DIR_HELP = "run directory (default: runs/<profile>)"
SET_HELP = "override a recipe value, e.g. train.learning_rate=1e-5 (repeatable)"
RUNTIME_HELP = "where stages run: local, docker, or auto (docker when an engine and a GPU are there)"
DRY_HELP = "print every command without running anything"


def _python() -> list[str]:
    return [sys.executable, "-m", "birbal"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def _run_dir(profile: str, run_dir: str | None, config: str | None = None) -> Path:
    """`--run-dir`, else runs/<name>: the profile's, or with `--config` the recipe file's own `name`."""
    if run_dir:
        return Path(run_dir)
    return REPO / "runs" / (_load_recipe(Path(config), []).name if config else profile)


def _echo(command: list[str], background: bool = False) -> None:
    print(f"$ {shlex.join(command)}{' &' if background else ''}", file=sys.stderr, flush=True)


def _call(command: list[str], dry_run: bool) -> None:
    _echo(command)
    if dry_run:
        return
    code = subprocess.call(command, env=_env(), cwd=REPO)
    if code != 0:
        raise Exit(code=code)  # the command has already said why, in one line


def _runtime(runtime: str) -> str:
    if runtime not in ("auto", "local", "docker"):
        raise Exit(f"--runtime must be local, docker or auto, got {runtime!r}", code=2)
    if runtime != "auto":
        return runtime
    from birbal.containers import docker_available

    return "docker" if docker_available() is None and _gpu_present() else "local"


def _gpu_present() -> bool:
    from birbal.preflight import query_nvidia_smi

    return query_nvidia_smi() is not None


def _source(profile: str, config: str | None) -> list[str]:
    """`--config FILE` when given (a recipe file of one's own), else `--profile NAME`: as the CLI takes them."""
    return ["--config", str(Path(config).resolve())] if config else ["--profile", profile]


def _stage_command(stage: str, profile: str, run_dir: Path, overrides: list[str], runtime: str,
                   extra: list[str] | None = None, config: str | None = None) -> list[str]:
    if runtime == "docker":
        from birbal import __version__
        from birbal.containers import reproduce_stage_command
        from birbal.versions import software_versions

        return reproduce_stage_command(stage, profile=profile, run_dir=run_dir, hub_cache=HUB_CACHE,
                                       overrides=overrides, user=f"{os.getuid()}:{os.getgid()}", version=__version__,
                                       revision=software_versions()["git_revision"], extra=extra or ())
    return [*_python(), stage, *_source(profile, config), "--run-dir", str(run_dir),
            *[arg for o in overrides for arg in ("--set", o)], *(extra or [])]


def _stage_task(stage: str, c, profile: str, run_dir: str | None, set_: list[str], runtime: str, dry_run: bool,
                extra: list[str] | None = None, config: str | None = None, force: bool = False) -> None:
    where = _runtime(runtime)
    if config and where == "docker":
        raise Exit("--config works with --runtime local (the images take a profile under configs/)", code=2)
    extra = [*(extra or []), *(["--force"] if force else [])]
    _call(_stage_command(stage, profile, _run_dir(profile, run_dir, config), list(set_ or []), where, extra,
                         config), dry_run)


CONFIG_HELP = "a recipe YAML file instead of --profile (local runtime)"
FORCE_HELP = "run the stage even if it is complete (train: set aside checkpoints that no longer apply)"
COMMON_HELP = {"profile": PROFILE_HELP, "run-dir": RUN_DIR_HELP, "set": SET_HELP, "runtime": RUNTIME_HELP,
               "dry-run": DRY_HELP, "config": CONFIG_HELP}
FORCE_STAGE_HELP = {**COMMON_HELP, "force": FORCE_HELP}


@task(help=FORCE_STAGE_HELP, iterable=["set_"])
def prepare_data(c, profile="birbal-4090", run_dir=None, set_=None, runtime="auto", dry_run=False, config=None,
                 force=False):
    """Build the train/eval splits, the data manifest and the contamination report."""
    _stage_task("prepare-data", c, profile, run_dir, set_, runtime, dry_run, config=config, force=force)


@task(help={**FORCE_STAGE_HELP, "budget-hours": "override train.budget_hours for this run"}, iterable=["set_"])
def train(c, profile="birbal-4090", run_dir=None, set_=None, runtime="auto", budget_hours=None, dry_run=False,
          config=None, force=False):
    """4-bit QLoRA training inside its wall-clock budget; resumes from the last complete checkpoint."""
    extra = ["--budget-hours", str(budget_hours)] if budget_hours is not None else []
    _stage_task("train", c, profile, run_dir, set_, runtime, dry_run, extra, config=config, force=force)


@task(help=FORCE_STAGE_HELP, iterable=["set_"])
def export(c, profile="birbal-4090", run_dir=None, set_=None, runtime="auto", dry_run=False, config=None,
           force=False):
    """Check the adapter against the recipe and merge it into a bf16 copy of the base."""
    _stage_task("export", c, profile, run_dir, set_, runtime, dry_run, config=config, force=force)


@task(help={**COMMON_HELP, "host": "address to bind (default: serve.host)", "port": "port (default: serve.port)"},
      iterable=["set_"])
def serve(c, profile="birbal-4090", run_dir=None, set_=None, runtime="auto", host=None, port=None, dry_run=False,
          config=None):
    """Start the challenge HTTP API on the run's exported model (foreground; Ctrl-C stops it)."""
    extra = (["--host", host] if host else []) + (["--port", str(port)] if port else [])
    if _runtime(runtime) == "docker":
        extra = []  # the container listens on 0.0.0.0:8080; the host port is published by `docker run`
    _stage_task("serve", c, profile, run_dir, set_, runtime, dry_run, extra, config=config)


@task(help={**COMMON_HELP, "url": "server base URL (default: from the recipe's serve section)",
            "suite": "quick (offline, minutes) or open (HELM with the challenge's run specs)",
            "max-eval-instances": "cap the instances per scenario"}, iterable=["set_"])
def evaluate(c, profile="birbal-4090", run_dir=None, set_=None, runtime="auto", url=None, suite=None,
             max_eval_instances=None, dry_run=False, config=None):
    """Score the running server and write the evaluation summary."""
    extra = (["--url", url] if url else []) + (["--suite", suite] if suite else []) + (
        ["--max-eval-instances", str(max_eval_instances)] if max_eval_instances else [])
    _stage_task("evaluate", c, profile, run_dir, set_, runtime, dry_run, extra, config=config)


def _required_run_dir(run_dir: str | None, verb: str) -> str:
    # A keyword, not a positional: a positional would take `--help` as the run dir.
    if not run_dir:
        raise Exit(f"invoke {verb}: --run-dir is required (see `invoke {verb} --help`)", code=2)
    return run_dir


@task(help={"run-dir": "the run directory (must exist)", "dry-run": DRY_HELP})
def report(c, run_dir=None, dry_run=False):
    """Rebuild report.md and its plots from the run directory alone."""
    _call([*_python(), "report", "--run-dir", _required_run_dir(run_dir, "report")], dry_run)


@task(help={"run-dir": "this run (the comparison is written to its compare/ and report.md)",
            "against": "the other run directory, e.g. the submission's (only read)",
            "rows": "eval split rows in the probe set", "device": "auto, cpu or cuda",
            "dtype": "both models in this dtype (default: each run's serve.dtype)",
            "no-models": "scores only, load no model", "dry-run": DRY_HELP})
def compare(c, run_dir, against, rows=None, device=None, dtype=None, no_models=False, dry_run=False):
    """Set two runs side by side: published, their and our scores with bootstrap intervals; model-to-model KL."""
    extra = (["--rows", str(rows)] if rows is not None else []) + (["--device", device] if device else []) + (
        ["--dtype", dtype] if dtype else []) + (["--no-models"] if no_models else [])
    _call([*_python(), "compare", "--run-dir", run_dir, "--against", against, *extra], dry_run)


def _record_images(run_dir: Path) -> None:
    """Write the ids and digests of the images this run uses to <run-dir>/images.json (the manifest includes it)."""
    from birbal import __version__
    from birbal.containers import IMAGES, image_tags, inspect_command, parse_inspect, write_build_manifest
    from birbal.versions import software_versions

    built = {}
    for image in IMAGES:
        ref = image_tags(image, __version__, software_versions()["git_revision"])[-1]
        result = subprocess.run(inspect_command(ref), capture_output=True, text=True)
        if result.returncode != 0:
            raise Exit(f"image {ref} is not built: run `invoke build` first", code=1)
        built[image] = parse_inspect(image, ref, result.stdout)
    write_build_manifest(run_dir / "images.json", built)


def _load_recipe(profile: str | Path, overrides: list[str]):
    from birbal.config import load_recipe
    from birbal.errors import ConfigError

    try:
        return load_recipe(profile, overrides)
    except ConfigError as err:
        raise Exit(f"birbal: error: {err}", code=2) from None


def _wait_healthy(url: str, timeout_s: float, server: subprocess.Popen | None, run_id: str | None = None) -> None:
    from birbal.errors import EvaluateError
    from birbal.evaluate.client import wait_until_healthy

    try:
        wait_until_healthy(url, timeout_s, server, poll_s=1.0, run_id=run_id)
    except EvaluateError as err:
        raise Exit(f"birbal: error: {err}", code=1) from None


def _read_run_id(run_dir: Path) -> str | None:
    from birbal.rundir import RUN_ID

    try:
        return (run_dir / RUN_ID).read_text().strip() or None
    except OSError:
        return None


def _reproduce(profile: str, run_dir: Path, overrides: list[str], runtime: str, dry_run: bool,
               budget_hours: float | None, port: int | None = None, config: str | None = None) -> None:
    # fails fast, before any stage, on a bad profile, recipe file or override
    recipe = _load_recipe(Path(config) if config else profile, overrides)
    if runtime == "docker" and not dry_run:
        for folder in (run_dir, HUB_CACHE):  # `docker run --mount` does not create them
            folder.mkdir(parents=True, exist_ok=True)
        _record_images(run_dir)
    published = recipe.serve.published_adapter
    if published is not None:  # the submission's own adapter: nothing to build, serve it (birbal-submission)
        print(f"serving the published adapter {published.name_or_path}@{published.revision}: prepare-data, train "
              "and export skipped", file=sys.stderr)
    for stage in () if published is not None else ("prepare-data", "train", "export"):
        extra = ["--budget-hours", str(budget_hours)] if stage == "train" and budget_hours is not None else []
        _call(_stage_command(stage, profile, run_dir, overrides, runtime, extra, config), dry_run)
    if runtime == "docker":
        _docker_serve_and_evaluate(profile, run_dir, overrides, recipe.serve.startup_timeout_s, dry_run)
    else:
        _local_serve_and_evaluate(profile, run_dir, overrides, recipe, dry_run, port, config)
    if runtime == "docker":
        from birbal import __version__
        from birbal.containers import report_command
        from birbal.versions import software_versions

        _call(report_command(run_dir=run_dir, user=f"{os.getuid()}:{os.getgid()}", version=__version__,
                             revision=software_versions()["git_revision"]), dry_run)
    else:
        _call([*_python(), "report", "--run-dir", str(run_dir)], dry_run)
    if not dry_run:
        print(f"\nrun directory: {run_dir.resolve()}\nmanifest:      {run_dir.resolve() / 'manifest.json'}\n"
              f"report:        {run_dir.resolve() / 'report.md'}")


SERVE_CONTAINER_LOG = "serve-container.log"  # beside the run's records: the server container's whole log


def _docker_serve_and_evaluate(profile: str, run_dir: Path, overrides: list[str], timeout_s: float,
                               dry_run: bool) -> None:
    """The server container, detached: its health wait ends when it exits (printing its log), and its log is
    kept in <run-dir>/serve-container.log before it is removed; a cleanup failure never hides the real error."""
    from birbal.containers import (
        ServeContainer,
        ServeContainerError,
        health_url,
        remove_command,
        stop_command,
    )
    from birbal.evaluate.client import check_server

    serve_cmd = _stage_command("serve", profile, run_dir, overrides, "docker")
    url = health_url().removesuffix("/health")
    if dry_run:
        for command in (remove_command(run_dir.name), serve_cmd):
            _echo(command)
        print(f"waiting for {url}/health (up to {timeout_s:.0f} s, or until the container exits)", file=sys.stderr)
        _call(_stage_command("evaluate", profile, run_dir, overrides, "docker", ["--url", url]), True)
        _echo(stop_command(run_dir.name))
        return
    server = ServeContainer(run_dir.name, run_dir / SERVE_CONTAINER_LOG, echo=lambda line: print(line, file=sys.stderr))
    _echo(serve_cmd)
    try:
        server.start(serve_cmd)
        print(f"waiting for {url}/health (up to {timeout_s:.0f} s, or until the container exits)", file=sys.stderr)
        server.wait_healthy(url, timeout_s, lambda u: check_server(u, timeout_s=5.0))
        _call(_stage_command("evaluate", profile, run_dir, overrides, "docker", ["--url", url]), False)
    except ServeContainerError as err:
        raise Exit(f"birbal: error: {err}", code=1) from None
    finally:
        server.close()


def _local_serve_and_evaluate(profile: str, run_dir: Path, overrides: list[str], recipe, dry_run: bool,
                              port: int | None = None, config: str | None = None) -> None:
    host = "127.0.0.1"
    port = port or recipe.serve.port
    url = f"http://{host}:{port}"
    serve_cmd = _stage_command("serve", profile, run_dir, overrides, "local", ["--host", host, "--port", str(port)],
                               config)
    _echo(serve_cmd, background=True)
    server = None if dry_run else subprocess.Popen(serve_cmd, env=_env(), cwd=REPO)
    try:
        print(f"waiting for {url}/health (up to {recipe.serve.startup_timeout_s:.0f} s)", file=sys.stderr)
        if not dry_run:  # a server of another run answering at `url` is not ours: wait for our own, or its exit
            _wait_healthy(url, recipe.serve.startup_timeout_s, server, _read_run_id(run_dir))
        _call(_stage_command("evaluate", profile, run_dir, overrides, "local", ["--url", url], config), dry_run)
    finally:
        if server is not None and server.poll() is None:
            _echo(["kill", "-TERM", str(server.pid)])
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()




PORT_HELP = "port for this run's server (local runtime; default: serve.port). Another run's server on it is refused"


@task(help={"profile": PROFILE_HELP, "run-dir": RUN_DIR_HELP, "set": SET_HELP, "runtime": RUNTIME_HELP,
            "budget-hours": "override train.budget_hours for this run", "dry-run": DRY_HELP, "port": PORT_HELP,
            "config": CONFIG_HELP},
      iterable=["set_"])
def reproduce(c, profile="birbal-4090", run_dir=None, set_=None, runtime="auto", budget_hours=None, dry_run=False,
              port=None, config=None):
    """The whole chain: prepare-data, train, export, serve, evaluate, report. Completed stages are skipped."""
    where = _runtime(runtime)
    if config and where == "docker":
        raise Exit("--config works with --runtime local (the images take a profile under configs/)", code=2)
    if where == "docker" and not dry_run:
        from birbal.containers import docker_available

        reason = docker_available()
        if reason:
            raise Exit(f"--runtime docker: {reason}", code=1)
    folder = _run_dir(profile, run_dir, config)
    _preflight(_load_recipe(Path(config) if config else profile, list(set_ or [])), folder, stop=not dry_run)
    _reproduce(profile, folder, list(set_ or []), where, dry_run, budget_hours, int(port) if port else None, config)


def _preflight(recipe, run_dir: Path, stop: bool) -> None:
    """GPU and memory, driver, disk, token: each failure one line, before hours of work start."""
    from birbal.preflight import failures, query_nvidia_smi, run_preflight

    checks = run_preflight(recipe, nvidia_smi_output=query_nvidia_smi(), run_dir=run_dir, hub_cache=HUB_CACHE)
    for check in checks:
        print(check.line(), file=sys.stderr)
    if stop and failures(checks):
        raise Exit(f"preflight: {len(failures(checks))} check(s) failed (see above)", code=1)


@task(help={"run-dir": "run directory (default: runs/smoke)", "dry-run": DRY_HELP, "port": PORT_HELP})
def smoke(c, run_dir=None, dry_run=False, port=None):
    """The whole chain on a laptop CPU in minutes: tiny random Mistral, real tokenizer, 4-bit, fixture data."""
    _reproduce("smoke", _run_dir("smoke", run_dir), [], "local", dry_run, None, int(port) if port else None)


@task(help={"run-dir": "the run directory to check (read only: nothing is written)",
            "against": "a manifest.json (or run directory) whose outputs must match"})
def verify(c, run_dir=None, against=None):
    """Re-hash every recorded output and check the training stayed inside its budget and memory cap."""
    from birbal.verify import verify_run

    run_dir = _required_run_dir(run_dir, "verify")
    problems = verify_run(run_dir, against)
    if problems:
        for problem in problems:
            print(f"- {problem}", file=sys.stderr)
        raise Exit(f"{len(problems)} problem(s) in {run_dir}", code=1)
    print(f"{run_dir}: every recorded output matches; budget and memory cap respected")


@task(help={"no-cache": "build without Docker's layer cache", "tag": "an extra tag for both images",
            "dry-run": DRY_HELP})
def build(c, no_cache=False, tag=None, dry_run=False):
    """Build Dockerfile.train and Dockerfile.serve, tagged with version and git revision; record their digests."""
    from birbal import __version__
    from birbal.containers import (
        IMAGES,
        build_command,
        docker_available,
        image_tags,
        inspect_command,
        parse_inspect,
        write_build_manifest,
    )
    from birbal.versions import software_versions

    revision = software_versions()["git_revision"]
    if not dry_run:
        reason = docker_available()
        if reason:
            raise Exit(f"invoke build: {reason}", code=1)
    built = {}
    for image in IMAGES:
        extra = [f"birbal-repro-{image}:{tag}"] if tag else []
        _call(build_command(image, version=__version__, revision=revision, source=str(REPO), context=REPO,
                            no_cache=no_cache, extra_tags=extra), dry_run)
        ref = image_tags(image, __version__, revision)[-1]
        _echo(inspect_command(ref))
        if not dry_run:
            out = subprocess.run(inspect_command(ref), capture_output=True, text=True, check=True).stdout
            built[image] = parse_inspect(image, ref, out)
    if not dry_run:
        path = REPO / "build" / "manifest.json"
        write_build_manifest(path, built)
        print(f"build manifest: {path}")


@task(help={"dry-run": DRY_HELP, "upgrade": "let the resolver move to newer versions"})
def lock(c, dry_run=False, upgrade=False):
    """Regenerate requirements/train.txt and requirements/serve.txt (hash-locked) from pyproject.toml."""
    _call([sys.executable, "-m", "birbal.lock", *(["--dry-run"] if dry_run else []),
           *(["--upgrade"] if upgrade else [])], False)


@task(help={"profile": PROFILE_HELP, "set": SET_HELP}, iterable=["set_"])
def validate(c, profile="birbal-4090", set_=None):
    """Validate a recipe and print it resolved, loading no model."""
    _call([*_python(), "validate", "--profile", profile, *[a for o in (set_ or []) for a in ("--set", o)]], False)


@task(help={"profile": PROFILE_HELP, "run-dir": RUN_DIR_HELP})
def preflight(c, profile="birbal-4090", run_dir=None):
    """Before a long run: GPU and memory, driver for the image's CUDA, disk space, hub token."""

    _preflight(_load_recipe(profile, []), _run_dir(profile, run_dir), stop=True)


@task(help={"k": "only tests matching this expression", "gpu": "run only the GPU tests (needs CUDA)"})
def test(c, k=None, gpu=False):
    """Run the test suite (what CI runs)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if gpu:
        command += ["-m", "gpu"]  # one process: the GPU tests share the one GPU
    else:
        # Two workers (pytest-xdist): a serial run keeps only 1.2 of 2 cores busy, much of it waiting on the chain
        # tests' subprocesses and servers; measured on the 2-core CI machine, 10:19 serial, 9:14 in two workers.
        # Two, not one a core: each worker holds its own torch and its own smoke chain (tests/conftest.py).
        command += ["-n", "2"]
    if k:
        command += ["-k", k]
    _call(command, False)


@task
def lint(c):
    """ruff on the code, hadolint on the three Dockerfiles."""
    _call([sys.executable, "-m", "ruff", "check", "src", "tests", "tasks.py", "benchmarks"], False)
    hadolint = Path(sys.executable).parent / "hadolint"
    for dockerfile in ("Dockerfile.train", "Dockerfile.serve", "Dockerfile.helm"):
        _call([str(hadolint) if hadolint.exists() else "hadolint", dockerfile], False)


ns = Collection(prepare_data, train, export, serve, evaluate, report, compare, reproduce, smoke, verify, build, lock,
                validate, preflight, test, lint)
