"""Training attention, kernel against kernel, at birbal-4090's shape: one 16,384-token bin of packed examples, the
Mistral-7B heads (32 query heads over 8 KV heads of 128, bf16), causal inside each example and inside the sliding
window as trained (4,097 keys: upstream's flash-attention window, birbal.train.model), forward and backward.

The step profile (benchmarks/results, fifteenth session) puts this attention at 0.373 s of a 1.73 s step, run by
flex attention at about 314 TFLOP/s, 40% of the H200's measured 790: the part of the step furthest from its limit.
This benchmark asks which kernel for the same maths is fastest, before any of them is wired into training.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    python3 benchmarks/train_attention.py --out $OUT/train_attention.json

A CPU check of the script itself (flex eager, small shape, no timing worth reading):
`--device cpu --tokens 512 --window 65 --heads 4 --kv-heads 2 --dim 16 --repeats 1`.

Arms (each the same maths; the mask: same example, key <= query, key > query - window):
- `flex`: torch's flex_attention compiled, with a BlockMask built once from the examples (transformers builds the
  same one per forward from the packed position ids: masking_utils' packed-sequence, causal and sliding-window
  mask functions), GQA without expanding the KV heads: what birbal-4090 trains with (`attn_implementation:
  flex_attention`), default kernel options. The baseline.
- `flex[...]`: the same with `kernel_options` (`--flex-options`, JSON objects; an option this torch rejects is
  recorded as that arm's error).
- `flex_autotune`: the same compiled with mode `max-autotune-no-cudagraphs` (Inductor times its own template
  configurations, forward and backward).
- `varlen`: torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside PyTorch: upstream's own kernel family,
  flash_attn_varlen_qkvpacked_func with window_size=(4096, 4096)) over the examples' cumulative lengths,
  `window_size=(window - 1, 0)`; the KV heads expanded to 32 where this torch has no `enable_gqa` (the expansion
  timed with it). CUDA only, and torch >= 2.11: the training image's torch 2.10 has varlen_attn without a window
  (`is_causal` only), so there it would not be the same maths, and the image would need torch 2.11 for it.

Method: per arm, `--repeats` timed calls after two warm-ups, CUDA events: the forward alone, then forward and
backward (the gradient of a fixed random cotangent). FLOPs: 4 x heads x dim x (the keys each query attends to,
summed) forward, and 2.5x that backward (dQ, dK, dV and the scores recomputed inside the flash backward).
Checked before timing: each arm's output against an fp32 reference over `--check-queries` query positions (the
scores materialised, the mask applied, the softmax), and its input gradients against fp32 flex's (max abs error
over the reference's largest magnitude).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import sys
import time

import torch

DEFAULT_OPTIONS = ('{"BLOCK_M": 64, "BLOCK_N": 64}', '{"BLOCK_M": 128, "BLOCK_N": 128}',
                   '{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}')


def example_lengths(tokens: int, rows: int, mix: bool, seed: int) -> list[int]:
    """Full rows (`rows` examples of tokens / rows, birbal-4090's profiled shape), or the length mix of
    benchmarks/train_throughput.py (log-normal around its median, at most 8,192 tokens) packed to `tokens`."""
    from train_throughput import MIX_MEDIAN, MIX_MIN, MIX_SIGMA  # this folder is on sys.path

    if not mix:
        return [tokens // rows] * rows
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < tokens:
        length = max(MIX_MIN, min(8192, int(rng.lognormvariate(math.log(MIX_MEDIAN), MIX_SIGMA))))
        out.append(min(tokens - sum(out), length))
    return out


def keys_attended(lengths: list[int], window: int) -> int:
    """The keys all queries attend to, summed (birbal.train.metrics.mean_attention_context's count, times tokens)."""
    from birbal.train.metrics import mean_attention_context

    return round(mean_attention_context(lengths, window) * sum(lengths))


def document_ids(lengths: list[int], device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def flex_arm(doc, window: int, heads: int, kv_heads: int, device, options: dict | None, mode: str | None,
             compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (kv <= q) & (kv > q - window)

    tokens = doc.numel()
    block_mask = create_block_mask(mask_mod, 1, 1, tokens, tokens, device=device)
    kernel = torch.compile(flex_attention, mode=mode) if compiled else flex_attention
    gqa = heads != kv_heads

    def call(q, k, v):  # q (1, H, T, D), k and v (1, KV, T, D)
        return kernel(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=options)

    return call


def varlen_arm(lengths: list[int], window: int, heads: int, kv_heads: int, device):
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters:
        raise RuntimeError("this torch's varlen_attn has no window_size (torch >= 2.11)")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    longest = max(lengths)
    gqa = "enable_gqa" in parameters
    extra = {"enable_gqa": True} if gqa and heads != kv_heads else {}

    def call(q, k, v):  # as flex's: (1, H, T, D) in, (1, H, T, D) out
        qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))  # (T, H, D)
        if heads != kv_heads and not gqa:
            kt, vt = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kt, vt))
        out = varlen_attn(qt, kt, vt, cu, cu, longest, longest, window_size=(window - 1, 0), **extra)
        return out.transpose(0, 1)[None]

    return call, {"enable_gqa": gqa}


def reference_rows(q, k, v, doc, window: int, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention for the query positions `rows`: scores materialised, the mask applied, then the softmax."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kk, vv = (t[0].float().repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))  # (H, T, D)
    qq = q[0, :, rows].float()  # (H, R, D)
    scores = qq @ kk.transpose(1, 2) * q.shape[-1] ** -0.5  # (H, R, T)
    keys = torch.arange(k.shape[2], device=q.device)
    allowed = (doc[rows][:, None] == doc[None, :]) & (keys[None, :] <= rows[:, None]) & (keys[None, :] > rows[:, None] - window)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv  # (H, R, D)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` calls after two warm-ups (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(name: str, call, inputs, cotangent, reference: dict, rows, fwd_flop: float, device, repeats: int) -> dict:
    """The arm's forward checked and timed, then its backward (apart: flex has no backward on CPU)."""
    q, k, v = inputs
    arm: dict = {"arm": name}
    try:
        with torch.no_grad():
            out = call(q, k, v)
        arm["out_max_abs_error"] = float((out[0, :, rows].float() - reference["out"]).abs().max())
        arm["out_scale"] = float(reference["out"].abs().max())
        del out

        def forward():
            with torch.no_grad():
                call(q, k, v)

        arm["forward_s"] = round(timed(forward, device, repeats), 6)
        arm["forward_tflops"] = round(fwd_flop / arm["forward_s"] / 1e12, 3)
    except Exception as err:  # noqa: BLE001 -- an arm this torch cannot run is a result, the others still run
        arm["error"] = f"forward: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        return arm
    try:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        call(*leaves).backward(cotangent)
        for label, leaf, ref in zip(("dq", "dk", "dv"), leaves, reference["grads"], strict=True):
            arm[f"{label}_error_over_scale"] = round(float((leaf.grad.float() - ref).abs().max() / ref.abs().max()), 5)
        del leaves

        def forward_backward():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            call(*leaves).backward(cotangent)

        arm["forward_backward_s"] = round(timed(forward_backward, device, repeats), 6)
        arm["forward_backward_tflops"] = round(3.5 * fwd_flop / arm["forward_backward_s"] / 1e12, 3)
    except Exception as err:  # noqa: BLE001
        arm["backward_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return arm


def table(result: dict) -> str:
    base = next((a for a in result["arms"] if a["arm"] == "flex" and "forward_backward_s" in a), None)
    lines = ["| arm | forward ms | TFLOP/s | forward + backward ms | TFLOP/s | vs flex | out error | dq / dk / dv "
             "error (over scale) |", "|---|---|---|---|---|---|---|---|"]
    for a in result["arms"]:
        if "error" in a:
            lines.append(f"| {a['arm']} | {a['error']} | | | | | | |")
            continue
        if "forward_backward_s" not in a:
            lines.append(f"| {a['arm']} | {a['forward_s'] * 1e3:.2f} | {a['forward_tflops']} | "
                         f"{a.get('backward_error', '')} | | | {a['out_max_abs_error']:.2e} | |")
            continue
        ratio = f"{base['forward_backward_s'] / a['forward_backward_s']:.2f}x" if base else ""
        lines.append(f"| {a['arm']} | {a['forward_s'] * 1e3:.2f} | {a['forward_tflops']} | "
                     f"{a['forward_backward_s'] * 1e3:.2f} | {a['forward_backward_tflops']} | {ratio} | "
                     f"{a['out_max_abs_error']:.2e} | {a['dq_error_over_scale']} / {a['dk_error_over_scale']} / "
                     f"{a['dv_error_over_scale']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the bin")
    parser.add_argument("--rows", type=int, default=2, help="full-row examples in the bin (without --mix)")
    parser.add_argument("--mix", action="store_true", help="the length mix packed into the bin instead")
    parser.add_argument("--window", type=int, default=4097, help="keys a query may attend to, itself included")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check-queries", type=int, default=256)
    parser.add_argument("--flex-options", nargs="*", default=list(DEFAULT_OPTIONS),
                        help="kernel_options for the flex[...] arms, each a JSON object")
    parser.add_argument("--no-autotune", action="store_true", help="skip flex_autotune (its compile takes minutes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    launched = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    lengths = example_lengths(args.tokens, args.rows, args.mix, args.seed)
    doc = document_ids(lengths, device)
    keys = keys_attended(lengths, args.window)
    fwd_flop = 4.0 * args.heads * args.dim * keys
    result = {"benchmark": "train_attention", "argv": sys.argv[1:],
              "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                           "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
                           "triton": getattr(__import__("importlib").import_module("triton"), "__version__", None)
                           if cuda else None},
              "shape": {"tokens": args.tokens, "examples": len(lengths), "longest": max(lengths),
                        "window": args.window, "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
                        "dtype": str(dtype), "mean_keys_a_query": round(keys / args.tokens, 1)},
              "flop": {"forward": fwd_flop, "backward": 2.5 * fwd_flop}, "arms": []}

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    q, k, v = (torch.randn(1, h, args.tokens, args.dim, generator=generator).to(device, dtype)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    cotangent = torch.randn(1, args.heads, args.tokens, args.dim, generator=generator).to(device, dtype)
    rows = torch.randperm(args.tokens, generator=generator)[:args.check_queries].to(device)

    # the references: fp32 attention over the checked queries, fp32 flex's input gradients
    reference = {"out": reference_rows(q, k, v, doc, args.window, rows)}
    if cuda:  # fp32 flex (the materialised scores of 16,384 tokens would not fit); flex has no backward on CPU
        leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        flex_arm(doc, args.window, args.heads, args.kv_heads, device, None, None, compiled=True)(*leaves).backward(
            cotangent.float())
        reference["grads"] = [leaf.grad for leaf in leaves]
        del leaves

    arms = [("flex", lambda: flex_arm(doc, args.window, args.heads, args.kv_heads, device, None, None, cuda))]
    for text in args.flex_options:
        options = json.loads(text)
        label = ",".join(f"{key}={value}" for key, value in options.items())
        arms.append((f"flex[{label}]", lambda o=options: flex_arm(doc, args.window, args.heads, args.kv_heads,
                                                                  device, o, None, cuda)))
    if cuda:
        arms.append(("varlen", lambda: varlen_arm(lengths, args.window, args.heads, args.kv_heads, device)))
    if cuda and not args.no_autotune:  # last: its compile takes minutes, and a command cut short keeps the rest
        arms.append(("flex_autotune", lambda: flex_arm(doc, args.window, args.heads, args.kv_heads, device, None,
                                                       "max-autotune-no-cudagraphs", True)))
    for name, build in arms:
        print(f"[{time.perf_counter() - launched:7.1f} s] {name}", file=sys.stderr, flush=True)
        try:
            built = build()
        except Exception as err:  # noqa: BLE001 -- recorded, the other arms still run
            result["arms"].append({"arm": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            continue
        call, notes = built if isinstance(built, tuple) else (built, {})
        arm = measure(name, call, (q, k, v), cotangent, reference, rows, fwd_flop, device, args.repeats)
        arm.update(notes)
        result["arms"].append(arm)
        with open(args.out, "w") as f:  # rewritten after every arm: a run cut short keeps what it measured
            json.dump(result, f, indent=1)
    result["wall_s"] = round(time.perf_counter() - launched, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["shape"]))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
