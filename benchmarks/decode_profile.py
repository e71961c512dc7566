"""Where a decode step's time goes: the served model's one-token step at batch 1, replayed and profiled.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    python3 benchmarks/decode_profile.py --out decode_profile.json --tokenizer-folder .cache/whl2/tok

A CPU check of the script itself: `--arch tiny --device cpu --variants unmerged:static,merged:static`.

What it does, in one process:
1. times the card's copy bandwidth (serve_latency.copy_bandwidth: the bound's basis) and builds the same random
   bf16 Mistral-7B-shaped base, LoRA adapter (r=128, the 7 projections) and merged folders as
   benchmarks/serve_latency.py (its `build_folders`; reused when `--workdir` already holds them);
2. per variant `served:mode[+switch...]` (served: `unmerged` = birbal-4090's server, `Engine.from_adapter` on the
   base + adapter under the birbal-4090 profile's serve section; `merged` = birbal-4090-plus's, `Engine.from_merged`
   under that profile's), with `serve.decode` = mode and each `+switch` a serve setting (VARIANTS) or a kernel's
   launch constant held for that variant only (LAUNCHES, recorded as its `launch`), loads the engine
   exactly as the server does (the same decoder classes), prefills a `--prompt-tokens` prompt into the
   `--cache-length` static cache (the graph decoders capture, and compile, that length there), then
   (a) `graph_ms_per_step`: `--steps` replays of the captured step, timed with CUDA events (for a graph mode; the
       bare step, the number the per-token target is closest to);
   (b) `engine_decode_ms_per_token`: the engine's own generation, (t_N - t_2) / (N - 2) as serve_latency measures
       it (the step plus the engine's host work per token: sampling, logprobs, detokenising);
   (c) the replayed graph under torch.profiler: kernels per step, the GPU's busy time and the gaps;
   (d) the same compiled step launched without the graph, under torch.profiler with shapes: each kernel's
       launching op and its input shapes classify it (base-weight GEMV, LoRA A / B GEMV, lm_head, attention,
       copies, norms/rotary/elementwise, other); where (c) holds the same kernels in the same order, (c)'s times are
       classified by (d)'s classes.
   Achieved GB/s of the base-weight GEMVs: the bytes of the weights they read (K x N x 2) over their kernels' time.
3. prints the JSON and a table; `--deadline-s` skips the variants that would not finish in time, and the JSON is
   written after each variant.

The bound per variant: the bytes a step must read (every parameter, less the input embedding's rows not looked
up, plus the adapter's for unmerged) over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

import serve_latency
from serve_latency import TINY, build_folders, copy_bandwidth, load_tokenizer, sync, versions
from shapes import MISTRAL_7B

PROFILES = {"unmerged": "birbal-4090", "merged": "birbal-4090-plus"}
# "+name" after a mode: a serve setting (the key a variant's name carries in the JSON); what a variant does not
# set is the profile's own (birbal-4090 for unmerged, birbal-4090-plus for merged). serve_latency.py's names, and
# "sdpa", which its labels leave out (they name every switch a server's settings match)
VARIANTS = {**serve_latency.VARIANTS, "sdpa": ("decode_attention", "sdpa")}
# "+name" that is a kernel's launch, not a serve setting: a birbal.serve.flash_decode constant set while the variant
# is built and timed, then restored (benchmarks/decode_attention.py --sweep picks candidates kernel against kernel;
# this times one in the served step)
LAUNCHES = {"warps8": ("SPLIT_WARPS", 8)}
# today's birbal-4090 (sdpa, unfused) and plus (merged, grouped, unfused), each followed by what this branch serves
# (birbal-4090: grouped attention and decode_fuse lora; plus: decode_fuse), then the decode_gemv variants
DEFAULT_VARIANTS = ("unmerged:compiled_layers+sdpa+unfused,unmerged:compiled_layers+grouped+lora,"
                    "merged:compiled_layers+grouped+unfused,merged:compiled_layers+grouped+fused,"
                    "unmerged:compiled_layers+grouped+lora+gemva,merged:compiled_layers+grouped+fused+gemvall,"
                    "unmerged:compiled_layers+grouped+lora+gemvall")
CLASSES = ("base_gemv", "lm_head", "lora_a_gemv", "lora_b_gemv", "gemv_triton", "gemv_birbal", "attention",
           "copies", "norm_rotary_elementwise", "other")
MM_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")
ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "aten::scaled_dot_product",
                 "aten::_efficient_attention", "aten::_flash_attention", "aten::_softmax", "aten::softmax")
COPY_OPS = ("aten::copy_", "aten::index_copy", "aten::index_put", "aten::cat", "aten::clone", "aten::_to_copy",
            "aten::contiguous", "aten::fill_", "aten::zero_")
COPY_KERNELS = ("copy", "memcpy", "memset", "index_copy", "scatter", "cat")
ATTENTION_KERNELS = ("fmha", "flash", "attention", "softmax", "attn")


def parse_variant(text: str) -> tuple[str, str, dict]:
    served, _, spec = text.partition(":")
    mode, *switches = spec.split("+")
    if served not in PROFILES or not mode or any(s not in VARIANTS and s not in LAUNCHES for s in switches):
        raise argparse.ArgumentTypeError(f"a variant is served:mode[+switch...], served in {', '.join(PROFILES)}, "
                                         f"switches from {', '.join([*VARIANTS, *LAUNCHES])}; given {text!r}")
    return served, mode, dict(VARIANTS[s] for s in switches if s in VARIANTS)


def launches(text: str) -> dict:
    """The flash_decode launch constants `text`'s "+name"s set (LAUNCHES)."""
    _, _, spec = text.partition(":")
    return dict(LAUNCHES[s] for s in spec.split("+")[1:] if s in LAUNCHES)


def variants_arg(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    for item in items:
        parse_variant(item)
    if not items or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct variants; given {text!r}")
    return items


# ---- the engine ------------------------------------------------------------------------------------------------
def make_engine(work: Path, variant: str, device, tokenizer_folder: Path | None):
    """The served engine of `variant`, built as the serve stage builds it: the profile's serve section, with
    serve.decode and the variant's switches set (a CPU run also sets float32, as serve_latency's start-up does)."""
    from birbal.config import load_recipe
    from birbal.serve.engine import Engine

    served, mode, switches = parse_variant(variant)
    sets = [f"serve.decode={mode}", f"serve.device={device.type}", *(f"serve.{k}={v}" for k, v in switches.items())]
    if device.type != "cuda":
        sets.append("serve.dtype=float32")
    cfg = load_recipe(PROFILES[served], sets).serve
    if served == "merged":
        return Engine.from_merged(work / "merged", cfg, device), cfg
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder or work / "base"))
    return Engine.from_adapter(str(work / "base"), work / "adapter", tokenizer, cfg, device=device), cfg


def step_bytes(model, served: str) -> dict:
    """Bytes a 1-token step reads: every parameter but the input embedding (one row of it), adapter included."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    row = embed.shape[1] * embed.element_size()
    return {"parameter_bytes": total, "adapter_bytes": lora,
            "step_bytes": total - embed.numel() * embed.element_size() + row}


# ---- profiling -------------------------------------------------------------------------------------------------
def trace_events(prof) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = Path(f.name)
    try:
        prof.export_chrome_trace(str(path))
        data = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    return data.get("traceEvents", data) if isinstance(data, dict) else data


def device_kernels(events: list[dict], cuda: bool) -> list[dict]:
    """The step's kernels in launch order (each with its launching op's name and input shapes when known). On CPU:
    the leaf aten ops, as the CPU check's stand-in for kernels."""
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    by_external = {}
    for op in sorted(ops, key=lambda e: (e["ts"], -e.get("dur", 0))):
        ext = (op.get("args") or {}).get("External id")
        if ext is not None:
            by_external[ext] = op  # the innermost op of that id (a later start inside the outer one wins)
    out = []
    if cuda:
        for k in sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"), key=lambda e: e["ts"]):
            args = k.get("args") or {}
            op = by_external.get(args.get("External id"))
            out.append({"name": k["name"], "ts": k["ts"], "dur": float(k.get("dur", 0.0)), "ext": args.get("External id"),
                        "op": op["name"] if op else "", "dims": (op.get("args") or {}).get("Input Dims") if op else None})
        return out
    trivial = ("aten::empty", "aten::view", "aten::as_strided", "aten::reshape", "aten::t", "aten::transpose",
               "aten::expand", "aten::unsqueeze", "aten::slice", "aten::select", "aten::detach", "aten::alias",
               "aten::empty_strided", "aten::resolve_conj", "aten::_unsafe_view", "aten::permute", "aten::resize_",
               "aten::empty_like", "aten::squeeze", "aten::lift_fresh", "aten::result_type")
    cands = sorted((op for op in ops if op["name"].startswith("aten::") and op["name"] not in trivial),
                   key=lambda e: (e.get("tid"), e["ts"], -e.get("dur", 0)))
    for i, op in enumerate(cands):
        end = op["ts"] + op.get("dur", 0)
        nxt = cands[i + 1] if i + 1 < len(cands) else None
        if nxt is not None and nxt.get("tid") == op.get("tid") and nxt["ts"] < end:
            continue  # holds another op: not a leaf
        out.append({"name": op["name"], "ts": op["ts"], "dur": float(op.get("dur", 0.0)), "op": op["name"],
                    "dims": (op.get("args") or {}).get("Input Dims")})
    out.sort(key=lambda k: k["ts"])
    return out


def mm_shape(dims) -> tuple[int, int] | None:
    """(K, N) of an M=1 product's weight from the op's input dims ([x, w] for mm, [bias, x, w] for addmm)."""
    if not dims:
        return None
    mats = [d for d in dims if isinstance(d, list) and len(d) == 2]
    if len(mats) < 2:
        return None
    if len(dims) >= 3 and isinstance(dims[0], list) and len(dims[0]) <= 2 and dims[0] and len(mats) >= 3 \
            and mats[0] == dims[0] and mats[1][-1] == mats[2][0]:
        mats = mats[1:]  # addmm(bias, x, w): the bias first
    (_, k), (k2, n) = mats[0], mats[1]  # mm(x, w[, out]): Inductor passes out= as a third input
    return (int(k), int(n)) if k == k2 else (int(k), int(k2))  # linear: w is (N, K)


def classify(kernel: dict, lora_r: int, vocab: int, itemsize: int = 2) -> tuple[str, int]:
    """(class, weight bytes read) of one kernel. A product is LoRA's when its weight has the adapter's rank (or 2 or
    3 times it) on one side (at the 7B shape no base projection does; the tiny shape's k/v projections do, and
    count as LoRA there). Under decode_fuse: lora the base products hold the B matrices: they count as base."""
    op, name = kernel["op"], kernel["name"].lower()
    if name.startswith(("triton_red", "triton_per")) and "_sum" in name and "softmax" not in name:
        return "gemv_triton", 0  # serve.decode_gemv: a product written as multiply-and-sum, one Triton reduction
    if "_gemv_kernel" in name:
        return "gemv_birbal", 0  # serve.decode_gemv: triton, birbal.serve.gemv's kernel (base products, lm_head)
    if op.startswith(ATTENTION_OPS) or any(s in name for s in ATTENTION_KERNELS):
        return "attention", 0
    if op.startswith(MM_OPS) or "gemv" in name or "gemm" in name or "_tem_" in name:
        shape = mm_shape(kernel["dims"])
        if shape is None:
            return "base_gemv", 0
        k, n = shape
        # LoRA's A products give r outputs (3r, 2r when a group's are fused), B's read r inputs; at the 7B shape
        # every base projection has 1,024 outputs (8r) or more
        cls = ("lm_head" if n == vocab else "lora_a_gemv" if n <= 3 * lora_r and n % lora_r == 0
               else "lora_b_gemv" if k == lora_r else "base_gemv")
        return cls, k * n * itemsize
    if op.startswith(COPY_OPS) or any(s in name for s in COPY_KERNELS):
        return "copies", 0
    if name.startswith("triton") or op.startswith(("aten::mul", "aten::add", "aten::rsqrt", "aten::pow",
                                                   "aten::mean", "aten::neg", "aten::silu", "aten::cos",
                                                   "aten::sin", "aten::sub", "aten::div")) or "elementwise" in name \
            or "reduce" in name:
        return "norm_rotary_elementwise", 0
    return "other", 0


def profile_steps(run_step, steps: int, cuda: bool, shapes: bool) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        for _ in range(steps):
            run_step()
        if cuda:
            torch.cuda.synchronize()
    return device_kernels(trace_events(prof), cuda)


def summarise_kernels(kernels: list[dict], steps: int, classes: list[tuple[str, int]] | None,
                      itemsize: int = 2) -> dict:
    per = defaultdict(lambda: {"us": 0.0, "count": 0, "bytes": 0})
    shapes = defaultdict(lambda: {"us": 0.0, "count": 0, "kernels": set()})
    for i, k in enumerate(kernels):
        # (class, the weight bytes its op reads, counted on the op's first kernel only: a split-K product is two
        # kernels, the product and cuBLAS's reduce)
        cls, nbytes, first = classes[i % len(classes)] if classes else ("unclassified", 0, True)
        per[cls]["us"] += k["dur"]
        per[cls]["count"] += 1
        per[cls]["bytes"] += nbytes
        shape = mm_shape(k["dims"]) if cls in ("base_gemv", "lm_head", "lora_a_gemv", "lora_b_gemv") else None
        if shape:
            key = f"{cls} K={shape[0]} N={shape[1]}"
            shapes[key]["us"] += k["dur"]
            shapes[key]["count"] += first
            shapes[key]["kernels"].add(k["name"][:80])
    busy = sum(k["dur"] for k in kernels) / steps
    out = {"kernels_per_step": round(len(kernels) / steps, 1), "kernel_busy_us_per_step": round(busy, 1),
           "by_class": {c: {"us_per_step": round(v["us"] / steps, 1), "kernels_per_step": round(v["count"] / steps, 1),
                            "share": round(v["us"] / steps / busy, 3) if busy else None,
                            **({"gb_s": round(v["bytes"] / (v["us"] * 1e-6) / 1e9, 1)} if v["bytes"] and v["us"] else {})}
                        for c, v in sorted(per.items(), key=lambda kv: -kv[1]["us"])}}
    base = [per[c] for c in ("base_gemv", "lm_head") if c in per]
    if base and sum(v["us"] for v in base):
        out["base_weight_gemv_gb_s"] = round(sum(v["bytes"] for v in base) / (sum(v["us"] for v in base) * 1e-6) / 1e9,
                                             1)
    if shapes:
        out["gemv_by_shape"] = {s: {"us_each": round(v["us"] / max(v["count"], 1), 2),
                                    "per_step": round(v["count"] / steps, 1), "kernels": sorted(v["kernels"])}
                                for s, v in sorted(shapes.items())}
        for s, v in out["gemv_by_shape"].items():
            k, n = (int(x.split("=")[1]) for x in s.split()[1:3]) if " K=" in s else (0, 0)
            if k and v["us_each"]:
                v["gb_s"] = round(k * n * itemsize / (v["us_each"] * 1e-6) / 1e9, 1)
    return out


def top_kernels(kernels: list[dict], steps: int, n: int = 12) -> list[dict]:
    by = defaultdict(lambda: [0.0, 0])
    for k in kernels:
        by[k["name"][:100]][0] += k["dur"]
        by[k["name"][:100]][1] += 1
    return [{"kernel": name, "us_per_step": round(us / steps, 1), "per_step": round(c / steps, 1)}
            for name, (us, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:n]]


def random_prompt(tokenizer, n: int, seed: int) -> list[int]:
    import numpy as np

    words = sorted(i for piece, i in tokenizer.get_vocab().items()
                   if piece.startswith("▁") and len(piece) > 2 and piece[1:].isascii() and piece[1:].isalpha())
    rng = np.random.default_rng(seed)
    return [int(words[j]) for j in rng.integers(0, len(words), size=n)]


def engine_decode_ms(engine, prompt_text: str, new_tokens: int, device) -> dict:
    """serve_latency's decode ms/token through the engine's own process(): (t_N - t_2) / (generated_N - 2)."""
    from birbal.serve.schemas import ProcessRequest

    times, generated = {}, {}
    for n in (2, new_tokens, 2, new_tokens):  # each twice, the faster kept
        before = engine.stats.generated_tokens
        sync(device)
        s = time.perf_counter()
        engine.process(ProcessRequest(prompt=prompt_text, max_new_tokens=n, temperature=1e-7))
        sync(device)
        t = time.perf_counter() - s
        times[n] = min(times.get(n, float("inf")), t)
        generated[n] = engine.stats.generated_tokens - before
    if generated[new_tokens] <= 2:
        return {"generated": generated[new_tokens], "note": "ended at an end-of-sequence token before 3 tokens"}
    return {"new_tokens": new_tokens, "generated": generated[new_tokens],
            "ms_per_token": round(1e3 * (times[new_tokens] - times[2]) / (generated[new_tokens] - 2), 3)}


def profile_replay(replay, steps: int, eager: list[dict], classes, step_ms: float) -> dict:
    """The captured graph's kernels under the profiler; classified by the op-by-op step's classes where the two
    hold the same kernels in the same order."""
    per_step = len(eager)
    replayed = profile_steps(replay, steps, True, shapes=False)
    same = (len(replayed) == per_step * steps
            and all(a["name"] == b["name"] for a, b in zip(replayed[:per_step], eager, strict=True)))
    rep = summarise_kernels(replayed, steps, classes if same else None)
    rep["classes_from_op_by_op"] = same
    rep["gap_us_per_step"] = round(step_ms * 1e3 - rep["kernel_busy_us_per_step"], 1)
    rep["top_kernels"] = top_kernels(replayed, steps, n=40)
    # one step's kernels in launch order (a decoder layer's sequence repeats 32 times): what a fusion would remove
    rep["step_kernels"] = [[k["name"][:90], round(k["dur"], 2)] for k in replayed[:len(replayed) // steps]]
    return rep


def profile_variant(work: Path, variant: str, device, tokenizer, args) -> dict:
    import torch

    from birbal.serve.decode import GRAPH_MODES, StaticDecoder
    from birbal.serve.regional import compiled_graph_count

    cuda = device.type == "cuda"
    served, mode, _ = parse_variant(variant)
    out: dict = {"variant": variant, "profile": PROFILES[served]}
    t0 = time.perf_counter()
    engine, cfg = make_engine(work, variant, device, args.tokenizer_folder)
    sync(device)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    out["serve"] = {k: getattr(cfg, k) for k in ("model", "adapter_dtype", "decode", "decode_attention",
                                                 "decode_compile_lengths", "decode_cache_lengths", "decode_fuse",
                                                 "decode_gemv", "decode_gemv_split_input", "decode_gemv_glu",
                                                 "decode_compile_mode", "decode_combo_kernels",
                                                 "decode_length_update", "decode_compile_rest")}
    out["fused"] = engine.fused  # what decode_fuse did (and decode_gemv's kernel), as the engine reports it
    out["attention"] = engine.attention  # what decode_attention runs (for triton: the kernels, or why not)
    out["decoder"] = engine.decoder.mode
    out.update(step_bytes(engine.model, served))
    decoder = engine.decoder
    ids = random_prompt(tokenizer, args.prompt_tokens, args.seed)
    reserve = min(args.cache_length, len(ids) + args.steps + 64)
    t0 = time.perf_counter()
    graphs = compiled_graph_count()
    with torch.inference_mode():
        decoder.prefill(ids, all_positions=False, reserve=reserve)  # captures (and compiles) this length's step
        sync(device)
        out["prefill_and_capture_s"] = round(time.perf_counter() - t0, 2)
        out["compiled_graphs"] = compiled_graph_count() - graphs
        out["cache_length"] = decoder._cache_len
        graph_mode = mode in GRAPH_MODES
        if graph_mode:
            graph, _ = decoder._graphs[decoder._cache_len]
            replay = graph.replay
        else:
            def replay():
                decoder._length += 1
                StaticDecoder._decode_step(decoder)
        for _ in range(4):
            replay()
        sync(device)
        timed = max(8, args.steps - args.profile_steps - 8)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(timed):
                replay()
            end.record()
            end.synchronize()
            step_ms = start.elapsed_time(end) / timed
        else:
            s = time.perf_counter()
            for _ in range(timed):
                replay()
            step_ms = (time.perf_counter() - s) * 1e3 / timed
        out["graph_ms_per_step" if graph_mode else "step_ms"] = round(step_ms, 3)
        # (d) the same step launched op by op (compiled where the mode compiles), shapes recorded
        decoder._length = min(decoder._length, decoder._cache_len - 1)
        eager_kernels = profile_steps(lambda: StaticDecoder._decode_step(decoder), 2, cuda, shapes=True)
        per_step = len(eager_kernels) // 2
        classes, seen = [], set()
        for k in eager_kernels[:per_step]:
            cls, nbytes = classify(k, args.lora_r, args.vocab, 2 if cuda else 4)
            first = k.get("ext") is None or k["ext"] not in seen
            seen.add(k.get("ext"))
            classes.append((cls, nbytes if first else 0, first))
        out["launched_op_by_op"] = summarise_kernels(eager_kernels, 2, classes, 2 if cuda else 4)
        out["launched_op_by_op"]["top_kernels"] = top_kernels(eager_kernels, 2)
        if graph_mode and cuda:
            try:
                out["graph_replay"] = profile_replay(replay, args.profile_steps, eager_kernels[:per_step], classes,
                                                     step_ms)
            except Exception:  # the profile of the replay is extra: its failure keeps the rest
                out["graph_replay"] = {"error": traceback.format_exc()[-2000:]}
    bw = args.bandwidth_gb_s
    if bw:
        out["bound_ms"] = round(out["step_bytes"] / (bw * 1e9) * 1e3, 3)
        out["bound_over_0_8_ms"] = round(out["bound_ms"] / 0.8, 3)
        out["over_bound"] = round(step_ms / out["bound_ms"], 2)
    if not args.skip_engine:
        text = tokenizer.decode(ids[: min(len(ids), 400)], skip_special_tokens=True)
        out["engine_decode"] = engine_decode_ms(engine, text, args.engine_new_tokens, device)
    engine = decoder = replay = None  # freed before the next variant loads
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def table(res: dict) -> str:
    lines = ["| variant | step ms | engine ms/token | bound ms | kernels/step | busy us | gap us | base GEMV GB/s | "
             + " | ".join(f"{c} us" for c in CLASSES) + " |", "|" + "---|" * (8 + len(CLASSES))]
    for v in res.get("variants", []):
        r = res.get(v, {})
        if "error" in r or "skipped" in r:
            lines.append(f"| {v} | {r.get('skipped') or 'failed'} |")
            continue
        rep = r.get("graph_replay") or r.get("launched_op_by_op", {})
        classes = rep.get("by_class", {}) if rep.get("classes_from_op_by_op", True) else \
            r.get("launched_op_by_op", {}).get("by_class", {})
        gb = (r.get("launched_op_by_op") or {}).get("base_weight_gemv_gb_s", "-")
        lines.append(f"| {v} | {r.get('graph_ms_per_step', r.get('step_ms'))} | "
                     f"{(r.get('engine_decode') or {}).get('ms_per_token', '-')} | {r.get('bound_ms', '-')} | "
                     f"{rep.get('kernels_per_step', '-')} | {rep.get('kernel_busy_us_per_step', '-')} | "
                     f"{rep.get('gap_us_per_step', '-')} | {gb} | "
                     + " | ".join(str(classes.get(c, {}).get("us_per_step", 0)) for c in CLASSES) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/decode_bench"))
    parser.add_argument("--arch", choices=["mistral-7b", "tiny"], default="mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer-folder", type=Path, default=None)
    parser.add_argument("--variants", type=variants_arg, default=variants_arg(DEFAULT_VARIANTS))
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--cache-length", type=int, default=2048, help="reserve up to this many positions")
    parser.add_argument("--steps", type=int, default=160, help="replays per variant (timed and profiled)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--engine-new-tokens", type=int, default=66)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no variant after this many seconds less --variant-reserve-s from launch")
    parser.add_argument("--variant-reserve-s", type=float, default=45.0)
    args = parser.parse_args()
    launched = time.perf_counter()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    arch = MISTRAL_7B if args.arch == "mistral-7b" else TINY
    args.vocab, args.lora_r = arch["vocab_size"], 128  # serve_latency's adapter: r=128
    args.workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"benchmark": "decode_profile", "argv": sys.argv[1:], "versions": versions(), "arch": args.arch,
                 "variants": args.variants}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=sorted) + "\n")

    try:
        res["copy_bandwidth"] = copy_bandwidth(device)
        args.bandwidth_gb_s = res["copy_bandwidth"].get("bandwidth_gb_s")
        tokenizer = load_tokenizer(args.workdir / "cache", args.tokenizer_folder)
        if all((args.workdir / f).is_dir() for f in ("base", "adapter", "merged")) and \
                (args.workdir / "arch.json").is_file() and json.loads((args.workdir / "arch.json").read_text()) == arch:
            res["weights"] = {"reused": str(args.workdir)}
        else:
            res["weights"] = build_folders(args.workdir, arch, device, tokenizer)
            (args.workdir / "arch.json").write_text(json.dumps(arch))
        res["setup_s"] = round(time.perf_counter() - launched, 1)
        save()
        for variant in args.variants:
            left = None if args.deadline_s is None else args.deadline_s - (time.perf_counter() - launched)
            if left is not None and left < args.variant_reserve_s:
                res[variant] = {"skipped": f"{left:.0f} s left before --deadline-s"}
                print(f"{variant}: skipped ({left:.0f} s left)", flush=True)
                continue
            s = time.perf_counter()
            from birbal.serve import flash_decode

            launch = launches(variant)
            kept = {name: getattr(flash_decode, name) for name in launch}
            try:
                for name, value in launch.items():
                    setattr(flash_decode, name, value)
                res[variant] = profile_variant(args.workdir, variant, device, tokenizer, args)
                res[variant]["launch"] = {name: getattr(flash_decode, name) for name in
                                          ("SPLIT_WARPS", "SPLIT_STAGES", "FOLD_REDUCE")}
            except Exception:
                res[variant] = {"error": traceback.format_exc()[-4000:]}
                print(f"{variant}: failed\n{res[variant]['error']}", flush=True)
            finally:
                for name, value in kept.items():
                    setattr(flash_decode, name, value)
            res[variant]["wall_s"] = round(time.perf_counter() - s, 1)
            save()
            r = res[variant]
            print(f"{variant}: step {r.get('graph_ms_per_step', r.get('step_ms'))} ms, "
                  f"engine {(r.get('engine_decode') or {}).get('ms_per_token')} ms/token, {r['wall_s']} s", flush=True)
    except Exception:
        res["error"] = traceback.format_exc()
        save()
        print(res["error"], file=sys.stderr)
        return 1
    res["wall_s"] = round(time.perf_counter() - launched, 1)
    save()
    for variant in args.variants:  # the GEMV shapes, compactly (the JSON has the rest)
        for shape, v in ((res.get(variant) or {}).get("launched_op_by_op") or {}).get("gemv_by_shape", {}).items():
            print(f"{variant} {shape}: {v['us_each']} us x {v['per_step']}/step, {v.get('gb_s')} GB/s, "
                  f"{', '.join(k[:60] for k in v['kernels'])}")
        for k in ((res.get(variant) or {}).get("graph_replay") or {}).get("top_kernels", [])[:8]:
            print(f"{variant} top: {k['us_per_step']} us/step x{k['per_step']} {k['kernel'][:90]}")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
