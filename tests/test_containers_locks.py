"""The image lock files match pyproject.toml: every dependency pinned exactly, with hashes, CUDA 12 torch."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from birbal import lock

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+) \\$")


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from a `--generate-hashes` requirements file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            current = canonicalize_name(match["name"])
            pins[current] = (match["version"], [])
        elif line.strip().startswith("--hash=sha256:") and current:
            pins[current][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"{path.name}: unexpected line {line!r} (every requirement must be name==version)")
    return pins


@pytest.fixture(params=lock.IMAGES)
def pins(request) -> dict[str, tuple[str, list[str]]]:
    return parse_lock(ROOT / lock.lock_file(request.param))


def test_every_dependency_is_pinned_with_hashes_and_satisfies_pyproject(pins):
    for text in PYPROJECT["project"]["dependencies"] + PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} from pyproject.toml is not in the lock"
        version, hashes = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} violates {requirement}"
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_every_pin_has_a_hash(pins):
    assert all(hashes for _, hashes in pins.values())
    assert len(pins) > 50  # the full closure, not just the top level


def test_torch_is_a_cuda_12_8_build_like_the_images(pins):
    assert pins["torch"][0].startswith("2.10.")
    assert pins["nvidia-cuda-runtime-cu12"][0].startswith("12.8.")
    assert not any(name.endswith("-cu13") for name in pins)
    assert "bitsandbytes" in pins and "triton" in pins


def test_lock_commands_are_exact():
    commands = lock.lock_commands("uv")
    assert commands == [
        ["uv", "pip", "compile", "pyproject.toml", "requirements/images.in", "--generate-hashes",
         "--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_28",
         "--custom-compile-command", "python -m birbal.lock", "--output-file", f"requirements/{image}.txt"]
        for image in ("train", "serve")
    ] + [["uv", "pip", "compile", "requirements/helm.in", "--generate-hashes", "--python-version", "3.12",
          "--python-platform", "x86_64-manylinux_2_28", "--custom-compile-command", "python -m birbal.lock",
          "--output-file", "requirements/helm.txt"]]
    assert lock.lock_commands("uv", ("serve",), upgrade=True)[0][-1] == "--upgrade"
    # HELM's lock: every pin hashed, and made by the same command.
    helm = parse_lock(ROOT / lock.HELM_LOCK)
    assert len(helm) > 50 and all(hashes for _, hashes in helm.values())
    assert "python -m birbal.lock" in (ROOT / lock.HELM_LOCK).read_text()
    with pytest.raises(ValueError, match="unknown image"):
        lock.lock_file("gpu")


def test_lock_files_say_how_they_were_made():
    for image in lock.IMAGES:
        head = (ROOT / lock.lock_file(image)).read_text().splitlines()[:3]
        assert any("python -m birbal.lock" in line for line in head)


def test_images_in_repeats_the_build_backend():
    inputs = {Requirement(line.split("#")[0].strip()).name for line in (ROOT / lock.EXTRA_INPUTS).read_text().splitlines()
              if line.split("#")[0].strip()}
    assert {Requirement(r).name for r in PYPROJECT["build-system"]["requires"]} <= inputs


def test_dry_run_prints_and_runs_nothing(capsys):
    assert lock.main(["--dry-run", "--image", "train"]) == 0
    err = capsys.readouterr().err
    assert "pip compile pyproject.toml requirements/images.in" in err and "requirements/train.txt" in err
    assert "serve.txt" not in err
