"""The training step's dropout, kernel against kernel: how much of the compiled layer's element-wise time is its
random numbers, at birbal-4090's shape (one 16,384-token micro-batch, Mistral-7B's widths, bf16).

Why: the step profile (benchmarks/results, fifteenth session) puts 0.275 s of the 1.73 s step in element-wise
kernels, the largest Inductor's fused silu(gate) x up with down_proj's LoRA dropout (0.075 s, about 1.2 ms a call
for 235M elements, against about 0.4 ms to move its bytes at the H200's bandwidth), then the input RMSNorm with the
three q/k/v LoRA dropouts (0.054 s). Every call draws its dropout masks again (the forward, then the recompute).
Inductor's `tl.rand` (torch <= 2.12) runs a whole Philox 4x32-10 for each element and keeps one of its four
outputs (pytorch/pytorch#120423; torch 2.13's Inductor uses all four in one-dimensional kernels,
pytorch/pytorch#184377). This benchmark asks whether those random numbers are what the kernels wait on, before
any change to how the training draws them (a change of stream, not of maths: the same dropout, other masks).

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    python3 benchmarks/train_dropout.py --out $OUT/train_dropout.json

A CPU check of the script itself (eager, small shape, no timing worth reading):
`--device cpu --tokens 256 --width 512 --hidden 128 --repeats 1`.

Sites (each a compiled forward whose LoRA terms require grad, so Inductor writes what a backward keeps):
- `mlp`: gate and up, each a base product plus its LoRA term, silu(gate) x up, and its dropout (down_proj's LoRA
  A input): the profile's `triton_poi_fused__unsafe_view_add_mul_native_dropout_silu`.
- `norm`: Mistral's RMSNorm of the layer input (fp32 inside, its weight applied in bf16) and the three dropouts
  of q/k/v's LoRA A inputs: the profile's `triton_red_fused__to_copy_add_mean_mul_native_dropout_pow_rsqrt`.
Arms (each in its own process, with its own Inductor cache, compiled in that process):
- `as_trained`: `F.dropout` as the training graph has it: this torch's Inductor draws the masks.
- `rand4x` (CUDA, torch without it built in): the same graph with Inductor's `rand` emitting #184377's form, four
  numbers from each Philox call, where the kernel is one-dimensional (Inductor's own condition); a site whose
  kernel is not (the `norm` reduction) records that the form never applied.
- `no_rng`: the same graph and bytes with the mask a function of the values (`|x| >= 1e-3`): the kernel's time if
  its random numbers were free. Not a way to train: the floor the other two are read against.
- `masks_apart` (the `norm` site; a lever's cost, not yet a way the training draws them): the three masks drawn by
  a compiled function of their own, a one-dimensional kernel that under CUDA takes #184377's form (four numbers a
  Philox call), then the norm's kernel reading them (bool, 1 byte an element each): the two kernels timed
  together. The `mlp` site records it as not applicable (its kernel is one-dimensional: `rand4x` is its lever).
Method: `--repeats` timed calls after three warm-ups, CUDA events, the median. Checked before timing: each
dropout's zeroed fraction is p within 1% absolute (as_trained, rand4x, masks_apart), the kept values are
x / (1 - p), and the rand4x and masks_apart arms' compiled code used the four-number form.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

P = 0.05  # the recipe's lora_dropout
EPS = 1e-5  # Mistral's rms_norm_eps
SITES = ("mlp", "norm")
ARMS = ("as_trained", "rand4x", "no_rng", "masks_apart")


def _drop(t: torch.Tensor, arm: str) -> torch.Tensor:
    if arm == "no_rng":
        return t * (t.abs() >= 1e-3) * (1.0 / (1.0 - P))
    return F.dropout(t, P, training=True)


def site_function(site: str, arm: str):
    if site == "mlp":
        def mlp(base_gate, lora_gate, base_up, lora_up):
            hidden = F.silu(base_gate + lora_gate) * (base_up + lora_up)
            return hidden, _drop(hidden, arm)
        return mlp

    def norm(x, weight):
        normed = _rms_norm(x, weight)
        return normed, _drop(normed, arm), _drop(normed, arm), _drop(normed, arm)

    def norm_masked(x, weight, *masks):  # masks_apart: the same norm, each dropout's mask given
        normed = _rms_norm(x, weight)
        return (normed, *(normed * mask * (1.0 / (1.0 - P)) for mask in masks))
    return norm_masked if arm == "masks_apart" else norm


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mistral's RMSNorm as transformers writes it: fp32 inside, the weight applied in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h.to(x.dtype)


def draw_masks(x: torch.Tensor, count: int = 3) -> tuple[torch.Tensor, ...]:
    """masks_apart: `count` dropout keep-masks of x's shape (bool, kept with probability 1 - p), one kernel."""
    return tuple(torch.rand(x.shape, device=x.device) >= P for _ in range(count))


def site_inputs(site: str, tokens: int, width: int, hidden: int, device, dtype) -> list[torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype).requires_grad_(grad)

    if site == "mlp":  # the base products are frozen; the LoRA terms carry the gradient
        return [randn(tokens, width), randn(tokens, width, grad=True), randn(tokens, width),
                randn(tokens, width, grad=True)]
    return [randn(tokens, hidden, grad=True), (1.0 + 0.1 * randn(hidden)).requires_grad_(False)]


# ---- the rand4x form (pytorch/pytorch#184377's helpers, for an Inductor that lacks them) --------------------------
try:  # at module level: Triton's JIT resolves a kernel's callees from its module's globals
    import triton
    import triton.language as tl
except ImportError:  # the CPU check needs neither
    triton = None

if triton is not None:
    @triton.jit
    def _to_block(r0, r1, r2, r3):
        # the four lanes interleaved by offset, so the stream does not depend on the block size
        size: tl.constexpr = r0.numel
        return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [size * 4])

    @triton.jit
    def birbal_rand4x(seed, offsets, BLOCK: tl.constexpr):
        offsets = offsets.to(tl.uint32)
        seed = tl.min(seed + offsets * 0, axis=0)
        if BLOCK >= 4 and BLOCK % 4 == 0:
            base = tl.min(offsets, axis=0)
            r0, r1, r2, r3 = tl.rand4x(seed, base // 4 + tl.arange(0, BLOCK // 4))
            return _to_block(r0, r1, r2, r3)
        return tl.rand(seed, offsets)


def install_rand4x() -> dict:
    """Make this process's Inductor draw four numbers from each Philox call in one-dimensional kernels, as torch
    2.13 does. Returns a counter of the times the form was emitted. In-process only: the helper is added to
    Inductor's `triton_helpers` module here, so the kernels must compile in this process
    (TORCHINDUCTOR_COMPILE_THREADS=1, set by the parent)."""
    from torch._inductor.codegen import triton as codegen
    from torch._inductor.runtime import triton_helpers
    from torch._inductor.select_algorithm import TritonTemplateKernel
    from torch._inductor.virtualized import V

    emitted = {"rand4x": 0, "rand": 0}
    if hasattr(codegen.TritonOverrides, "_can_use_4x_random"):
        raise RuntimeError("this torch's Inductor has the four-number form built in: as_trained is rand4x here")

    triton_helpers.birbal_rand4x = birbal_rand4x

    def rand(seed, offset):
        offset = f"({offset}).to(tl.uint32)"
        kernel = V.kernel
        if (isinstance(kernel, codegen.TritonKernel) and not isinstance(kernel, TritonTemplateKernel)
                and kernel.triton_tensor_ndim() == 1):
            (block,) = kernel.dense_size_list()
            emitted["rand4x"] += 1
            return f"triton_helpers.birbal_rand4x({seed}, {offset}, {block})"
        emitted["rand"] += 1
        return f"tl.rand({seed}, {offset})"

    codegen.TritonOverrides.rand = staticmethod(rand)
    return emitted


# ---- one arm, in its own process -----------------------------------------------------------------------------
def check_dropout(outputs: list[torch.Tensor], arm: str) -> list[float]:
    """Each dropout output against its input (outputs[0]): kept values x / (1 - p), zeroed fraction p."""
    source = outputs[0].float()
    live = source.abs() >= 1e-3
    fractions = []
    for dropped in outputs[1:]:
        dropped = dropped.float()
        kept = dropped != 0
        torch.testing.assert_close(dropped[kept], (source / (1.0 - P))[kept].to(outputs[0].dtype).float(),
                                   rtol=1e-2, atol=1e-2)
        fraction = 1.0 - kept[live].float().mean().item()
        if arm != "no_rng" and abs(fraction - P) > 0.01:
            raise AssertionError(f"{arm}: {fraction:.4f} of the values zeroed, not p = {P}")
        fractions.append(round(fraction, 5))
    return fractions


def run_arm(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    emitted = None
    if args.arm == "masks_apart" and args.site != "norm":
        return {"status": "not_applicable", "error": "a one-dimensional kernel: rand4x is this site's lever"}
    if args.arm == "rand4x" and device.type != "cuda":
        return {"status": "skipped", "error": "CUDA only: Inductor's Triton kernels"}
    if args.arm in ("rand4x", "masks_apart") and device.type == "cuda":
        emitted = install_rand4x()  # masks_apart: its masks' kernel is one-dimensional, four numbers a Philox call
    if device.type == "cuda":
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False  # the arms' graphs are the same; their kernels are not
    fn = site_function(args.site, args.arm)
    call = torch.compile(fn) if args.compiled else fn
    if args.arm == "masks_apart":  # two compiled functions, so Inductor cannot put the masks' draw back in the norm
        masks = torch.compile(draw_masks) if args.compiled else draw_masks
        norm_call = call

        def call(x, weight):
            return norm_call(x, weight, *masks(x))
    inputs = site_inputs(args.site, args.tokens, args.width, args.hidden, device, dtype)
    started = time.perf_counter()
    outputs = call(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    fractions = check_dropout([o.detach() for o in outputs], args.arm)
    if emitted is not None and emitted["rand4x"] == 0:
        return {"status": "not_applied", "compile_s": round(compile_s, 1), "emitted": emitted,
                "zeroed": fractions, "error": "no kernel of this site is one-dimensional: the form never applied"}
    del outputs
    times = []
    for i in range(3 + args.repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            outputs = call(*inputs)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            outputs = call(*inputs)
            elapsed = (time.perf_counter() - t0) * 1e3
        del outputs
        if i >= 3:
            times.append(elapsed)
    return {"status": "ok", "ms": round(statistics.median(times), 4), "ms_each": [round(t, 4) for t in times],
            "compile_s": round(compile_s, 1), "zeroed": fractions, **({"emitted": emitted} if emitted else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the micro-batch")
    parser.add_argument("--width", type=int, default=14336, help="the MLP's intermediate size")
    parser.add_argument("--hidden", type=int, default=4096, help="the model's hidden size")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sites", default=",".join(SITES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--timeout-s", type=float, default=240, help="for each arm's process")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # the worker
    parser.add_argument("--site", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.compiled = args.device != "cpu"  # CPU: the arms' maths, eager (Inductor's C++ would not be the kernel)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return 0
    sites, arms = args.sites.split(","), args.arms.split(",")
    unknown = [s for s in sites if s not in SITES] + [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown sites or arms {', '.join(unknown)}: sites {', '.join(SITES)}; arms {', '.join(ARMS)}")
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if args.device == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(0)
    results = []
    for site in sites:
        for arm in arms:
            with tempfile.TemporaryDirectory(prefix="birbal-dropout-") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
                command = [sys.executable, __file__, "--out", args.out, "--device", args.device, "--tokens",
                           str(args.tokens), "--width", str(args.width), "--hidden", str(args.hidden), "--repeats",
                           str(args.repeats), "--arm", arm, "--site", site]
                try:
                    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout_s)
                    lines = run.stdout.strip().splitlines()
                    result = (json.loads(lines[-1]) if run.returncode == 0 and lines else
                              {"status": "error", "error": (run.stderr.strip().splitlines() or ["no output"])[-1]})
                except subprocess.TimeoutExpired:
                    result = {"status": "timeout", "error": f"no result within {args.timeout_s:.0f} s"}
            result = {"site": site, "arm": arm, **result}
            print(f"[{site} / {arm}] {result['status']} {result.get('ms', '')} ms {result.get('error', '')}",
                  file=sys.stderr, flush=True)
            results.append(result)
    for result in results:  # each arm against the kernel as trained at its site
        base = next((r for r in results if r["site"] == result["site"] and r["arm"] == "as_trained"
                     and r["status"] == "ok"), None)
        if base and result["status"] == "ok":
            result["vs_as_trained"] = round(result["ms"] / base["ms"], 3)
    report = {"benchmark": "train_dropout", "date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
              "versions": versions, "settings": {"tokens": args.tokens, "width": args.width, "hidden": args.hidden,
                                                 "p": P, "repeats": args.repeats, "compiled": args.compiled},
              "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))
    print("| site | arm | status | ms a call (median) | vs as trained | zeroed fraction |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['site']} | {r['arm']} | {r['status']} | {r.get('ms', '—')} | {r.get('vs_as_trained', '—')} | "
              f"{', '.join(str(z) for z in r.get('zeroed', [])) or '—'} |")
    return 0 if all(r["status"] in ("ok", "skipped", "not_applied", "not_applicable") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
