"""`serve.decode_gemv: triton` (birbal.serve.gemv): the hand-written GEMV against an fp64 product on CUDA (eager,
compiled and in a CUDA graph), its block-shape table against the shapes birbal-4090's step runs, and its fallback
where there is no CUDA device (the products stay F.linear, and the report says so)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import REPO
from serve_model import engine, merged_folder, serve_cfg
from test_serve_upstream import adapter_folder
from triton_interpreter import triton_interpreter  # noqa: F401  (a fixture)

from birbal.config import load_recipe
from birbal.serve import gemv
from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _step_shapes(arch: dict, rank: int) -> set[tuple[int, int]]:
    """(N, K) of every one-row product a decode step runs outside LoRA A: unmerged under decode_fuse lora (each
    base matrix with its B columns: K grows by the ranks of the group) and merged under projections."""
    d, ffn, vocab = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    kv = d // arch["num_attention_heads"] * arch["num_key_value_heads"]
    merged = {(d + 2 * kv, d), (d, d), (2 * ffn, d), (d, ffn)}
    lora = {(d + 2 * kv, d + 3 * rank), (d, d + rank), (2 * ffn, d + 2 * rank), (d, ffn + rank)}
    return merged | lora | {(vocab, d)}


def test_block_shapes_cover_every_product_of_birbal_4090s_step():
    """The measured block shapes are keyed by the products the 7B step really runs (its config.json shape and
    birbal-4090's rank): a change of rank or fusion that moved them would leave the step on the default shape."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from shapes import MISTRAL_7B

    wanted = _step_shapes(MISTRAL_7B, load_recipe("birbal-4090").lora.r)
    assert wanted == set(gemv.BLOCK_SHAPES), wanted ^ set(gemv.BLOCK_SHAPES)
    for bn, bk, warps, stages in [*gemv.BLOCK_SHAPES.values(), gemv.DEFAULT_BLOCK_SHAPE]:
        assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0 and bk >= 32 * warps and stages >= 1


def test_applies_only_to_one_cuda_row_against_a_dense_weight():
    w = torch.randn(8, 16)
    assert not gemv.applies(torch.randn(1, 16), w)  # not CUDA
    if torch.cuda.is_available():
        wc = w.cuda()
        assert gemv.applies(torch.randn(1, 1, 16, device="cuda"), wc)
        assert not gemv.applies(torch.randn(2, 16, device="cuda"), wc)  # two rows: a GEMM
        assert not gemv.applies(torch.randn(1, 16, device="cuda", dtype=torch.bfloat16), wc)  # dtypes differ
        assert not gemv.applies(torch.randn(1, 16, device="cuda"), torch.randn(16, 8, device="cuda").t())  # strided


def _request(prompt: str, n: int) -> ProcessRequest:
    return ProcessRequest(prompt=prompt, temperature=1e-7, max_new_tokens=n, top_k_per_token=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_without_cuda_the_products_stay_f_linear_and_the_report_says_so(kind):
    """On a CPU (the smoke profile's server inherits birbal-4090's decode_gemv and decode_gemv_glu) the kernel is
    not used: the engine's report names the fallback, lm_head keeps its own forward, and the answers are lora_a's
    exactly (lora_a has no activation form: decode_gemv_glu off there)."""
    def make(decode_gemv):
        cfg = serve_cfg(postprocess="none", request_policy="kit", decode="static", decode_fuse="lora"
                        if kind == "adapter" else "projections", decode_gemv=decode_gemv,
                        decode_gemv_glu=decode_gemv == "triton")
        if kind == "merged":
            return Engine.from_merged(merged_folder(), cfg)
        return Engine.from_adapter(str(merged_folder()), adapter_folder(), engine().tokenizer, cfg)

    fast, ref = make("triton"), make("lora_a")
    assert fast.fused["gemv"] == "triton"
    assert fast.fused["gemv_kernel"] == "F.linear: the model is not on a CUDA device"
    assert "lm_head" not in fast.fused
    from birbal.models import unwrap_peft

    assert "forward" not in vars(unwrap_peft(fast.model).lm_head)
    for prompt, n in [("The capital of France is", 6), ("one two three " * 5, 4)]:
        a, b = fast.process(_request(prompt, n)), ref.process(_request(prompt, n))
        assert a.text == b.text and [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]


def _rel_error(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    ref = w.double() @ x.double().reshape(-1)
    return float((out.double().reshape(-1) - ref).norm() / ref.norm())


# (N, K): the 7B step's awkward ones (K not a multiple of the block, 4,096-row outputs), a lm_head, and small odd
# ones that leave rows and columns of the last block empty
SHAPES = [(4096, 4224), (6144, 4480), (32000, 4096), (7, 17), (129, 1000), (1, 4096), (300, 64)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_equals_the_fp64_product_on_cuda_eager_compiled_and_in_a_graph(dtype):
    """Every output element written (the output poisoned with NaN first: an unwritten row fails), within the
    dtype's rounding of the fp64 product on fresh random data, eagerly, compiled (fullgraph: the op traced as one
    kernel) and replayed in a CUDA graph; and no further off than F.linear itself."""
    assert gemv.available() is None
    for n, k in SHAPES:
        torch._dynamo.reset()  # a compile per shape: 21 shapes and dtypes are past Dynamo's recompile limit
        compiled = torch.compile(lambda x, w: torch.ops.birbal.gemv(x, w), fullgraph=True, dynamic=False)
        torch.manual_seed(n * 31 + k)
        w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype)
        x = torch.randn(1, 1, k, device="cuda").to(dtype)
        base = _rel_error(torch.nn.functional.linear(x, w), x, w)
        eager = gemv.gemv(x, w)
        assert eager.shape == (1, 1, n) and eager.dtype == dtype
        assert _rel_error(eager, x, w) <= max(TOL[dtype], 2 * base), (n, k, _rel_error(eager, x, w), base)
        assert torch.equal(compiled(x, w), eager)  # the same kernel, the same block shape: the same bits
        out = torch.full((1, 1, n), float("nan"), device="cuda", dtype=dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out.copy_(gemv.gemv(x, w))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(gemv.gemv(x, w))
        x.copy_(torch.randn_like(x))  # a new input: the replay must read it
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert _rel_error(out, x, w) <= max(TOL[dtype], 2 * _rel_error(torch.nn.functional.linear(x, w), x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k", "shape"), [(40, 300, (16, 128, 4, 1)), (64, 512, (8, 256, 4, 3)),
                                               (6, 4096, gemv.DEFAULT_BLOCK_SHAPE)])
def test_the_kernel_equals_an_fp64_product_through_the_interpreter(triton_interpreter, n, k, shape, dtype):  # noqa: F811
    """`gemv.launch`, the kernel and launch the served step and benchmarks/gemv_kernels.py run, on CPU through
    Triton's interpreter: rows past N and a K that is no multiple of the block (masked loads), and an even K,
    within the output's rounding (a unit in its last place) plus fp32 accumulation's worst case (K units of fp32
    roundoff times the sum of the products' magnitudes) of an fp64 product. A wrong index is off by O(1)."""
    gen = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(1, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    out = torch.full((1, n), float("nan"), dtype=dtype)
    gemv.launch(x, w, out, shape)
    exact = x.double() @ w.double().t()
    bound = torch.finfo(dtype).eps * exact.abs() + k * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((out.double() - exact).abs() <= bound).all(), (out.double() - exact).abs().max()


def test_the_registered_op_is_the_launch_through_the_interpreter(triton_interpreter):  # noqa: F811
    """`torch.ops.birbal.gemv`, the custom op the served step calls (its output's allocation, the kernel through
    `wrap_triton` at the block shape it picks), run eagerly on CPU: the bare launch's output exactly."""
    gemv._register()
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 1000, generator=gen).bfloat16(), torch.randn(40, 1000, generator=gen).bfloat16()
    out = torch.empty(1, 1, 40, dtype=torch.bfloat16)
    gemv.launch(x, w, out, gemv.block_shape(40, 1000))
    assert torch.equal(gemv.gemv(x, w), out)


@pytest.mark.parametrize(("k1", "k2", "shape"), [(1024, 384, (16, 512, 8, 3)), (512, 128, (4, 512, 4, 1)),
                                                 (300, 40, (8, 128, 4, 1))])
def test_two_inputs_are_the_product_over_their_concatenation(triton_interpreter, k1, k2, shape):  # noqa: F811
    """`gemv.launch(..., x2=)`, decode_fuse lora's [x, scaling * A x] read in place: where x's length is a
    multiple of the K step (every product of the 7B step) the very products, in the same order, as over the
    concatenated row, so bitwise equal; otherwise within fp32 accumulation of them (a misplaced column is off by
    O(1)). Through Triton's interpreter, and through the registered op."""
    gen = torch.Generator().manual_seed(k1 + k2)
    x, x2 = torch.randn(1, 1, k1, generator=gen).bfloat16(), torch.randn(1, 1, k2, generator=gen).bfloat16()
    w = torch.randn(40, k1 + k2, generator=gen).bfloat16()
    two, cat = (torch.full((1, 1, 40), float("nan"), dtype=torch.bfloat16) for _ in range(2))
    gemv.launch(x, w, two, shape, x2=x2)
    gemv.launch(torch.cat([x, x2], -1), w, cat, shape)
    if k1 % shape[1] == 0:
        assert torch.equal(two, cat)
    exact = torch.cat([x, x2], -1).double() @ w.double().t()
    bound = 2 * torch.finfo(torch.bfloat16).eps * exact.abs() + (k1 + k2) * 2.0**-24 * (
        torch.cat([x, x2], -1).double().abs() @ w.double().abs().t())
    assert ((two.double() - exact).abs() <= bound).all()
    gemv._register()  # the op launches at the shape's block shape from the table
    gemv.launch(x, w, two, gemv.block_shape(40, k1 + k2), x2=x2)
    assert torch.equal(torch.ops.birbal.gemv2(x, x2, w), two)


def test_applies2_needs_both_rows_to_fill_the_weight():
    w = torch.randn(8, 24)
    assert not gemv.applies2(torch.randn(1, 16), torch.randn(1, 8), w)  # not CUDA
    if torch.cuda.is_available():
        wc, row = w.cuda(), (lambda n: torch.randn(1, n, device="cuda"))
        assert gemv.applies2(row(16), row(8), wc)
        assert not gemv.applies2(row(16), row(4), wc)  # 20 columns of 24
        assert not gemv.applies(row(16), wc)  # one row of 16 against 24 columns: not this product


@pytest.mark.parametrize(("tail", "n", "dtype"), [(0, 40, torch.bfloat16), (40, 40, torch.bfloat16),
                                                  (40, 36, torch.float32), (0, 4, torch.float32)])
def test_the_gate_up_kernel_writes_the_activation_of_its_stored_product(triton_interpreter, tail, n, dtype):  # noqa: F811
    """`gemv.launch(..., act=True)` (serve.decode_gemv_glu): the fused gate/up product's kernel writes silu(gate) *
    up. Its gate and up are the plain kernel's product over the same rows (the same sums), so the activation is
    torch's of that stored product (gate * sigmoid(gate) * up in fp32, rounded once) to the units where torch's and
    NumPy's sigmoid round apart; a wrong pairing of gate and up rows, or no SiLU, is off by O(1).
    `tail`: then a second input (decode_fuse lora's scaling * A x); `n` activations, the last program's rows partly
    past the end for 36 and 4 (8 a program). Those two in fp32: in bf16 the interpreter's product over a partly
    masked tile rounds apart from the same rows' unmasked product (its plain kernel at 16 and at 8 rows a program
    differ by a unit for the same rows), which a GPU's per-row sums cannot."""
    gen = torch.Generator().manual_seed(7 + tail + n)
    k1, shape = 1024, (16, 256, 4, 1)
    x = torch.randn(1, 1, k1, generator=gen).to(dtype)
    x2 = torch.randn(1, 1, tail, generator=gen).to(dtype) if tail else None
    w = (torch.randn(2 * n, k1 + tail, generator=gen) / 8).to(dtype)
    product = torch.full((1, 1, 2 * n), float("nan"), dtype=dtype)
    gemv.launch(x, w, product, shape, x2=x2)
    gate, up = product.float().chunk(2, dim=-1)
    want = (gate * torch.sigmoid(gate) * up).to(dtype)
    made = torch.full((1, 1, n), float("nan"), dtype=dtype)
    gemv.launch(x, w, made, shape, x2=x2, act=True)
    # one unit in bf16 (the last rounding); in fp32 the sigmoid's own rounding shows through (a few units)
    one_unit = (1 if dtype == torch.bfloat16 else 4) * torch.finfo(dtype).eps * want.double().abs() + 1e-30
    assert ((made.double() - want.double()).abs() <= one_unit).all(), (made - want).abs().max()
    assert (made == want).float().mean() > (0.9 if dtype == torch.bfloat16 else 0.75)  # apart rarely, not as a rule
    swapped = (up * torch.sigmoid(up) * gate).to(dtype)  # gate and up rows paired the wrong way round
    no_silu = (gate * up).to(dtype)
    for wrong in (swapped, no_silu):
        assert ((made.double() - wrong.double()).abs() > one_unit).any()  # the check can fail
    gemv._register()
    gemv.launch(x, w, made, gemv.block_shape(2 * n, k1 + tail), x2=x2, act=True)
    assert torch.equal(gemv.gemv_act(x, w, x2), made)


def test_applies_act_needs_gate_and_up_rows():
    w = torch.randn(8, 24)
    assert not gemv.applies_act(torch.randn(1, 24), w)  # not CUDA
    if torch.cuda.is_available():
        def row(k):
            return torch.randn(1, k, device="cuda")
        assert gemv.applies_act(row(24), w.cuda()) and gemv.applies_act(row(16), w.cuda(), row(8))
        assert not gemv.applies_act(row(24), torch.randn(7, 24, device="cuda"))  # odd rows: no gate/up halves
