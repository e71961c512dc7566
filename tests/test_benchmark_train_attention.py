"""benchmarks/train_attention.py: its mask, its FLOP count and its correctness check, run for real on CPU (flex
eager, a small shape); the timing is the GPU's to give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_attention  # noqa: E402


def test_the_flex_arm_is_the_windowed_causal_attention_within_each_example():
    lengths, window = [40, 90], 17
    doc = train_attention.document_ids(lengths, "cpu")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(lengths), 8, generator=generator) for h in (4, 2, 2))
    every = torch.arange(sum(lengths))
    call = train_attention.flex_arm(doc, window, 4, 2, torch.device("cpu"), None, None, compiled=False)
    out = call(q, k, v)[0]
    torch.testing.assert_close(out, train_attention.reference_rows(q, k, v, doc, window, every), rtol=1e-5, atol=1e-5)
    # the check sees a mask one key off: the window, or the examples' boundary
    assert (out - train_attention.reference_rows(q, k, v, doc, window - 1, every)).abs().max() > 1e-3
    merged = train_attention.document_ids([sum(lengths)], "cpu")
    assert (out - train_attention.reference_rows(q, k, v, merged, window, every)).abs().max() > 1e-3


def test_the_flop_count_is_the_keys_each_query_attends_to():
    lengths, window = [5, 12], 4
    per_query = [min(i + 1, window) for n in lengths for i in range(n)]
    assert train_attention.keys_attended(lengths, window) == sum(per_query)
    assert train_attention.example_lengths(16384, 2, False, 0) == [8192, 8192]
    mix = train_attention.example_lengths(16384, 2, True, 0)
    assert sum(mix) == 16384 and max(mix) <= 8192 and len(mix) > 10


def test_the_cpu_check_runs_every_arm_and_records_it(tmp_path):
    out = tmp_path / "train_attention.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_attention.py"), "--out", str(out),
                          "--device", "cpu", "--tokens", "256", "--window", "33", "--heads", "4", "--kv-heads", "2",
                          "--dim", "16", "--repeats", "1", "--check-queries", "32", "--mix"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [a["arm"] for a in result["arms"]] == ["flex"] + [f"flex[{label}]" for label in (
        "BLOCK_M=64,BLOCK_N=64", "BLOCK_M=128,BLOCK_N=128", "BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=2")]
    for arm in result["arms"]:
        assert arm["out_max_abs_error"] < 1e-4 * arm["out_scale"], arm
        assert arm["forward_s"] > 0 and "FlexAttention does not support backward" in arm["backward_error"]
    assert result["flop"]["forward"] == 4 * 4 * 16 * train_attention.keys_attended(
        train_attention.example_lengths(256, 2, True, 0), 33)
