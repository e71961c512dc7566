"""benchmarks/train_dropout.py: its arms' maths run for real on CPU (eager, a small shape), and its four-number
random form through Triton's interpreter; the timing is the GPU's to give."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from triton_interpreter import triton_interpreter  # noqa: F401  (a fixture)

sys.path.insert(0, str(REPO / "benchmarks"))

import train_dropout  # noqa: E402


def test_the_cpu_check_runs_each_arm_and_records_what_it_zeroed(tmp_path):
    out = tmp_path / "train_dropout.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_dropout.py"), "--out", str(out),
                          "--device", "cpu", "--tokens", "256", "--width", "512", "--hidden", "128", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    results = {(r["site"], r["arm"]): r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {(s, a) for s in train_dropout.SITES for a in train_dropout.ARMS}
    for site, dropouts in (("mlp", 1), ("norm", 3)):
        trained = results[site, "as_trained"]
        assert trained["status"] == "ok" and len(trained["zeroed"]) == dropouts
        assert all(abs(z - train_dropout.P) < 0.01 for z in trained["zeroed"])
        assert results[site, "no_rng"]["status"] == "ok" and max(results[site, "no_rng"]["zeroed"]) < 0.01
        assert results[site, "rand4x"]["status"] == "skipped"  # Inductor's Triton kernels are the GPU's
    # the masks drawn apart and read by the norm: three dropouts at p (on CPU eager: the maths, not the kernels)
    apart = results["norm", "masks_apart"]
    assert apart["status"] == "ok" and len(apart["zeroed"]) == 3
    assert all(abs(z - train_dropout.P) < 0.01 for z in apart["zeroed"])
    assert results["mlp", "masks_apart"]["status"] == "not_applicable"


def test_a_dropout_that_keeps_every_value_is_refused():
    source = torch.randn(4096)
    with pytest.raises(AssertionError, match="zeroed, not p"):
        train_dropout.check_dropout([source, source / (1 - train_dropout.P)], "as_trained")


def test_an_unknown_arm_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_dropout.py"), "--out",
                          str(tmp_path / "x.json"), "--device", "cpu", "--arms", "as_trained,rand8x"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2 and not (tmp_path / "x.json").exists()
    assert run.stderr.strip().splitlines()[-1].endswith("unknown sites or arms rand8x: sites mlp, norm; arms "
                                                        "as_trained, rand4x, no_rng, masks_apart")


def test_the_four_number_form_is_philox_s_four_lanes_in_offset_order(triton_interpreter):  # noqa: F811
    """birbal_rand4x: element i is lane i % 4 of Philox's four numbers at counter i // 4 (all four used, none
    discarded), the same stream whatever the block size, and uniform on [0, 1)."""
    import triton
    import triton.language as tl

    @triton.jit
    def four(out, seed, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offsets, train_dropout.birbal_rand4x(seed + offsets * 0, offsets, BLOCK))

    @triton.jit
    def lanes(out, seed, QUARTER: tl.constexpr):
        counters = tl.program_id(0) * QUARTER + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = tl.rand4x(seed, counters.to(tl.uint32))
        for lane, r in ((0, r0), (1, r1), (2, r2), (3, r3)):
            tl.store(out + 4 * counters + lane, r)

    n, seed = 256, 1234
    reference = torch.empty(n)
    lanes[(n // 64,)](reference, seed, 16)
    by_block = {}
    for block in (16, 64):
        out = torch.empty(n)
        four[(n // block,)](out, seed, block)
        by_block[block] = out
    torch.testing.assert_close(by_block[16], reference, rtol=0, atol=0)
    torch.testing.assert_close(by_block[64], reference, rtol=0, atol=0)
    assert reference.min() >= 0 and reference.max() < 1 and abs(reference.mean().item() - 0.5) < 0.06
    assert reference.unique().numel() == n  # four distinct numbers a counter: no lane repeated
