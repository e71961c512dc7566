"""HELM's own environment: kept out of the project's dependencies, because crfm-helm pulls torch, torchvision
and a CUDA build with them (a 6.4 GB venv; PLATFORM_NOTES.md).

`python -m birbal.evaluate.helm_env [VENV]` prints the commands that create it; point `BIRBAL_HELM_PYTHON` at
its python afterwards. `--client-only` installs HELM without its heavy dependencies: enough for HELM's client
classes (the quick suite), not for `helm-run`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path

from birbal.errors import EvaluateError

HELM_VERSION = "0.5.16"  # newest crfm-helm on PyPI when this was written (`pip index versions crfm-helm`)
DEFAULT_VENV = Path(".cache/helm-venv")
# What HELM's client classes import (found by importing them in a --no-deps install of crfm-helm 0.5.16).
CLIENT_ONLY_DEPS = ("requests", "cattrs~=22.2", "dacite~=1.6", "sqlitedict>=2.1,<3", "retrying~=1.3",
                    "colorlog~=6.9", "pyhocon~=0.3.59", "filelock", "zstandard", "tqdm", "pyyaml")
HELM_PYTHON_ENV = "BIRBAL_HELM_PYTHON"


def venv_commands(venv: Path = DEFAULT_VENV, client_only: bool = False) -> list[list[str]]:
    python = str(venv / "bin" / "python")
    commands = [["python", "-m", "venv", str(venv)]]
    if client_only:
        commands.append([python, "-m", "pip", "install", "--no-deps", f"crfm-helm=={HELM_VERSION}"])
        commands.append([python, "-m", "pip", "install", *CLIENT_ONLY_DEPS])
    else:
        commands.append([python, "-m", "pip", "install", f"crfm-helm=={HELM_VERSION}"])
    return commands


def venv_instructions(venv: Path = DEFAULT_VENV, client_only: bool = False) -> str:
    lines = [" ".join(shlex.quote(part) for part in cmd) for cmd in venv_commands(venv, client_only)]
    lines.append(f"export {HELM_PYTHON_ENV}={venv.resolve() / 'bin' / 'python'}")
    return " && \\\n  ".join(lines[:-1]) + "\n" + lines[-1]


def helm_executable(name: str) -> Path:
    """`helm-run` / `helm-summarize` from HELM's venv (beside BIRBAL_HELM_PYTHON), else from PATH."""
    helm_python = os.environ.get(HELM_PYTHON_ENV)
    if helm_python:
        candidate = Path(helm_python).expanduser().parent / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        raise EvaluateError(f"{name} not found beside {HELM_PYTHON_ENV}={helm_python}: that environment lacks the "
                            f"full crfm-helm=={HELM_VERSION}; create it with:\n{venv_instructions()}")
    found = shutil.which(name)
    if found:
        return Path(found)
    raise EvaluateError(f"{name} not found: HELM is not installed. It lives in its own environment; create it "
                        f"with:\n{venv_instructions()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the commands that create HELM's own environment.")
    parser.add_argument("venv", nargs="?", type=Path, default=DEFAULT_VENV, help="where to create it")
    parser.add_argument("--client-only", action="store_true", help="HELM's client classes only (no torch)")
    args = parser.parse_args(argv)
    print(venv_instructions(args.venv, args.client_only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
