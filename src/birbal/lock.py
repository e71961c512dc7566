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
    return commands


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
