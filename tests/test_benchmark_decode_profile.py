"""benchmarks/decode_profile.py's variants: serve switches and kernel launches, run for real on the tiny model (CPU)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode_profile  # noqa: E402


def test_a_variant_names_serve_switches_and_launches_apart():
    served, mode, switches = decode_profile.parse_variant("merged:compiled_layers+rest+warps8")
    assert (served, mode, switches) == ("merged", "compiled_layers", {"decode_compile_rest": True})
    assert decode_profile.launches("merged:compiled_layers+rest+warps8") == {"SPLIT_WARPS": 8}
    assert decode_profile.launches("merged:compiled_layers+rest") == {}
    with pytest.raises(argparse.ArgumentTypeError, match="warps8"):  # the message lists what exists
        decode_profile.parse_variant("merged:compiled_layers+warps9")


def test_a_launch_holds_for_its_variant_only(tmp_path):
    """The split kernel's launch constant is set while its variant runs and restored for the next, as each
    variant's JSON records (on CPU the kernel does not run: the plumbing is what this checks)."""
    out = tmp_path / "decode_profile.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_profile.py"), "--out", str(out), "--workdir",
         str(tmp_path / "work"), "--arch", "tiny", "--device", "cpu", "--variants", "merged:static+warps8,merged:static",
         "--steps", "2", "--profile-steps", "1", "--skip-engine"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    from birbal.serve import flash_decode

    assert res["merged:static+warps8"]["launch"]["SPLIT_WARPS"] == 8
    assert res["merged:static"]["launch"]["SPLIT_WARPS"] == flash_decode.SPLIT_WARPS == 4
    assert all("error" not in res[v] for v in res["variants"])
