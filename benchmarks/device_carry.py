"""Build the wheel folder a GPU box without a registry needs to run the benchmarks and the GPU tests.

The box has torch, triton, numpy and the scientific stack, but not this project's serving and training pins
(bitsandbytes, pydantic, FastAPI, uvicorn, ijson, rouge-score, mistral-common, the transformers 5.24 stack). This
downloads those wheels at the locks' own versions (requirements/serve.txt: the serving image's pins), for CPython
3.12 on x86-64 Linux, into one folder that travels with the command (`carry`), and saves the Mistral-7B-v0.1
tokenizer there as a folder (`tok/`: transformers cannot import mistral-common's tokenizer there when jsonschema is
missing, and a saved folder needs neither). Run from the repository root, with the project's venv:

    .venv/bin/python benchmarks/device_carry.py --out .cache/whl3

Then, on the box, each command starts with `source benchmarks/device_env.sh` (it installs the folder into
/tmp/site, compiles the bytecode the box lacks, and sets PYTHONPATH and the quiet-logging variables).

bitsandbytes' wheel holds a CUDA library for every toolkit it supports (about 150 MB); the carry keeps the CUDA
13.0 one (the box's torch is cu130) and the CPU one, so the folder stays under the 64 MiB a command may carry
(about 45 MB in all). Why by hand: pip has no option to drop a wheel's files, and none of its tools repacks one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "serve.txt"
# What the box lacks (its image's package list: /work/.library/device/KINDS.md), with their own needs there
PACKAGES = (
    "bitsandbytes", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "fastapi", "starlette", "annotated-doc", "opentelemetry-api", "uvicorn", "ijson", "nltk", "invoke", "pycountry",
    "transformers", "tokenizers", "huggingface-hub", "httpx2", "httpcore2", "truststore", "click", "peft",
    "safetensors", "mistral-common", "jsonschema", "referencing", "jsonschema-specifications", "rpds-py",
    "pydantic-extra-types",
)
SDISTS = ("rouge-score",)  # published as an sdist only: its wheel is built here
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")
KEEP_CUDA = "cuda130"


def pins(lock: Path = LOCK) -> dict[str, str]:
    """name -> version of every `name==version` line of a pip-compile lock (names normalised as pip does)."""
    found = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if m:
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return found


def pinned(names, lock: Path = LOCK) -> list[str]:
    """`name==version` for each of `names`, from the lock; a name the lock does not pin is an error."""
    table = pins(lock)
    missing = [n for n in names if n not in table]
    if missing:
        raise SystemExit(f"device_carry: {lock} pins none of {', '.join(missing)}")
    return [f"{n}=={table[n]}" for n in names]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(wheel: Path, keep: str = KEEP_CUDA) -> Path:
    """`wheel` rewritten in place without the native libraries of other toolkits than `keep` (the CPU one stays),
    its RECORD listing exactly what is left, with each file's hash and size as the wheel format asks."""
    kept: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            lib = re.search(r"libbitsandbytes_([a-z0-9]+)\.(so|dll|dylib)$", name)
            if lib and lib.group(1) not in (keep, "cpu"):
                continue
            kept[name] = z.read(name)
    if not any(re.search(rf"libbitsandbytes_{keep}\.", n) for n in kept):
        raise SystemExit(f"device_carry: {wheel.name} has no libbitsandbytes_{keep}: the box's torch needs it")
    record = next(n for n in kept if n.endswith(".dist-info/RECORD"))
    lines = [f"{n},{_record_hash(d)},{len(d)}" for n, d in kept.items() if n != record] + [f"{record},,"]
    kept[record] = ("\n".join(lines) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in kept.items():
            z.writestr(name, data)
    tmp.replace(wheel)
    return wheel


def download(out: Path, specs: list[str]) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out), *specs],
                   check=True)


def build_sdists(out: Path, specs: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), *specs], check=True)


def save_tokenizer(out: Path) -> Path:
    """The smoke profile's tokenizer (mistral-common's Mistral-7B-v0.1 file, as birbal.models loads it), saved."""
    sys.path.insert(0, str(ROOT / "src"))
    from birbal.config import load_recipe
    from birbal.models import load_tokenizer

    folder = out / "tok"
    with tempfile.TemporaryDirectory() as cache:
        load_tokenizer(load_recipe("smoke").model.tokenizer, Path(cache)).save_pretrained(str(folder))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to fill (made; wheels already there "
                        "of another version are removed, so that one version of each installs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    specs, builds = pinned(PACKAGES), pinned(SDISTS)
    wanted = {re.sub(r"[-_.]+", "_", s.split("==")[0]).lower(): s.split("==")[1] for s in specs + builds}
    for old in args.out.glob("*.whl"):  # a stale version beside the pinned one would stop pip's install
        name, version = old.name.split("-")[:2]
        if wanted.get(name.lower()) != version:
            old.unlink()
    download(args.out, specs)
    build_sdists(args.out, builds)
    for wheel in args.out.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    tok = save_tokenizer(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(list(args.out.glob('*.whl')))} wheels and {tok.name}/ in {args.out}: {size / 2**20:.1f} MiB")
    if size > 64 * 2**20:
        print("device_carry: over the 64 MiB a command may carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
