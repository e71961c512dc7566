"""benchmarks/device_env.sh, sourced as a GPU command starts: the carried wheels installed where PYTHONPATH then
points, and a failed install stops the command with the environment as it was."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def _wheel(folder, name: str, version: str) -> None:
    """A real (pure Python) wheel of a one-module package `name`."""
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def _source(tmp_path, carry, then: str) -> subprocess.CompletedProcess:
    python_dir = str(Path(sys.executable).parent)  # its python3: this test's interpreter
    script = (f'export PATH="{python_dir}:$PATH" CARRY="{carry}" SITE="{tmp_path / "site"}" '
              f'DEVICE_ENV_NO_COMPILEALL=1; source benchmarks/device_env.sh && {then}')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_carried_wheels_are_what_the_command_imports(tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    _wheel(carry, "birbal_carry_probe", "1.2.3")
    done = _source(tmp_path, carry, 'python3 -c "import birbal_carry_probe as p; print(p.VERSION, p.__file__)"; '
                                    'echo "$PYTHONPATH"')
    assert done.returncode == 0, done.stderr
    version, path = done.stdout.splitlines()[0].split()
    assert version == "1.2.3" and path.startswith(str(tmp_path / "site"))
    assert done.stdout.splitlines()[1] == f"{tmp_path / 'site'}:src"


def test_a_failed_install_stops_the_command(tmp_path):
    carry = tmp_path / "empty"
    carry.mkdir()  # no wheel: pip is handed a glob that matches nothing
    done = _source(tmp_path, carry, 'echo "ran with $PYTHONPATH"')
    assert done.returncode == 1 and "ran with" not in done.stdout
    assert "device_env: the install from" in done.stderr
