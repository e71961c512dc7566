"""birbal.serve's Triton kernels compile for the GPUs they serve on, checked here without one: every launch the
served 7B step makes (birbal.serve.gemv's products at their block shapes, over one input and over two, and
down_proj's with its activation made in the kernel,
birbal.serve.flash_decode's attention, two kernels and folded, at
each cache length and dtype), compiled by Triton's own compiler and bundled ptxas for sm_90 (H100/H200) and sm_89
(RTX 4090) (tests/triton_aot.py), then each cubin's resources against the card's limits; and the custom ops as
torch.compile traces them. What only a GPU can show (speed, the compiled maths) is the GPU tests'; a kernel that
does not compile for a 4090, spills, or would make Inductor copy an input every step fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from triton_interpreter import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="Triton is not installed (requirements: the dev extra)")
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_89": 99 * 1024}  # the most shared memory a block may opt in to


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "triton_aot.py")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_served_launch_compiles_for_an_h200_and_an_rtx_4090(report):
    kernels = report["kernels"]
    from birbal.serve import gemv

    lora = [k for _n, k in gemv.BLOCK_SHAPES if k not in (4096, 14336)]  # the [W, B] products, also as gemv2
    assert len(lora) == 4
    gate_up = [k for n, k in gemv.BLOCK_SHAPES if n == 28672]  # gate/up's, also as gemv_act / gemv2_act
    assert len(gate_up) == 2
    assert sum(" | _gemv_kernel | " in name for name in kernels) == 2 * (len(gemv.BLOCK_SHAPES) + len(lora)
                                                                          + len(gate_up))
    # archs x lengths x dtypes x (two kernels, folded), each with its scale typed as Triton's launcher and as
    # Inductor's types it
    assert sum(" | _decode_attention_split | " in name for name in kernels) == 2 * 3 * 3 * 2 * 2
    assert sum(" | _decode_attention_split | floats fp64 (Inductor) | " in name for name in kernels) == 2 * 3 * 3 * 2
    assert sum(name.startswith("decode_attention folded ") for name in kernels) == 2 * 3 * 3 * 2  # no reduce kernel
    failed = {name: row["error"] for name, row in kernels.items() if "error" in row}
    assert not failed, failed


def test_served_launches_fit_the_cards_without_spilling(report):
    """No local memory or stack (register spills) in any launch of the served dtypes (bf16, fp16), at most 255
    registers a thread, shared memory within the card's limit. fp32 (the CPU tests' and one GPU test's dtype, not
    served) may spill: its IEEE dot products need more registers. The shared memory is what a launch requests
    (Triton's dynamic allocation with the cubin's static): the split attention kernel stages its K and V blocks
    there, so a report of the static part alone (0 on sm_89) would show as a split kernel with none."""
    for name, row in report["kernels"].items():
        if " | _decode_attention_split | " in name:
            assert row["dynamic_shared"] >= 16 * 1024, (name, row)  # one 64-key block of K at head_dim 128 in bf16
        arch = name.rsplit(" | ", 1)[1]
        assert row["reg"] <= 255 and row["shared"] <= SHARED_LIMIT[arch], (name, row)
        if " fp32 " not in name:
            assert row["local"] == 0 and row["stack"] == 0, (name, row)


@pytest.fixture(scope="module")
def traced() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "triton_aot.py"), "--trace"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_ops_compile_into_their_kernels_writing_only_their_own_buffers(traced):
    """torch.compile's graph of the served step's custom ops (tests/triton_aot.py --trace): each op becomes its
    kernels and nothing else (no copy, clone or concatenation once Inductor reinplaced), and each kernel writes only
    the buffers its op allocates, so Inductor clones no input (a kernel that wrote its input would cost a copy of it
    every step); the folded attention's one exception, its counters, is a declared mutation of its argument (one
    input written), which Inductor writes in place: nothing cloned, no copy. With the cache length dynamic
    (`decode_compile_lengths: one`) the attention keeps its 32 slices and the length stays symbolic: one graph for
    every length."""
    for name in ("static", "dynamic cache length"):
        row = traced[name]
        assert "error" not in row, row
        assert [call["written"] for call in row["kernel_calls"]] == [
            ["acc_ptr", "ml_ptr"], ["out_ptr"], ["acc_ptr", "ml_ptr", "out_ptr", "count_ptr"],  # two kernels, folded
            ["y_ptr"], ["y_ptr"], ["y_ptr"]]
        assert all(call["cloned"] == [] for call in row["kernel_calls"]) and row["inputs_written"] == 1
        assert row["kernel_calls"][0]["grid"] == row["kernel_calls"][2]["grid"] == "(8, 32, 1)" and row["copies"] == 0
    assert traced["static"]["slots"] == ["2048"] * 2 and traced["static"]["chunk"] == ["64"] * 2
    assert not traced["dynamic cache length"]["slots"][0].isdigit()  # a graph input, not a baked length
