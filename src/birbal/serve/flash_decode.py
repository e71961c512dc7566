"""`serve.decode_attention: triton`: a decode step's attention over the static cache as a split-KV Triton kernel.

`grouped` (birbal.serve.attention) reads each key and value once, but as two batched cuBLAS GEMMs and a fused mask
and softmax kernel: three kernels a layer, the GEMMs on a few tiles each (measured on an H200 at the 7B shape and a
2,048-slot cache, ninth session: 372 us a step, against the 0.06 ms the cache's bytes take at 4 TB/s). Here it is
two kernels (or one, folded: below), in the manner of flash-decoding (Dao et al., 2023; vLLM's and SGLang's Triton
decode kernels):
1. `_decode_attention_split`, a program for each (batch row, KV head, slice of the cache): the 4 query heads of its
   KV head as the rows of one tile (padded to 16 for the tensor cores), an online softmax over its slice's slots in
   blocks of BLOCK_N. It reads the mask first and skips a block none of whose slots may be attended: a request of 600 tokens
   in a 2,048-slot cache reads 600 slots of keys and values, not 2,048. It writes its unnormalised output, running
   maximum and sum.
2. `_decode_attention_reduce`, a program for each (batch row, query head): the slices' partial outputs, rescaled
   to one maximum and summed, over the summed weights; rounded to the query's dtype.

Folded (FOLD_REDUCE): one kernel a layer. At the 7B step on an H200 (one 64-slot block a slice, 32 slices) the split
kernel took 5.7 us and the reduce kernel 2.5, each behind a ~0.26 us gap in the CUDA graph: the reduction's own
work is a few KiB from L2, the rest looked like a launch. So each split program, having stored its partial, counts
itself in an int32 counter of its (batch row, KV head) with one atomic add; the program that finds SPLITS - 1 there
arrived last, so every partial of its (b, h) is stored: it runs the reduction for the GROUPS query heads (the
function `_decode_attention_reduce` runs, head by head) and sets the counter back to 0 for the next launch. The
ordering, CUDA's threadfence-reduction pattern (and CUTLASS's semaphore): a CTA barrier orders all the program's
threads' partial stores before the one thread's atomic, whose release (acq_rel, GPU scope: MEMBAR.GPU before the
atomic in the SASS) makes them visible to whichever program's acquire reads its count; that program's threads load
after the barrier that hands them the atomic's result, and load the partials past L1 (`.cg`: L1 is not coherent
between SMs). No program waits: the last to arrive finds the others done, so nothing assumes the programs are
resident at once. The counters (`arrivals()`): ARRIVAL_ROWS int32 zeros a device, made once, outside any capture
or trace (where the attention is chosen, or at the first eager launch), and passed to the op as a declared mutated
argument: Inductor then knows the kernel writes them and, as they are a graph input, lets it write them in place
(no clone, no copy), and a CUDA graph bakes in their address. Each launch leaves them zero, so every layer and
every replay starts from zero. Launches sharing them must be stream-ordered (one decode stream; two launches
running at once on one device would count each other's programs). A batch whose rows exceed ARRIVAL_ROWS gets the
two kernels.
Through Triton's interpreter the folded output is the two kernels' bit for bit; compiled on the H200, at batch 1 at
every served length too, and at batch 2 and 3 all but a few elements (at most 4 of 12,288), which differ by a unit
in the last place, the same ones every run: the partials are the same bits and the reduce kernel run over the
folded kernel's partials gives the two kernels' output, so it is the reduction's compiled code inside the split
kernel, not a race (partials poisoned with NaN never reached an output). It is not served: slower on the H200
(benchmarks/results/decode_attention_h200_2026-12-01_fold.json, us a layer, two kernels -> folded: 1,024 slots
600 filled 8.4 -> 10.0, 2,048/1,100 9.0 -> 12.0, 2,048/2,048 9.6 -> 11.7, 4,096/3,000 12.6 -> 15.5). The last program
reduces its GROUPS heads one after another, each a round trip to L2, where the reduce kernel spreads them over 32
programs, and every program now waits for its fence and atomic. Reducing all the heads in one pass (both kernels
sharing it, a reduce program per KV head) brought the fold to 8.5, 10.7, 10.4 and 14.1 but made the two kernels
0.6-0.7 us slower; it was not kept.

The maths is the attention `grouped` and transformers' eager attention compute: scores Q K^T accumulated in fp32
and rounded to the model's dtype, times the scale, the boolean mask, softmax in fp32, the probabilities in the
model's dtype times V with fp32 accumulation. What differs is float rounding only: the softmax is normalised at the
end instead of before P V (so P is rounded before its normalisation), and the slots are summed in another order
(tests/test_serve_flash_decode.py: against `grouped` and fp64, through Triton's interpreter on CPU and compiled on
CUDA). fp32 models get IEEE fp32 products, not TF32.

Why by hand: torch's own flex attention has a decode kernel of this kind, and it was measured in the served step
at the 7B shape on an H200: 10.2 ms a step against SDPA's 6.6 (benchmarks/results, serve_latency_h200_2026-11-28_
flex.json, masked by the step's position); masked by transformers' mask tensor it did not compile (torch 2.11,
"XBLOCK is not defined"). A BlockMask that skips the unfilled blocks would be rebuilt from the step's mask in every
layer. SDPA's kernels take no grouped heads with an explicit mask without expanding them.
`benchmarks/decode_attention.py` times all of these against these kernels at the served cache lengths. The split
sizes target 256 programs, two an SM (an H200 has 132 SMs, an RTX 4090 128): on the H200 the best of 32-128 x
64-256 (BLOCK_N x TARGET_PROGRAMS; decode_attention_h200_2026-12-01_sweep.json); not tuned on a 4090.

Registered as a torch custom op (`torch.library.triton_op`) like birbal.serve.gemv, so torch.compile traces it as
its kernels and a CUDA graph captures them. Triton is imported only where it runs (a CUDA machine with the
serving image's Triton); elsewhere `available()` says why not and `grouped` runs instead.
"""

from __future__ import annotations

import functools

import torch

OP = "birbal::decode_attention"
NAME = "birbal_triton_decode"  # the AttentionInterface name (birbal.serve.attention)
BLOCK_N = 64  # slots a loop iteration of the split kernel reads
BLOCK_G = 16  # query rows of a tile: a KV head's query heads, padded to tl.dot's least M
TARGET_PROGRAMS = 256  # the H200 sweep's best of 64-256 (eleventh session, benchmarks/results/README.md)
SPLIT_WARPS, SPLIT_STAGES = 4, 2  # the split kernel's launch (benchmarks/decode_attention.py --sweep varies them)
FOLD_REDUCE = False  # one kernel a layer, the reduction in each (b, h)'s last program: slower (docstring)
ARRIVAL_ROWS = 4096  # the folded kernel's counters a device: batch x KV heads up to this (batch 512 at 8 KV heads)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ARRIVALS: dict[tuple[str, int | None], torch.Tensor] = {}  # (device type, index) -> arrivals(device)


@functools.cache
def available() -> str | None:
    """None when the kernels can run here (CUDA and Triton; the op registered), else why not."""
    from birbal.serve.gemv import triton_missing

    return triton_missing(_register)


@functools.cache
def kernels():
    """The split and reduce kernels (compiled per dtype, head shape and FOLD at their first launch)."""
    import triton
    import triton.language as tl

    global _reduce_head  # a module global: Triton's interpreter looks a kernel's callees up there, not in closures

    @triton.jit
    def _reduce_head(acc_ptr, ml_ptr, out_ptr, bh, b, h, g, stride_ob, stride_oh,
                     GROUPS: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_S: tl.constexpr):
        """Query head `g` of KV head `h` of batch row `b` (`bh`): its slices' partials, rescaled to one maximum and
        summed, over the summed weights. Both paths run this one function: the same operations in the same order
        (bit for bit through the interpreter; compiled, see the module docstring). The loads skip L1 (`.cg`): in
        the folded kernel other programs wrote these partials during this launch, and L1 is not coherent across
        SMs; in the reduce kernel it costs nothing."""
        s = tl.arange(0, BLOCK_S)
        s_ok = s < SPLITS
        d = tl.arange(0, DIM)
        part = bh * SPLITS + s
        maxima = tl.load(ml_ptr + (part * 2) * BLOCK_G + g, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        sums = tl.load(ml_ptr + (part * 2 + 1) * BLOCK_G + g, mask=s_ok, other=0.0, cache_modifier=".cg")
        w = tl.where(maxima == float("-inf"), 0.0, tl.exp(maxima - tl.max(maxima, axis=0)))  # nothing to attend: 0
        acc = tl.load(acc_ptr + (part * BLOCK_G + g)[:, None] * DIM + d[None, :], mask=s_ok[:, None], other=0.0,
                      cache_modifier=".cg")
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(sums * w, axis=0)
        tl.store(out_ptr + b * stride_ob + (h * GROUPS + g) * stride_oh + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _decode_attention_split(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr, out_ptr, count_ptr, slots, chunk,
                      scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                      stride_mb, stride_ms, stride_ob, stride_oh,
                      KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // KV_HEADS
        h = bh % KV_HEADS
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, DIM)
        g_ok = g < GROUPS
        q = tl.load(q_ptr + b * stride_qb + (h * GROUPS + g)[:, None] * stride_qh + d[None, :], mask=g_ok[:, None],
                    other=0.0)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, DIM), tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, slots)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            allowed = tl.load(mask_ptr + b * stride_mb + n * stride_ms, mask=n_ok, other=0) != 0
            if tl.max(allowed.to(tl.int32), axis=0) > 0:  # a block with no slot to attend is not read
                k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=n_ok[:, None], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                # the scores in the model's dtype, then fp32 times the scale: eager attention's order
                # `scale` arrives as fp32 from an eager launch but fp64 from Inductor (a Python float, on a device
                # with fp64): rounded to fp32 here either way, so the softmax state stays fp32 in both
                s = s.to(q.dtype).to(tl.float32) * tl.cast(scale, tl.float32)
                s = tl.where(allowed[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block has an allowed slot
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=n_ok[:, None], other=0.0)
                if IEEE:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        part = bh * SPLITS + split
        tl.store(acc_ptr + (part * BLOCK_G + g)[:, None] * DIM + d[None, :], acc)
        tl.store(ml_ptr + (part * 2) * BLOCK_G + g, m_i)
        tl.store(ml_ptr + (part * 2 + 1) * BLOCK_G + g, l_i)
        if FOLD:
            # every thread's stores above precede the atomic (one thread issues it), whose release publishes them
            # to the program that arrives last; its acquire (and the barrier Triton puts behind a scalar atomic to
            # hand its result to every thread) orders that program's loads after all of them
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:  # the last of this (b, h)'s programs: every partial is stored
                for row in range(GROUPS):  # the real query heads only, not the tile's padding
                    _reduce_head(acc_ptr, ml_ptr, out_ptr, bh, b, h, row, stride_ob, stride_oh, GROUPS=GROUPS,
                                 DIM=DIM, SPLITS=SPLITS, BLOCK_G=BLOCK_G, BLOCK_S=BLOCK_S)
                tl.store(count_ptr + bh, 0)  # zero for the next launch (the next layer, the next replay)

    @triton.jit
    def _decode_attention_reduce(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh,
                       KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
        bh = tl.program_id(0)
        _reduce_head(acc_ptr, ml_ptr, out_ptr, bh, bh // KV_HEADS, bh % KV_HEADS, tl.program_id(1), stride_ob,
                     stride_oh, GROUPS=GROUPS, DIM=DIM, SPLITS=SPLITS, BLOCK_G=BLOCK_G, BLOCK_S=BLOCK_S)

    return _decode_attention_split, _decode_attention_reduce


def split_plan(slots, rows: int) -> tuple[int, int]:
    """(splits, chunk): the cache's slots cut into `splits` slices of `chunk` slots (a multiple of BLOCK_N), about
    TARGET_PROGRAMS programs over the `rows` (batch x KV heads). `splits` depends on `rows` only: it is a constant
    of both kernels, while the cache's length may be symbolic (`decode_compile_lengths: one` compiles one graph
    for every length), and so is `chunk`. A slice that starts past the cache's end (a short cache) is empty: its
    program stores a partial that weighs nothing in the reduction."""
    splits = max(1, -(-TARGET_PROGRAMS // max(rows, 1)))
    blocks = -(-slots // BLOCK_N)
    return splits, -(-blocks // splits) * BLOCK_N


def arrivals(device) -> torch.Tensor:
    """The device's arrival counters for the folded kernel: ARRIVAL_ROWS int32 zeros, made at the first call for
    the device and kept for the process (a CUDA graph that captured a launch keeps their address). Each launch
    leaves them zero. Made where the attention is chosen (birbal.serve.attention.use_decode_attention) or at the
    first eager launch: never inside a CUDA graph's capture (the zeros would be the graph's memory and its memset
    part of every replay) nor while torch.compile traces (the graph would make its own zeros every call); either
    is refused here. GraphDecoder's warm-up steps run eagerly before it captures."""
    device = torch.device(device)
    counters = _ARRIVALS.get((device.type, device.index))
    if counters is None:
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            raise RuntimeError(f"birbal.serve.flash_decode.arrivals({str(device)!r}) must be called once outside "
                               "torch.compile and CUDA graph capture first")
        counters = _ARRIVALS[(device.type, device.index)] = torch.zeros(ARRIVAL_ROWS, dtype=torch.int32,
                                                                         device=device)
    return counters


def launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
           out: torch.Tensor, arrivals: torch.Tensor | None = None, wrap=None) -> None:
    """`out` (batch, 1, heads, dim) = the attention of `query` (batch, heads, 1, dim) over `key`, `value` (batch,
    kv_heads, slots, dim) where the boolean `mask` (batch or 1, 1, 1, slots) allows. `arrivals`: int32 zeros, at
    least batch x kv_heads of them (`arrivals()`), for the folded kernel, left zero; None: the two kernels. `wrap`:
    torch.library.wrap_triton inside the custom op; tests launch the kernels bare (Triton's interpreter on CPU)."""
    import triton

    batch, heads, dim = int(query.shape[0]), int(query.shape[1]), int(query.shape[3])  # the kernels' constants
    kv_heads, slots = int(key.shape[1]), key.shape[2]  # slots: symbolic under one graph for every length
    groups, rows = heads // kv_heads, batch * kv_heads
    if arrivals is not None and (arrivals.dtype != torch.int32 or arrivals.numel() < rows):
        raise ValueError(f"the folded kernel counts {rows} rows' arrivals in int32; given {arrivals.numel()} "
                         f"{arrivals.dtype}")
    splits, chunk = split_plan(slots, rows)
    acc = torch.empty((rows * splits * BLOCK_G, dim), dtype=torch.float32, device=query.device)
    ml = torch.empty((rows * splits * 2 * BLOCK_G,), dtype=torch.float32, device=query.device)
    split_kernel, reduce_kernel = kernels() if wrap is None else tuple(wrap(k) for k in kernels())
    block_s = triton.next_power_of_2(splits)
    split_kernel[(rows, splits)](
        query, key, value, mask, acc, ml, out, arrivals, slots, chunk, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0) if mask.shape[0] > 1 else 0,
        mask.stride(3), out.stride(0), out.stride(2), KV_HEADS=kv_heads, GROUPS=groups, DIM=dim, SPLITS=splits,
        BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, IEEE=query.dtype == torch.float32, FOLD=arrivals is not None,
        BLOCK_S=block_s, num_warps=SPLIT_WARPS, num_stages=SPLIT_STAGES)
    if arrivals is None:
        reduce_kernel[(rows, groups)](
            acc, ml, out, out.stride(0), out.stride(2), KV_HEADS=kv_heads, GROUPS=groups, DIM=dim, SPLITS=splits,
            BLOCK_G=BLOCK_G, BLOCK_S=block_s, num_warps=4)


@functools.cache  # once a process: torch.library refuses a second definition
def _register() -> None:
    from torch.library import triton_op, wrap_triton

    @triton_op(OP, mutates_args={"arrivals"})
    def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         scale: float, arrivals: torch.Tensor | None) -> torch.Tensor:
        """The attention of a 1-token `query` (batch, heads, 1, dim) over the cache: (batch, 1, heads, dim); with
        `arrivals` (counters, left zero) the folded kernel, else the two."""
        batch, heads, _, dim = query.shape
        out = query.new_empty((batch, 1, heads, dim))
        launch(query, key, value, mask, scale, out, arrivals, wrap=wrap_triton)
        return out


def why_not(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> str | None:
    """None when the kernels compute this call's attention, else why not (the caller runs `grouped`). Shapes,
    dtypes and devices only (Dynamo turns them into guards); whether the kernels run here at all is `available()`,
    asked once where the attention is chosen (birbal.serve.attention.use_decode_attention)."""
    if mask is None or mask.dtype != torch.bool:
        return "no boolean mask"
    batch, heads, q_len, dim = query.shape
    if q_len != 1:
        return "more than one query position"
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1:3] != (1, 1) or mask.shape[3] != key.shape[2]:
        return f"a mask of shape {tuple(mask.shape)}"
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}"
    if dim & (dim - 1) or not 16 <= dim <= 256 or heads % key.shape[1] or heads // key.shape[1] > BLOCK_G:
        return f"{heads} heads of {dim} over {key.shape[1]} KV heads"
    if query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1 or key.shape != value.shape:
        return "a key, value or query whose last dimension is not contiguous"
    if not (query.is_cuda and key.device == query.device and value.device == query.device
            and mask.device == query.device):
        return "not on one CUDA device"
    return None


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The kernels' attention, (batch, 1, heads, dim); call only where `why_not(...)` is None. Folded (FOLD_REDUCE)
    where the device's counters cover the batch's rows, else the two kernels: the rows are shapes, so under
    torch.compile the choice is made once, at tracing."""
    fold = FOLD_REDUCE and query.shape[0] * key.shape[1] <= ARRIVAL_ROWS
    return torch.ops.birbal.decode_attention(query, key, value, mask, float(scale),
                                             arrivals(query.device) if fold else None)
