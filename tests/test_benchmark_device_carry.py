"""benchmarks/device_carry.py: the GPU box's wheels come from the lock's pins, and bitsandbytes' wheel is slimmed
to one CUDA library with a RECORD that matches what is left."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_carry  # noqa: E402


def test_every_carried_package_is_pinned_by_the_serving_lock():
    specs = device_carry.pinned(device_carry.PACKAGES + device_carry.SDISTS)
    table = device_carry.pins()
    assert len(specs) == len(set(specs)) == len(device_carry.PACKAGES) + len(device_carry.SDISTS)
    assert f"transformers=={table['transformers']}" in specs and f"peft=={table['peft']}" in specs
    assert all("==" in s and s.split("==")[1] for s in specs)


def test_a_name_the_lock_does_not_pin_is_refused(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("pydantic-core==2.50.5 \\\n    --hash=sha256:00\n    # via pydantic\n")
    assert device_carry.pins(lock) == {"pydantic-core": "2.50.5"}
    with pytest.raises(SystemExit, match="pins none of flash-attn"):
        device_carry.pinned(["pydantic-core", "flash-attn"], lock)


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_bitsandbytes_keeps_its_cuda_130_and_cpu_libraries_and_a_true_record(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {"bitsandbytes/__init__.py": b"x = 1\n", "bitsandbytes/libbitsandbytes_cpu.so": b"cpu" * 10,
             "bitsandbytes/libbitsandbytes_cuda130.so": b"c130" * 10,
             "bitsandbytes/libbitsandbytes_cuda128.so": b"c128" * 1000,
             "bitsandbytes/libbitsandbytes_rocm72.so": b"rocm" * 1000,
             "bitsandbytes-0.50.2.dist-info/METADATA": b"Name: bitsandbytes\n"}
    record = "".join(f"{n},{_digest(d)},{len(d)}\n" for n, d in files.items())
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")
    device_carry.slim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        lines = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        contents = {n: z.read(n) for n in names}
    assert "bitsandbytes/libbitsandbytes_cuda128.so" not in names
    assert "bitsandbytes/libbitsandbytes_rocm72.so" not in names
    assert {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"} <= names
    listed = {line.split(",")[0]: line.split(",")[1:] for line in lines}
    assert set(listed) == names  # every file left is listed, nothing removed is
    for name, (digest, size) in listed.items():
        if not name.endswith("RECORD"):
            assert (digest, size) == (_digest(contents[name]), str(len(contents[name])))


def test_a_wheel_without_the_cuda_130_library_is_refused(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.42.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/libbitsandbytes_cuda121.so", b"old")
        z.writestr("bitsandbytes-0.42.0.dist-info/RECORD", "")
    with pytest.raises(SystemExit, match="no libbitsandbytes_cuda130"):
        device_carry.slim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as z:  # refused before anything is written: the wheel is as it was
        assert "bitsandbytes/libbitsandbytes_cuda121.so" in z.namelist()
