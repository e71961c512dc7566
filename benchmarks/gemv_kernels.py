"""A decode step's matrix-vector products, kernel against kernel: cuBLAS (`F.linear`, what the served step runs),
Inductor's fp32 reduction (`serve.decode_gemv`'s form) and a hand-written Triton GEMV over a sweep of its block
shapes, at every shape birbal-4090's (unmerged, `decode_fuse: lora`) and birbal-4090-plus's (merged) step runs.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    python3 benchmarks/gemv_kernels.py --out gemv_kernels.json

Method (the device notes' METHOD.md): each (kernel, shape) is timed as the replay of one CUDA graph of R calls,
each call on its own copy of the weight, R copies together >= `--rotate-gib` (several times the 60 MB L2: every
call reads its weight from HBM, as a decode step does), median of `--replays` replays over R. Bandwidth: the
weight's bytes over that time (the input vector and output are a few KB). Correctness: every kernel's output on
fresh random data against an fp64 product, ||out - ref|| / ||ref||, before it is timed; the output poisoned with
NaN first. The same run measures the copy bandwidth (a 4 GiB device-to-device copy) as the ceiling.

The step estimate per implementation: the sum over the step's products (shape x products a step) of its per-call
time; "best" takes each shape's fastest implementation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

# (name, N = output rows, K = input width, products a decode step) for the Mistral-7B shape, 32 layers
UNMERGED_LORA = (("qkv+B", 6144, 4096 + 384, 32), ("o+B", 4096, 4096 + 128, 32), ("gate_up+B", 28672, 4096 + 256, 32),
                 ("down+B", 4096, 14336 + 128, 32), ("lm_head", 32000, 4096, 1),
                 ("A qkv", 384, 4096, 32), ("A o", 128, 4096, 32), ("A gate_up", 256, 4096, 32),
                 ("A down", 128, 14336, 32))
MERGED = (("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32), ("down", 4096, 14336, 32))
STEPS = {"birbal-4090 (unmerged, decode_fuse lora)": UNMERGED_LORA,
         "birbal-4090-plus (merged, decode_fuse projections)": MERGED + (UNMERGED_LORA[4],)}


def configs(quick: bool):
    """Block shapes of the Triton GEMV: rows a program, K a loop iteration, warps, pipelining depth; the fp32
    accumulator (BLOCK_N x BLOCK_K) kept within 64 registers a thread."""
    out = []
    for bn in ((4, 8, 16) if quick else (1, 2, 4, 8, 16, 32)):
        for bk in ((256, 512, 1024) if quick else (128, 256, 512, 1024, 2048)):
            for warps in ((4, 8) if quick else (2, 4, 8)):
                for stages in ((1, 3) if quick else (1, 2, 3, 4)):
                    if bn * bk <= 64 * 32 * warps and bk >= 32 * warps:
                        out.append((bn, bk, warps, stages))
    return out


def triton_gemv():
    """birbal.serve.gemv's kernel (the one the server launches), at a block shape of the sweep's choosing."""
    from birbal.serve import gemv

    return lambda x, w, y, cfg: gemv.launch(x, w, y, cfg)


def time_graph(call, weights, replays: int) -> float:
    """Seconds a call: the median replay of a graph of one call on each weight, over len(weights)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            call(w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(weights)


def rel_error(out, x, w) -> float:
    ref = (w.double() @ x.double().reshape(-1))
    out = out.double().reshape(-1)
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm())


def copy_bandwidth() -> float:
    a = torch.empty(2 ** 31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * 2 ** 31 / best / 1e9


def measure_shape(n: int, k: int, sweep, run_triton, compiled_reduction, args) -> dict:
    """One shape's row: every implementation checked against fp64, then timed over rotating weight copies."""
    nbytes = n * k * 2
    copies = max(4, min(4000, math.ceil(args.rotate_gib * 2 ** 30 / nbytes)))
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / math.sqrt(k) for _ in range(copies)]
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    row = {"N": n, "K": k, "weight_bytes": nbytes, "copies": copies, "impl": {}}

    def measure(label, call):
        y.fill_(float("nan"))
        out = call(weights[0])
        if out is not None:
            y.copy_(out)
        err = rel_error(y, x, weights[0])
        if not err < 1e-2:
            row["impl"][label] = {"error": f"relative error {err:.2e}"}
            return
        s = time_graph(call, weights, args.replays)
        row["impl"][label] = {"us": round(s * 1e6, 3), "gb_s": round(nbytes / s / 1e9, 1), "rel_err": err}

    measure("cublas", lambda w: torch.matmul(x, w.t(), out=y))
    measure("inductor_reduction", lambda w: compiled_reduction(x, w))  # its output: the graph pool's
    best = None
    for cfg in sweep:
        label = "triton_" + "x".join(map(str, cfg))
        try:
            measure(label, lambda w, c=cfg: run_triton(x, w, y, c))
        except Exception as exc:  # a block shape the compiler refuses (resources): recorded, not fatal
            row["impl"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            continue
        r = row["impl"][label]
        if "us" in r and (best is None or r["us"] < row["impl"][best]["us"]):
            best = label
    row["triton_best"] = best
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rotate-gib", type=float, default=1.0)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer pipelining depths in the sweep")
    parser.add_argument("--deadline-s", type=float, default=None, help="stop the sweep after this many seconds")
    args = parser.parse_args()
    launched = time.perf_counter()
    torch.manual_seed(0)
    run_triton = triton_gemv()
    compiled_reduction = torch.compile(lambda x, w: (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype),
                                       dynamic=False)
    result = {"benchmark": "gemv_kernels", "argv": sys.argv[1:],
              "versions": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                           "triton": __import__("triton").__version__},
              "copy_bandwidth_gb_s": round(copy_bandwidth(), 1), "shapes": {}}
    shapes = {(n, k): name for step in STEPS.values() for name, n, k, _ in step}
    sweep = configs(args.quick)
    for (n, k), name in shapes.items():
        if args.deadline_s is not None and time.perf_counter() - launched > args.deadline_s:
            result["shapes"][name] = {"skipped": "deadline"}
            continue
        row = measure_shape(n, k, sweep, run_triton, compiled_reduction, args)
        result["shapes"][name] = row
        torch.cuda.empty_cache()
        best = row["triton_best"]
        print(f"{name:12s} N={n:6d} K={k:6d}  cublas {row['impl']['cublas'].get('gb_s')} GB/s  "
              f"inductor {row['impl']['inductor_reduction'].get('gb_s')}  "
              f"triton best {best} {row['impl'][best]['gb_s'] if best else None} GB/s", flush=True)
    steps = {}
    for step_name, step in STEPS.items():
        totals = {"cublas": 0.0, "inductor_reduction": 0.0, "triton_best": 0.0, "best": 0.0}
        complete = True
        for _name, n, k, count in step:
            row = result["shapes"].get(shapes[(n, k)], {})
            if "impl" not in row:
                complete = False
                continue
            us = {lab: r["us"] for lab, r in row["impl"].items() if "us" in r}
            totals["cublas"] += count * us["cublas"]
            totals["inductor_reduction"] += count * us.get("inductor_reduction", math.inf)
            totals["triton_best"] += count * us[row["triton_best"]]
            totals["best"] += count * min(us.values())
        steps[step_name] = {"complete": complete, **{k: round(v, 1) for k, v in totals.items()}}
    result["step_products_us"] = steps
    result["wall_s"] = round(time.perf_counter() - launched, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ncopy bandwidth {result['copy_bandwidth_gb_s']} GB/s")
    print(f"{'shape':12s} {'N':>6s} {'K':>6s} {'cublas us':>10s} {'GB/s':>7s} {'triton us':>10s} {'GB/s':>7s}  config")
    for name, row in result["shapes"].items():
        if "impl" not in row:
            continue
        c, t = row["impl"]["cublas"], row["impl"].get(row["triton_best"] or "", {})
        print(f"{name:12s} {row['N']:6d} {row['K']:6d} {c.get('us', 0):10.2f} {c.get('gb_s', 0):7.1f} "
              f"{t.get('us', 0):10.2f} {t.get('gb_s', 0):7.1f}  {row['triton_best']}")
    for step_name, s in steps.items():
        print(f"{step_name}: products a step, us: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
