"""Hash-locked requirements for the container images, compiled from pyproject.toml.

`python -m birbal.lock` (what `invoke lock` runs) writes `requirements/train.txt` and `requirements/serve.txt`
with `uv pip compile --generate-hashes` for the images' interpreter and platform, so that
`pip install --require-hashes --no-deps -r requirements/<image>.txt` installs exactly the same files on every
build. `requirements/cpu.txt` (laptops and CI) is written by hand and is not touched here.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# The images are Ubuntu 24.04 (python3.12 from the distribution) on x86_64; glibc 2.39 accepts manylinux_2_28.
PYTHON_VERSION = "3.12"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
IMAGES = ("train", "serve")
EXTRA_INPUTS = "requirements/images.in"
# The build backend that the images install first, so that the lock's one sdist (rouge-score 0.1.2: PyPI has no wheel)
# is built with `--no-build-isolation` by these hash-checked files instead of a setuptools that pip fetches live.
BUILD_LOCK = "requirements/build.txt"
BUILD_BACKEND = ("setuptools", "wheel")
# HELM's own venv in Dockerfile.helm: crfm-helm and the images' torch (requirements/helm.in), locked apart from the
# project because HELM pins its own versions.
HELM_INPUTS = "requirements/helm.in"
HELM_LOCK = "requirements/helm.txt"
CUSTOM_COMMAND = "python -m birbal.lock"
REPO_ROOT = Path(__file__).resolve().parents[2]


def lock_file(image: str) -> str:
    """Repository-relative path of an image's lock file."""
    if image not in IMAGES:
        raise ValueError(f"unknown image {image!r}; images: {', '.join(IMAGES)}")
    return f"requirements/{image}.txt"


def lock_commands(uv: str = "uv", images: tuple[str, ...] = IMAGES, upgrade: bool = False) -> list[list[str]]:
    """The exact `uv pip compile` command lines, one per image, to run from the repository root."""
    commands = []
    for image in images:
        command = [uv, "pip", "compile", "pyproject.toml", EXTRA_INPUTS,
                   "--generate-hashes",
                   "--python-version", PYTHON_VERSION,
                   "--python-platform", PYTHON_PLATFORM,
                   "--custom-compile-command", CUSTOM_COMMAND,
                   "--output-file", lock_file(image)]
        if upgrade:
            command.append("--upgrade")
        commands.append(command)
    if images == IMAGES:
        command = [uv, "pip", "compile", HELM_INPUTS, "--generate-hashes", "--python-version", PYTHON_VERSION,
                   "--python-platform", PYTHON_PLATFORM, "--custom-compile-command", CUSTOM_COMMAND,
                   "--output-file", HELM_LOCK]
        commands.append([*command, "--upgrade"] if upgrade else command)
    return commands


def lock_entries(text: str, names: tuple[str, ...]) -> str:
    """The `name==version` blocks (with their --hash lines and `# via` comments) of `names` from a lock's text."""
    wanted = {name.lower().replace("_", "-") for name in names}
    blocks, current = {}, None
    for line in text.splitlines(keepends=True):
        if line and not line.startswith((" ", "#", "\n")):
            name = line.split("==", 1)[0].strip().lower().replace("_", "-")
            current = name if name in wanted else None
            if current:
                blocks[current] = ""
        elif not line.startswith((" ", "\n")):
            current = None
        if current:
            blocks[current] += line
    missing = wanted - set(blocks)
    if missing:
        raise ValueError(f"not in the lock: {', '.join(sorted(missing))}")
    return "".join(blocks[name] for name in sorted(blocks))


def build_lock_text(image_lock_text: str) -> str:
    """requirements/build.txt: the build backend's entries copied from an image lock (same versions, same hashes)."""
    return ("# The build backend the images install before their lock, so the lock's sdists build with\n"
            "# --no-build-isolation from these hash-checked files. Copied from requirements/train.txt by\n"
            f"# `{CUSTOM_COMMAND}`: never edit by hand.\n" + lock_entries(image_lock_text, BUILD_BACKEND))


def find_uv() -> str | None:
    """`uv` on PATH, or beside this interpreter (a venv that pip-installed uv)."""
    beside = Path(sys.executable).with_name("uv")
    return shutil.which("uv") or (str(beside) if beside.is_file() else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m birbal.lock", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--upgrade", action="store_true", help="re-resolve to the newest allowed versions")
    parser.add_argument("--image", choices=IMAGES, action="append", help="lock only this image (repeatable)")
    args = parser.parse_args(argv)
    uv = find_uv()
    if uv is None and not args.dry_run:
        print("uv not found: `pip install uv` (https://docs.astral.sh/uv/), then run this again", file=sys.stderr)
        return 2
    commands = lock_commands(uv or "uv", tuple(args.image or IMAGES), args.upgrade)
    for command in commands:
        print("+ " + shlex.join(command), file=sys.stderr)
        if not args.dry_run:
            subprocess.run(command, cwd=REPO_ROOT, check=True)
    if not args.dry_run:
        text = build_lock_text((REPO_ROOT / lock_file("train")).read_text())
        (REPO_ROOT / BUILD_LOCK).write_text(text)
        print(f"wrote {BUILD_LOCK}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
