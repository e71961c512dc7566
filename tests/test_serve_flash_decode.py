"""`serve.decode_attention: triton` (birbal.serve.flash_decode): the split-KV decode attention kernels.

On CPU the kernels run through Triton's interpreter (tests/triton_interpreter.py): the same programs, so their
maths (the slices, the online softmax, the skipped blocks, the reduction) is checked against an fp64 attention and
against `grouped`, which serves today, and the folded kernel (the reduction in the split kernel) against the two
bit for bit, its counters left zero. On CUDA the compiled kernels are checked the same way, eager, under
torch.compile and replayed in a CUDA graph, and the served step against the eager model (tests/test_serve_fused.py).
Without CUDA the engine serves `grouped` and says why.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO
from serve_model import merged_folder, serve_cfg
from triton_interpreter import triton_interpreter  # noqa: F401  (a fixture)

from birbal.serve import attention, flash_decode
from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(batch, heads, kv_heads, slots, dim, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)  # the model's own layout
    k, v = (torch.randn(batch, kv_heads, slots, dim, generator=gen).to(dtype) for _ in range(2))
    return q.to(device), k.to(device), v.to(device)


def _fp64(q, k, v, mask, scale):
    """The attention, in fp64, with the KV heads expanded: the definition the kernels are checked against."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ kk.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(1, 2)  # (batch, 1, heads, dim)


def _grouped(q, k, v, mask, scale):
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True, training=False)
    return attention.grouped_decode_attention(module, q, k, v, mask, scaling=scale)[0]


def _launched(q, k, v, mask, scale, arrivals=None):
    """The bare launch (`arrivals`: the folded kernel's counters, else the two kernels), into NaN: a program that
    writes no output leaves it NaN."""
    out = torch.full((q.shape[0], 1, q.shape[1], q.shape[3]), float("nan"), dtype=q.dtype, device=q.device)
    flash_decode.launch(q, k, v, mask, scale, out, arrivals)
    return out


# (batch, heads, kv heads, slots, dim, the slots each batch row may attend, TARGET_PROGRAMS or None for the served
# one): the 7B shape at a 1,024-slot cache as served (one block a slice, the slices past the fill and past the
# cache empty); four rows in one slice each, so one program walks all 16 blocks (the online softmax's rescaling
# across blocks); two rows with their own masks in slices of two blocks, the last one short; 128 rows of one block
# each (each row's one partial, beside an empty slice); a slice with nothing to attend and a cache that is no
# multiple of the block; one KV head per query head; a sliding window's hole
TARGET_SERVED = flash_decode.TARGET_PROGRAMS
CASES = {
    "7b-shape": (1, 32, 8, 1024, 128, [range(0, 600)], None),
    "long-slices": (4, 16, 8, 1024, 64, [range(0, 1000), range(0, 300), range(500, 1024), range(0, 1)], 32),
    "two-rows": (2, 8, 2, 192, 64, [range(0, 150), range(0, 40)], 8),
    "one-slice": (16, 8, 8, 64, 16, [range(0, 1 + 4 * row) for row in range(16)], None),
    "ragged": (1, 8, 2, 200, 32, [range(0, 7)], None),
    "one-group": (1, 4, 4, 96, 16, [range(0, 60)], None),
    "window": (1, 8, 2, 256, 64, [range(90, 230)], None),
}


def _mask(batch, slots, allowed, device="cpu"):
    mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool)
    for row, span in enumerate(allowed):
        mask[row, ..., span.start:span.stop] = True
    return mask.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_equal_fp64_attention_through_the_interpreter(triton_interpreter, monkeypatch, case, dtype):  # noqa: F811
    """The kernels' output against fp64 attention within the dtype's rounding, no further off than `grouped`'s
    (twice its error, or the tolerance), and much nearer it than to the attention over every slot."""
    batch, heads, kv_heads, slots, dim, allowed, target = CASES[case]
    if target is not None:  # the case's own split, whatever the served TARGET_PROGRAMS is
        monkeypatch.setattr(flash_decode, "TARGET_PROGRAMS", target)
    q, k, v = _inputs(batch, heads, kv_heads, slots, dim, dtype)
    mask, scale = _mask(batch, slots, allowed), dim**-0.5
    ours, exact, grouped = _launched(q, k, v, mask, scale), _fp64(q, k, v, mask, scale), _grouped(q, k, v, mask, scale)
    assert ours.shape == grouped.shape == (batch, 1, heads, dim) and ours.dtype == dtype
    error = (ours.double() - exact).abs().max().item()
    assert error <= max(2 * (grouped.double() - exact).abs().max().item(), TOL[dtype]), error
    everything = _fp64(q, k, v, torch.ones_like(mask), scale)  # the mask ignored: the check can fail
    assert error < 0.5 * (everything - exact).abs().max().item()


@pytest.fixture
def poisoned_partials(monkeypatch):
    """Every float torch.empty NaN, the partials' buffers among them: a reduction that reads a partial before its
    program stored it reads NaN (uninitialised memory might happen to hold the same call's partials)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


def _programs_in_reverse(monkeypatch):
    """Triton's interpreter runs a grid's programs one at a time, in order: from here on in reverse order, so the
    slice that arrives last is the first, not the last (a fold that reduced in the last slice's program, not in
    the last to arrive, would read the others' partials before they were stored)."""
    from triton.runtime import interpreter

    def set_grid_idx(self, x, y, z):
        nx, ny, nz = self.grid_dim
        self.grid_idx = (nx - 1 - x, ny - 1 - y, nz - 1 - z)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", set_grid_idx)


def _record_stores(monkeypatch) -> list:
    """The addresses each store of Triton's interpreter writes from here on, an array a store, appended."""
    from triton.runtime import interpreter

    stored, store = [], interpreter.InterpreterBuilder.create_masked_store

    def recorded(self, ptrs, value, mask, *args):
        stored.append(ptrs.data[mask.data].astype(np.int64))
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", recorded)
    return stored


def _writes(stored: list, tensor: torch.Tensor) -> np.ndarray:
    """How many times each element of (contiguous) `tensor` was stored at the recorded addresses."""
    index = (np.concatenate(stored) - tensor.data_ptr()) // tensor.element_size()
    return np.bincount(index[(index >= 0) & (index < tensor.numel())], minlength=tensor.numel())


# in bf16 (the served dtype) the cases whose arrivals differ: the served shape, several slices a row over a batch,
# one program a row (first and last at once), two rows; fp32 (IEEE products, the other code path of the dot) on
# the served shape only. The fold is not served (FOLD_REDUCE), each case is seconds of the interpreter in CI, and
# the cases left out (ragged, one-group, window: the mask and the tail block, the same code in both forms) are
# checked for the two kernels by test_kernels_equal_fp64_attention_through_the_interpreter
FOLD_CASES = [(case, torch.bfloat16) for case in ("7b-shape", "long-slices", "one-slice", "two-rows")] + [
    ("7b-shape", torch.float32)]


@pytest.mark.parametrize(("case", "dtype"), FOLD_CASES, ids=lambda v: str(v))
def test_the_folded_kernel_is_the_two_kernels_bit_for_bit(triton_interpreter, poisoned_partials,  # noqa: F811
                                                          monkeypatch, case, dtype):
    """The folded kernel (the reduction in each (batch row, KV head)'s last program) against the two kernels, over
    every case in bf16 (empty slices, batch rows with their own masks, one slice a row): the same bits, each output element
    stored once (one reduction a (b, h): programs that reduced before the last arrived would be overwritten here,
    where the interpreter runs them one after another, but race on a GPU), and its counters zero after every
    launch, so a second launch over the same counters, its programs in the other order, is the same again. The
    counters beyond the batch's rows stay zero too."""
    batch, heads, kv_heads, slots, dim, allowed, target = CASES[case]
    if target is not None:
        monkeypatch.setattr(flash_decode, "TARGET_PROGRAMS", target)
    q, k, v = _inputs(batch, heads, kv_heads, slots, dim, dtype)
    mask, scale = _mask(batch, slots, allowed), dim**-0.5
    two = _launched(q, k, v, mask, scale)
    assert not two.isnan().any()
    arrivals = torch.zeros(batch * kv_heads + 3, dtype=torch.int32)
    stored = _record_stores(monkeypatch)
    for launch in ("in order", "in reverse"):
        if launch == "in reverse":
            _programs_in_reverse(monkeypatch)
        folded = torch.full_like(two, float("nan"))
        stored.clear()
        flash_decode.launch(q, k, v, mask, scale, folded, arrivals)
        assert torch.equal(folded, two), (launch, (folded.double() - two.double()).abs().max().item())
        writes = _writes(stored, folded)
        assert (writes == 1).all(), (launch, np.unique(writes).tolist())
        assert not arrivals.any(), (launch, arrivals.tolist())


def test_the_fold_refuses_too_few_counters():
    """The folded kernel counts in int32, a counter a (batch row, KV head): fewer, or another dtype, is refused
    before a launch could count past them."""
    q, k, v = _inputs(2, 8, 2, 128, 32, torch.bfloat16)
    mask = _mask(2, 128, [range(0, 100), range(0, 30)])
    for wrong in (torch.zeros(3, dtype=torch.int32), torch.zeros(8, dtype=torch.int64)):
        with pytest.raises(ValueError, match="counts 4 rows"):
            _launched(q, k, v, mask, 0.2, wrong)


def test_the_counters_are_made_once_a_device_and_never_in_a_trace(monkeypatch):
    """`arrivals()`: ARRIVAL_ROWS int32 zeros, the same tensor at every call for its device (a captured graph keeps
    its address); made neither while torch.compile traces nor inside a CUDA graph's capture."""
    monkeypatch.setattr(flash_decode, "_ARRIVALS", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="outside torch.compile and CUDA graph capture"):
        flash_decode.arrivals("cpu")
    monkeypatch.undo()
    monkeypatch.setattr(flash_decode, "_ARRIVALS", {})
    counters = flash_decode.arrivals("cpu")
    assert counters.dtype == torch.int32 and counters.shape == (flash_decode.ARRIVAL_ROWS,) and not counters.any()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # made: a trace finds them
    assert flash_decode.arrivals(torch.device("cpu")) is counters


def test_the_cases_take_every_path_of_the_kernels(monkeypatch):
    """What CASES claims, checked against the split plan: a program that walks several blocks (the rescaling
    across blocks), a reduction over several slices, an empty slice past the cache, and a slice of one block."""
    seen = set()
    for batch, _heads, kv_heads, slots, _dim, _allowed, target in CASES.values():
        monkeypatch.setattr(flash_decode, "TARGET_PROGRAMS", target or TARGET_SERVED)
        splits, chunk = flash_decode.split_plan(slots, batch * kv_heads)
        seen |= {"several blocks" if chunk > flash_decode.BLOCK_N else "one block",
                 "several slices" if -(-slots // chunk) > 1 else "one slice"}
        if splits * chunk - slots >= chunk:
            seen.add("an empty slice")
    assert seen == {"several blocks", "one block", "several slices", "one slice", "an empty slice"}


def test_blocks_the_mask_excludes_are_not_read(triton_interpreter):  # noqa: F811
    """A block of slots none of which may be attended is skipped, not read and zeroed: NaN in every such slot of
    the keys and values leaves the output exactly what it was (a read would make it NaN: 0 x NaN)."""
    q, k, v = _inputs(1, 8, 2, 512, 64, torch.bfloat16)
    mask = _mask(1, 512, [range(0, 130)])  # blocks of 64: slots 192 on are in blocks with nothing to attend
    clean = _launched(q, k, v, mask, 0.125)
    k[:, :, 192:], v[:, :, 192:] = float("nan"), float("nan")
    assert torch.equal(_launched(q, k, v, mask, 0.125), clean)
    v[:, :, 150] = float("nan")  # a masked slot of a block that is read: its 0 weight x NaN, so the check can fail
    assert _launched(q, k, v, mask, 0.125).isnan().any()


@pytest.mark.parametrize(("slots", "rows"), [(1024, 8), (2048, 8), (4096, 8), (200, 8), (64, 1), (4096, 512),
                                             (100, 3)])
def test_the_split_plan_covers_every_slot_once(slots, rows):
    """Slices of whole blocks that cover the cache once; their number a constant of the rows (the cache's length
    may be symbolic), about a program an SM."""
    splits, chunk = flash_decode.split_plan(slots, rows)
    assert chunk % flash_decode.BLOCK_N == 0 and slots <= splits * chunk < slots + splits * flash_decode.BLOCK_N
    assert all(flash_decode.split_plan(n, rows)[0] == splits for n in (1, 64, 4096, 32768))
    assert splits == 1 or flash_decode.TARGET_PROGRAMS <= rows * splits < flash_decode.TARGET_PROGRAMS + rows


def test_the_split_plan_takes_a_symbolic_length():
    """Under one compiled graph for every cache length (`decode_compile_lengths: one`) the length is a SymInt:
    the plan keeps it symbolic, and its splits stay an int."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    slots = env.create_unbacked_symint()
    splits, chunk = flash_decode.split_plan(slots, 8)
    assert isinstance(splits, int) and splits == flash_decode.TARGET_PROGRAMS // 8 and isinstance(chunk, torch.SymInt)


def test_why_not_names_what_the_kernels_do_not_cover():
    q, k, v = _inputs(1, 8, 2, 64, 32, torch.bfloat16)
    mask = _mask(1, 64, [range(0, 10)])
    assert flash_decode.why_not(q, k, v, mask) == "not on one CUDA device"
    assert flash_decode.why_not(q, k, v, None) == "no boolean mask"
    assert flash_decode.why_not(q, k, v, torch.zeros(1, 1, 1, 64)) == "no boolean mask"
    prompt = torch.randn(1, 8, 3, 32, dtype=torch.bfloat16)
    assert flash_decode.why_not(prompt, k, v, mask.expand(1, 1, 3, 64)) == "more than one query position"
    assert flash_decode.why_not(q, k, v, mask[..., :32]) == "a mask of shape (1, 1, 1, 32)"
    assert flash_decode.why_not(q.float(), k, v, mask) == "dtype torch.float32"
    odd = _inputs(1, 8, 2, 64, 24, torch.bfloat16)
    assert flash_decode.why_not(*odd, mask) == "8 heads of 24 over 2 KV heads"


def test_off_cuda_the_triton_attention_is_grouped():
    """Called where the kernels cannot run (CPU tensors), the registered function is `grouped` exactly."""
    q, k, v = _inputs(1, 8, 2, 64, 32, torch.bfloat16)
    mask = _mask(1, 64, [range(0, 20)])
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    ours = attention.triton_decode_attention(module, q, k, v, mask, scaling=0.2)[0]
    assert torch.equal(ours, _grouped(q, k, v, mask, 0.2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_without_cuda_the_engine_serves_grouped_and_says_so():
    """The smoke server on a CPU with `decode_attention: triton`: grouped attention, the reason in the engine's
    report, the answers grouped's exactly."""
    fast = Engine.from_merged(merged_folder(), serve_cfg(postprocess="none", decode="static",
                                                         decode_attention="triton"))
    ref = Engine.from_merged(merged_folder(), serve_cfg(postprocess="none", decode="static",
                                                        decode_attention="grouped"))
    assert fast.attention == f"{attention.NAME}: the model is not on a CUDA device"
    assert ref.attention == attention.NAME
    assert fast.model.config._attn_implementation == attention.NAME
    for prompt, n in [("The capital of France is", 6), ("one two three " * 5, 4)]:
        request = ProcessRequest(prompt=prompt, temperature=1e-7, max_new_tokens=n, top_k_per_token=3)
        a, b = fast.process(request), ref.process(request)
        assert a.text == b.text and [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fold", [False, True], ids=["two-kernels", "folded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernels_on_cuda_eager_compiled_and_in_a_graph(monkeypatch, dtype, fold):
    """The compiled kernels at the 7B shape (32 heads over 8 KV heads of 128) and each served cache length,
    through the registered op, two kernels and folded: eagerly, under torch.compile with fullgraph, and replayed in
    a CUDA graph whose mask then grows in place (the replay follows it: nothing of the capture's step is baked in),
    replayed three times; folded, the device's counters are zero after each."""
    assert flash_decode.available() is None
    monkeypatch.setattr(flash_decode, "FOLD_REDUCE", fold)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    counters = flash_decode.arrivals("cuda")

    def step(q, k, v, mask):
        return attention.triton_decode_attention(module, q, k, v, mask, scaling=128**-0.5)[0]

    for slots, fill in [(1024, 1), (1024, 700), (2048, 1100), (4096, 4096)]:
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        q, k, v = _inputs(1, 32, 8, slots, 128, dtype, device="cuda", seed=slots + fill)
        mask = _mask(1, slots, [range(0, fill)], device="cuda")
        exact = _fp64(q, k, v, mask, 128**-0.5)
        limit = max(2 * (_grouped(q, k, v, mask, 128**-0.5).double() - exact).abs().max().item(), TOL[dtype])
        for name, fn in (("eager", step), ("compiled", compiled)):
            error = (fn(q, k, v, mask).double() - exact).abs().max().item()
            assert error <= limit, (name, slots, fill, error)
            assert not counters.any(), (name, slots)
        graph, static = torch.cuda.CUDAGraph(), compiled(q, k, v, mask)
        with torch.cuda.graph(graph):
            static = compiled(q, k, v, mask)
        later = min(slots, fill + 200)
        mask[..., :later] = True  # the next steps' mask, written in place as the model's own is
        for replay in range(3):
            static.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            error = (static.double() - _fp64(q, k, v, mask, 128**-0.5)).abs().max().item()
            assert error <= max(limit, TOL[dtype]), ("graph", slots, later, replay, error)
            assert not counters.any(), ("graph", slots, replay)


def _ulps_apart(ours, theirs):
    """Units in the last place between two tensors of one float dtype, elementwise (their bits as integers)."""
    ints = {2: torch.int16, 4: torch.int32}[ours.element_size()]
    return (ours.view(ints).long() - theirs.view(ints).long()).abs()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_folded_kernel_is_the_two_kernels_on_cuda(dtype):
    """Compiled, the folded kernel against the two kernels, eagerly and in a CUDA graph of 32 launches, one a layer,
    sharing the device's counters, replayed five times: every launch finds them zero (each leaves them so). Over the
    7B shape at each served length (batch 1, empty slices at the short fill) the same bits; over 3 batch rows of
    their own masks, as on the H200 (Triton 3.6), the same bits but for a few elements a unit in the last place
    apart (the same reduction compiled inside the split kernel: flash_decode's docstring)."""
    assert flash_decode.available() is None
    counters = flash_decode.arrivals("cuda")

    def check(folded, expected, where):
        apart = _ulps_apart(folded, expected)
        if folded.shape[0] == 1:
            assert torch.equal(folded, expected), (where, int((apart > 0).sum()))
        else:
            assert apart.max() <= 1 and (apart > 0).sum() <= 8, (where, int(apart.max()), int((apart > 0).sum()))

    for batch, slots, fills in [(1, 1024, [1]), (1, 2048, [1100]), (1, 4096, [4096]), (3, 2048, [2048, 5, 700])]:
        layers = []
        for layer in range(32):
            q, k, v = _inputs(batch, 32, 8, slots, 128, dtype, device="cuda", seed=layer)
            layers.append((q, k, v, _mask(batch, slots, [range(0, fill) for fill in fills], device="cuda")))
        two = [_launched(q, k, v, mask, 128**-0.5) for q, k, v, mask in layers]
        for layer, ((q, k, v, mask), expected) in enumerate(zip(layers, two, strict=True)):
            check(_launched(q, k, v, mask, 128**-0.5, counters), expected, (batch, slots, layer))
            assert not counters.any(), (batch, slots)
        outs = [torch.empty_like(expected) for expected in two]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for (q, k, v, mask), out in zip(layers, outs, strict=True):
                flash_decode.launch(q, k, v, mask, 128**-0.5, out, counters)
        for replay in range(5):
            for out in outs:
                out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            for layer, (out, expected) in enumerate(zip(outs, two, strict=True)):
                check(out, expected, (batch, slots, "replay", replay, layer))
            assert not counters.any(), (batch, slots, replay)


def test_the_registered_op_is_the_launch_through_the_interpreter(triton_interpreter, monkeypatch):  # noqa: F811
    """`torch.ops.birbal.decode_attention`, the custom op the served step calls (its schema, its output's
    allocation, the kernels through `wrap_triton`), run eagerly on CPU: the bare launch's output exactly, with the
    two kernels and folded. `flash_decode.decode_attention`, which the served step calls, folds where FOLD_REDUCE
    says and the device's counters cover the rows (and leaves them zero), and otherwise never asks for them. The
    counters are the op's one declared mutation (its schema's), so every tracer knows the kernel writes them."""
    flash_decode._register()
    schema = torch.ops.birbal.decode_attention.default._schema
    assert [arg.name for arg in schema.arguments if arg.alias_info and arg.alias_info.is_write] == ["arrivals"]
    q, k, v = _inputs(2, 8, 2, 192, 64, torch.bfloat16)
    mask = _mask(2, 192, [range(0, 150), range(0, 40)])
    reference = _launched(q, k, v, mask, 0.125)
    out = torch.ops.birbal.decode_attention(q, k, v, mask, 0.125, None)
    assert out.shape == (2, 1, 8, 64) and torch.equal(out, reference)
    arrivals = torch.zeros(4, dtype=torch.int32)
    assert torch.equal(torch.ops.birbal.decode_attention(q, k, v, mask, 0.125, arrivals), reference)
    assert not arrivals.any()
    counters = flash_decode.arrivals("cpu")
    asked = []
    monkeypatch.setattr(flash_decode, "arrivals", lambda device: asked.append(device) or counters)
    for fold, rows_covered, folded in ((True, 4, True), (True, 3, False), (False, 4096, False)):
        monkeypatch.setattr(flash_decode, "FOLD_REDUCE", fold)
        monkeypatch.setattr(flash_decode, "ARRIVAL_ROWS", rows_covered)
        asked.clear()
        assert torch.equal(flash_decode.decode_attention(q, k, v, mask, 0.125), reference)
        assert asked == ([q.device] if folded else []) and not counters.any(), (fold, rows_covered)


def test_the_attention_benchmark_checks_every_arm_on_cpu(triton_interpreter, monkeypatch):  # noqa: F811
    """benchmarks/decode_attention.py's plumbing, so that a GPU session's minutes are not lost to it: every arm
    (SDPA, grouped eager and compiled, both flex forms, the kernels' op and the sweep's bare launches, two kernels
    and folded) computes the 7B shape's attention on CPU within bf16 rounding of fp64, the timing left out. Here
    the op's arm is grouped (no CUDA) and the sweep runs through the interpreter, one point of each kind (its
    points differ in the kernels' constants only, and each costs seconds of the interpreter)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import decode_attention

    names = [decode_attention.sweep_name(*point) for point in decode_attention.SWEEP]
    assert len(set(names)) == len(names) and {"triton[64,256,w8,s2]", "triton[64,256]", "triton[64,128,fold]",
                                              "triton[64,256,fold]"} <= set(names)
    kinds = {"triton[32,128]", "triton[64,256]", "triton[64,256,w8,s2]", "triton[64,256,fold]"}
    monkeypatch.setattr(decode_attention, "SWEEP", tuple(p for p, n in zip(decode_attention.SWEEP, names,
                                                                             strict=True) if n in kinds))
    row = decode_attention.measure_case(128, 50, SimpleNamespace(sweep=True, replays=1), 128**-0.5, 4000.0,
                                        device="cpu", layers_n=2)
    swept = {decode_attention.sweep_name(*point) for point in decode_attention.SWEEP}
    assert swept == kinds
    assert set(row["arms"]) == {"sdpa", "grouped", "grouped_compiled", "flex_score_mod", "flex_block_mask",
                                "triton"} | swept
    for name, arm in row["arms"].items():
        assert arm.get("max_abs_error", math.inf) < TOL[torch.bfloat16], (name, arm)
