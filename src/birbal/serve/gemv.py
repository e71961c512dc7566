"""`serve.decode_gemv: triton`: a decode step's matrix-vector products (one row of input) as one Triton kernel each.

At batch 1 every product of a decode step is a GEMV: it streams its weight once and does two FLOPs a weight, so
its time is its weight's bytes over memory bandwidth. cuBLAS picks GEMM tiles for these (nvjet 128x8 or 64x8 tiles
along N), and for the 4,096-row outputs (o_proj, down_proj) a split-K kernel plus a reduce kernel; measured on an
H200 at the Mistral-7B shapes it reads 2.5-4.2 TB/s, against this kernel's 3.0-4.3 (`benchmarks/gemv_kernels.py`,
`benchmarks/results/gemv_kernels_h200_2026-12-01.json`: a step's base products 4,239 -> 3,760 us unmerged, 3,830
-> 3,611 merged). Inductor's own reduction for them (`decode_gemv: all`) reads 2.5-3.3 TB/s, and cuBLAS offers
no block shapes to choose through `F.linear`: hence this kernel, written by hand.

The kernel: a program owns BLOCK_N output rows and walks K in BLOCK_K steps, each step one coalesced load of a
BLOCK_N x BLOCK_K tile of the weight and BLOCK_K of the input, multiplied in fp32 into a BLOCK_N x BLOCK_K fp32
accumulator that is summed across K once at the end; the output rounded to the input's dtype. The same dot products
as `F.linear`, accumulated in fp32 in another order: float rounding only (tests/test_serve_gemv.py against fp64;
tests/test_serve_fused.py the served step against the eager model, on CUDA).

Block shapes: the fastest of `benchmarks/gemv_kernels.py --quick`'s sweep on the H200 for each shape the 7B step
runs (BLOCK_SHAPES); any other shape gets the one shape within 7% of the best on all of them. They are not tuned
for an RTX 4090: `python3 benchmarks/gemv_kernels.py --out gemv.json` there says whether they should be.

Two inputs (`gemv2`, `launch(..., x2=)`; `serve.decode_gemv_split_input`, off until measured on a GPU):
`serve.decode_fuse: lora` multiplies [W, B] by [x, scaling * A x]; the kernel reads x and then the scaled LoRA
term from where they are, so the concatenated row is never written (one
copy kernel fewer a product in the compiled step, where Inductor cannot write x into the concatenation's buffer,
e.g. o_proj's input, the attention's output). Where x's length is a multiple of the K step (every product of the
7B step) its columns fall in the same lanes of the same blocks as over the concatenation: the same products summed
in the same order, bitwise (tests/test_serve_gemv.py, through Triton's interpreter).

The MLP's activation (`gemv_act`, `gemv2_act`, `launch(..., act=True)`; `serve.decode_gemv_glu`): the fused
gate/up product's kernel writes silu(gate) * up instead of gate and up. A program owns BLOCK_N / 2 rows of gate
and the same rows of up (the fused matrix's rows i and intermediate + i), so both of an activation's inputs end in
one program's accumulator; each is rounded to the dtype as the stored product would be, then the activation is made
in Inductor's order (gate * sigmoid(gate), then * up, in fp32) and rounded once, as the step's own kernel makes it
from the stored product. One kernel a layer fewer, and the 2 x 14,336 product is never written. (The tenth
session's form of this switch made the activation in down_proj's kernel, from the stored product: each of its
programs then loaded both 14,336-long halves and made every SiLU again, and the step was slower, eleventh session.)

Registered as a torch custom op (`torch.library.triton_op`), so that torch.compile traces it as one kernel of the
compiled graph and a CUDA graph captures it like any other. Triton is imported only on a CUDA machine (the serving
image pins it beside torch); elsewhere `available()` says why not and the products stay `F.linear`.
"""

from __future__ import annotations

import functools

import torch

OP = "birbal::gemv"
OP2 = "birbal::gemv2"  # the product over two inputs, one after the other (decode_fuse lora's [x, scaling * A x])
OP_ACT, OP2_ACT = "birbal::gemv_act", "birbal::gemv2_act"  # the fused gate/up product written as silu(gate) * up
# (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages): the H200 sweep's fastest for the Mistral-7B step's products
# (gemv_kernels_h200_2026-12-01.json; "+B": decode_fuse lora's [W, B] matrices, K = 4096 + the ranks)
BLOCK_SHAPES = {
    (6144, 4480): (16, 512, 8, 3), (4096, 4224): (4, 512, 4, 1), (28672, 4352): (16, 256, 4, 1),
    (4096, 14464): (8, 512, 8, 3), (32000, 4096): (4, 1024, 8, 3),
    (6144, 4096): (8, 512, 4, 3), (4096, 4096): (4, 512, 4, 3), (28672, 4096): (16, 256, 4, 1),
    (4096, 14336): (4, 512, 8, 1),
}
DEFAULT_BLOCK_SHAPE = (16, 512, 8, 3)  # within 1.07x of each shape's best above


def block_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return BLOCK_SHAPES.get((n, k), DEFAULT_BLOCK_SHAPE)


def triton_missing(register) -> str | None:
    """None where birbal.serve's Triton kernels can run (a CUDA device, Triton, torch.library.triton_op), having
    called `register` (the module's ops), else why not. Both this module's and birbal.serve.flash_decode's
    `available()`."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton  # noqa: F401
        from torch.library import triton_op  # noqa: F401  (torch >= 2.6)
    except ImportError as exc:
        return f"triton or torch.library.triton_op is not importable ({exc})"
    register()
    return None


@functools.cache
def available() -> str | None:
    """None when the kernel can run here (CUDA and Triton; the ops registered), else why not."""
    return triton_missing(_register)


@functools.cache
def kernel():
    """The Triton kernel (compiled per block shape and dtype at its first launch)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, x2_ptr, w_ptr, y_ptr, N, K, K1, stride_w, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TWO: tl.constexpr, ACT: tl.constexpr):
        # the input is x (K1 values), then for TWO x2 (K - K1 values): the product over their concatenation. For
        # ACT the weight has 2N rows (gate's N, then up's N) and the output is silu(gate) * up, N values: a program
        # owns BLOCK_N / 2 rows of each half
        if ACT:
            HALF: tl.constexpr = BLOCK_N // 2
            j = tl.arange(0, BLOCK_N)
            out_rows = tl.program_id(0) * HALF + j % HALF
            rows = out_rows + (j // HALF) * N  # gate's rows first, then up's same rows
            row_ok = out_rows < N
        else:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_row = w_ptr + rows[:, None].to(tl.int64) * stride_w
        w_ptrs = w_row + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, tl.cdiv(K1, BLOCK_K)):
            if EVEN_K:  # K1 a multiple of BLOCK_K
                xv = tl.load(x_ptr + k * BLOCK_K + cols)
                wv = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                k_ok = k * BLOCK_K + cols < K1
                xv = tl.load(x_ptr + k * BLOCK_K + cols, mask=k_ok, other=0.0)
                wv = tl.load(w_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc += wv.to(tl.float32) * xv.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        if TWO:
            w_ptrs = w_row + K1 + cols[None, :]
            for k in range(0, tl.cdiv(K - K1, BLOCK_K)):
                k_ok = k * BLOCK_K + cols < K - K1
                xv = tl.load(x2_ptr + k * BLOCK_K + cols, mask=k_ok, other=0.0)
                wv = tl.load(w_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                acc += wv.to(tl.float32) * xv.to(tl.float32)[None, :]
                w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)  # the product as it would be stored
        if ACT:
            # (gate | up) -> (2, HALF) -> (HALF, 2) -> gate, up: element i of each is output row i
            gate, up = tl.split(tl.trans(tl.reshape(y.to(tl.float32), (2, HALF))))
            out = tl.program_id(0) * HALF + tl.arange(0, HALF)
            tl.store(y_ptr + out, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty), mask=out < N)
        else:
            tl.store(y_ptr + rows, y, mask=row_ok)

    return _gemv_kernel


def launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, shape: tuple[int, int, int, int],
           wrap=None, x2: torch.Tensor | None = None, act: bool = False) -> None:
    """`out` = the product of one contiguous row `x` and `weight` (N, K) at block shape `shape`, or with `x2` of
    `x` followed by `x2` (K = their lengths together), without concatenating them; with `act`, silu(gate) * up of
    that product's halves (`out` N / 2 values: the gate/up product's activation). `wrap`: torch.library.wrap_triton
    inside the custom op (benchmarks/gemv_kernels.py launches it bare, per shape)."""
    import triton

    bn, bk, warps, stages = shape
    n, k = weight.shape
    k1 = x.shape[-1]
    if act:
        n //= 2
    run = kernel() if wrap is None else wrap(kernel())
    run[(triton.cdiv(n, bn // 2 if act else bn),)](
        x, x if x2 is None else x2, weight, out, n, k, k1, weight.stride(0), BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=k1 % bk == 0, TWO=x2 is not None, ACT=act, num_warps=warps, num_stages=stages)


def _register() -> None:
    from torch.library import triton_op, wrap_triton

    def run(x, weight, x2=None, act=False):
        n, k = weight.shape
        out = x.new_empty((*x.shape[:-1], n // 2 if act else n))
        launch(x, weight, out, block_shape(n, k), wrap=wrap_triton, x2=x2, act=act)
        return out

    @triton_op(OP, mutates_args={})
    def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight)` for an `x` of one row (any leading dims of size 1), both contiguous."""
        return run(x, weight)

    @triton_op(OP2, mutates_args={})
    def gemv2(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`F.linear(torch.cat([x, x2], -1), weight)` for one row each, contiguous, without the concatenation."""
        return run(x, weight, x2=x2)

    @triton_op(OP_ACT, mutates_args={})
    def gemv_act(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of `F.linear(x, weight).chunk(2, -1)` (gate, up), the product itself not written."""
        return run(x, weight, act=True)

    @triton_op(OP2_ACT, mutates_args={})
    def gemv2_act(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of `F.linear(torch.cat([x, x2], -1), weight).chunk(2, -1)`, neither the concatenation
        nor the product written."""
        return run(x, weight, x2=x2, act=True)


def _row_against(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One CUDA row, and a dense row-major weight of its dtype on its device."""
    return (x.is_cuda and x.numel() == x.shape[-1] and x.dtype == weight.dtype and x.device == weight.device
            and weight.dim() == 2 and weight.stride(1) == 1 and weight.is_floating_point())


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv(x, weight)` computes `F.linear(x, weight)` here: one CUDA row, a dense row-major weight of
    the same dtype on the same device, as wide as the row."""
    return _row_against(x, weight) and x.shape[-1] == weight.shape[-1]


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's product; call only where `available()` is None and `applies(x, weight)`."""
    return torch.ops.birbal.gemv(x.contiguous(), weight)


def applies2(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv2(x, x2, weight)` computes `F.linear(torch.cat([x, x2], -1), weight)` here."""
    return (_row_against(x, weight) and _row_against(x2, weight)
            and x.shape[-1] + x2.shape[-1] == weight.shape[-1])


def gemv2(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's product over `x` then `x2`; call only where `available()` is None and `applies2(...)`."""
    return torch.ops.birbal.gemv2(x.contiguous(), x2.contiguous(), weight)


def applies_act(x: torch.Tensor, weight: torch.Tensor, x2: torch.Tensor | None = None) -> bool:
    """Whether `gemv_act(x, weight, x2)` computes silu(gate) * up of the gate/up product here (`weight` an even
    number of rows: gate's, then up's)."""
    fits = applies(x, weight) if x2 is None else applies2(x, x2, weight)
    return fits and weight.shape[0] % 2 == 0


def gemv_act(x: torch.Tensor, weight: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's silu(gate) * up of the gate/up product over `x` (then `x2`); call only where `available()` is
    None and `applies_act(...)`."""
    if x2 is None:
        return torch.ops.birbal.gemv_act(x.contiguous(), weight)
    return torch.ops.birbal.gemv2_act(x.contiguous(), x2.contiguous(), weight)
