"""Run this project's Triton kernels on the CPU, through Triton's interpreter (`TRITON_INTERPRET=1`).

The interpreter runs a kernel's program with NumPy, one program at a time: slow, but the same program, so a test
here checks a kernel's maths (indices, masks, the online softmax, the split and its reduction) without a GPU. The
GPU tests check the compiled kernels.

Two of its operations are wrong for bfloat16, which NumPy lacks and the interpreter keeps as raw uint16 bits
(seen in Triton 3.6.0, the images' pin, and 3.9.0): `tl.dot` multiplies the raw bits as integers, and a cast from
fp32 to bf16 truncates instead of rounding to nearest even. The `triton_interpreter` fixture replaces those two with torch's own
conversions: bf16 operands of a dot widened to fp32 first (exact, and every product of two bf16 is exact in fp32,
so this is the tensor cores' bf16 dot with fp32 accumulation up to summation order), and the cast rounded as the
GPU rounds it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16).float().numpy()


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).bfloat16().view(torch.int16).numpy() \
        .view(np.uint16)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Triton's interpreter, with its two bfloat16 operations fixed (above). The interpreter is chosen when Triton
    is first imported, so tests/conftest.py sets TRITON_INTERPRET=1 before anything imports it, on a machine
    without CUDA; on one with CUDA the GPU tests run the compiled kernels instead and these are skipped."""
    if not has_triton():
        pytest.skip("Triton is not installed (requirements: the dev extra)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a CUDA machine: the GPU tests run the compiled kernels)")
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast, fp_to_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar == tl.bfloat16:
                return interpreter.TensorHandle(_bf16_bits_to_fp32(x.data), tl.float32)
            return x
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def by_torch(src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), tl.bfloat16)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:
            return interpreter.TensorHandle(_bf16_bits_to_fp32(src.data), tl.float32)
        return None

    def cast_impl(self, src, dst_type):
        return by_torch(src, dst_type) or cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        return by_torch(src, dst_type) or fp_to_fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    monkeypatch.setattr(builder, "create_fp_to_fp", create_fp_to_fp)


def interpret_on_cpu() -> None:
    """Called by tests/conftest.py at its import: on a machine without CUDA, before Triton is imported."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
