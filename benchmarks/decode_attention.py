"""A decode step's attention, kernel against kernel, at the Mistral-7B shape (32 query heads over 8 KV heads of
128, bf16) over the served static caches: what `serve.decode_attention` can run.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    python3 benchmarks/decode_attention.py --out decode_attention.json

Arms, each a 1-token query over a (cache length, filled slots) pair with the boolean mask the model builds:
- `sdpa`: transformers' SDPA path (`sdpa_attention_forward`: the KV heads expanded to 32, then SDPA's kernel).
- `grouped`: birbal.serve.attention's grouped form, eager (two batched GEMMs and the softmax).
- `grouped_compiled`: the same under torch.compile, as birbal-4090 serves it today (`compiled_layers`: Inductor
  fuses the mask and softmax; the GEMMs stay cuBLAS). The baseline.
- `flex_score_mod`: torch's flex attention (compiled, its decode kernel, `enable_gqa`), the mask read by a
  score_mod: every slot read.
- `flex_block_mask`: the same with a BlockMask built from the mask once, outside the timed calls (the best flex
  could do if the model built it once a step and every layer shared it).
- `triton`: birbal.serve.flash_decode's kernels through the registered op (`decode_attention: triton`, folded or
  not as FOLD_REDUCE serves them), and
  `triton[BLOCK_N,TARGET]`: the bare two kernels over a sweep of their block and split sizes, and
  `triton[BLOCK_N,TARGET,wW,sS]`: the split kernel launched with W warps and S stages instead of the served 4 and 2,
  and `triton[BLOCK_N,TARGET,fold]`: the one folded kernel (the reduction in each KV head's last program).

Method (as benchmarks/gemv_kernels.py): each arm is timed as the replay of one CUDA graph of 32 calls, one a layer,
each over its own layer's cache (32 caches of up to 16 MiB: every read from HBM, as in a decode step), median of
`--replays` replays; "us a layer" is that over 32, "us a step" that times 32. Every arm's output is checked against
an fp64 attention first (max abs error; the output poisoned with NaN before). The bound: the filled slots' keys
and values over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from types import SimpleNamespace

import gemv_kernels  # its timing method and copy bandwidth (this folder is on sys.path when run as a script)
import torch

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 32
CASES = ((1024, 600), (2048, 1100), (2048, 2048), (4096, 3000))
# (BLOCK_N, TARGET_PROGRAMS, the split kernel's warps, its stages, folded): the block and split sizes at the served
# launch, then the launch itself at the served sizes (eleventh session: a layer's call is 4-9x its bytes' time,
# latency), then the folded kernel (the reduction in the split kernel's last program) at the served block and
# split sizes and around them: one launch fewer may move the best split
SWEEP = (tuple((bn, target, 4, 2, False) for bn in (32, 64, 128) for target in (64, 128, 256, 512))
         + tuple((64, 256, warps, stages, False) for warps, stages in ((2, 2), (8, 2), (4, 1), (4, 3)))
         + tuple((64, target, 4, 2, True) for target in (64, 128, 256, 512))
         + tuple((bn, 256, 4, 2, True) for bn in (32, 128)))


def time_graph(call, layers, replays: int) -> float:
    """Seconds a call over one layer's inputs (gemv_kernels' method: one CUDA graph of a call on each layer)."""
    return gemv_kernels.time_graph(lambda inputs: call(*inputs), layers, replays)


def exact(q, k, v, mask, scale):
    kk, vv = (t.double().repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
    scores = ((q.double() @ kk.transpose(2, 3)) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(1, 2)  # (1, 1, heads, dim)


def arms(scale: float, device: str = "cuda") -> dict:
    """name -> (call(q, k, v, mask) -> (1, 1, heads, dim), None or what turns the layers' inputs into the arm's)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from birbal.serve import attention, flash_decode

    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)

    def grouped(q, k, v, mask):
        return attention.grouped_decode_attention(module, q, k, v, mask, scaling=scale)[0]

    def flex_score_mod(q, k, v, mask):
        allowed = mask.reshape(-1)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(allowed[kv_idx], score, -float("inf"))

        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, scale=scale).transpose(1, 2)

    def flex_block_mask(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, scale=scale).transpose(1, 2)

    def with_block_masks(layers):
        """Each layer's mask as a BlockMask, built here, outside the timed graph."""
        out = []
        for q, k, v, mask in layers:
            allowed = mask.reshape(-1)
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx, allowed=allowed: allowed[kv_idx], None, None,
                                           1, allowed.numel(), device=device)
            out.append((q, k, v, block_mask))
        return out

    def triton(q, k, v, mask):
        return attention.triton_decode_attention(module, q, k, v, mask, scaling=scale)[0]

    if device == "cuda":
        assert flash_decode.available() is None, flash_decode.available()
    return {
        "sdpa": (lambda q, k, v, mask: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0], None),
        "grouped": (grouped, None),
        "grouped_compiled": (torch.compile(grouped, fullgraph=True, dynamic=False), None),
        "flex_score_mod": (torch.compile(flex_score_mod, fullgraph=True, dynamic=False), None),
        "flex_block_mask": (torch.compile(flex_block_mask, fullgraph=True, dynamic=False), with_block_masks),
        "triton": (triton, None),
    }


def sweep_name(bn: int, target: int, warps: int, stages: int, fold: bool) -> str:
    """`triton[BLOCK_N,TARGET]` at the served launch (the eleventh session's names), the launch added otherwise,
    `,fold` for the folded kernel."""
    launch = "" if (warps, stages) == (4, 2) else f",w{warps},s{stages}"
    return f"triton[{bn},{target}{launch}{',fold' if fold else ''}]"


def swept(bn: int, target: int, warps: int, stages: int, fold: bool, scale: float):
    """The bare kernels at BLOCK_N `bn`, about `target` programs, the split kernel launched with `warps` warps and
    `stages` stages (module constants the launch reads); `fold`: the one folded kernel over the device's
    counters (made at the arm's first, eager, call: outside the timed graph's capture)."""
    from birbal.serve import flash_decode

    def call(q, k, v, mask):
        flash_decode.BLOCK_N, flash_decode.TARGET_PROGRAMS = bn, target
        flash_decode.SPLIT_WARPS, flash_decode.SPLIT_STAGES = warps, stages
        out = q.new_empty((1, 1, HEADS, DIM))
        flash_decode.launch(q, k, v, mask, scale, out, flash_decode.arrivals(q.device) if fold else None)
        return out

    return call


def measure_case(slots: int, fill: int, args, scale: float, bandwidth: float, device: str = "cuda",
                 layers_n: int = LAYERS) -> dict:
    """One (cache length, fill): every arm checked against fp64, then timed (on CUDA). `device` cpu: the checks
    only, over `layers_n` layers (tests/test_serve_flash_decode.py runs the script's plumbing so; there the
    `triton` arm is grouped, the bare-kernel arms run through Triton's interpreter)."""
    from birbal.serve import flash_decode

    torch._dynamo.reset()  # each case's shapes compile afresh, inside Dynamo's recompile limit
    gen = torch.Generator(device=device).manual_seed(slots + fill)
    layers = []
    for _ in range(layers_n):
        q = torch.randn(1, 1, HEADS, DIM, device=device, generator=gen, dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(1, KV_HEADS, slots, DIM, device=device, generator=gen, dtype=torch.bfloat16)
                for _ in range(2))
        mask = torch.zeros(1, 1, 1, slots, dtype=torch.bool, device=device)
        mask[..., :fill] = True
        layers.append((q, k, v, mask))
    ref = exact(*layers[0], scale)
    filled_bytes = 2 * KV_HEADS * fill * DIM * 2
    row = {"slots": slots, "filled": fill, "bound_us_a_layer": round(filled_bytes / bandwidth / 1e3, 2),
           "all_slots_bound_us_a_layer": round(2 * KV_HEADS * slots * DIM * 2 / bandwidth / 1e3, 2), "arms": {}}
    defaults = {constant: getattr(flash_decode, constant)
                for constant in ("BLOCK_N", "TARGET_PROGRAMS", "SPLIT_WARPS", "SPLIT_STAGES")}
    candidates = {**arms(scale, device),
                  **({sweep_name(*point): (swept(*point, scale), None) for point in SWEEP} if args.sweep else {})}
    for name, (call, prepare) in candidates.items():
        try:
            inputs = layers if prepare is None else prepare(layers)
            out = call(*inputs[0]).clone()
            error = float((out.double() - ref).abs().max()) if torch.isfinite(out).all() else math.inf
            row["arms"][name] = {"max_abs_error": error}
            if device == "cuda":
                seconds = time_graph(call, inputs, args.replays)
                row["arms"][name].update(us_a_layer=round(seconds * 1e6, 2),
                                         us_a_step=round(seconds * 1e6 * LAYERS, 1))
        except Exception as exc:  # an arm that cannot run here is a result, not the end of the run
            row["arms"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        finally:
            for constant, value in defaults.items():
                setattr(flash_decode, constant, value)
        print(f"  {slots:5d} slots, {fill:5d} filled  {name:22s} {row['arms'][name]}", flush=True)
    base = row["arms"].get("grouped_compiled", {}).get("us_a_layer")
    for arm in row["arms"].values():
        if base and "us_a_layer" in arm:
            arm["speedup_over_grouped_compiled"] = round(base / arm["us_a_layer"], 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--replays", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="also the bare kernels over SWEEP's block/split sizes")
    parser.add_argument("--deadline-s", type=float, default=None, help="skip the cases left after this many seconds")
    args = parser.parse_args()
    launched = time.perf_counter()
    scale = DIM**-0.5
    bandwidth = gemv_kernels.copy_bandwidth()
    result = {"benchmark": "decode_attention", "argv": sys.argv[1:],
              "versions": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                           "triton": __import__("triton").__version__,
                           "transformers": __import__("transformers").__version__},
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM, "layers": LAYERS, "dtype": "bfloat16"},
              "copy_bandwidth_gb_s": round(bandwidth, 1), "cases": []}
    for slots, fill in CASES:
        if args.deadline_s is not None and time.perf_counter() - launched > args.deadline_s:
            result["cases"].append({"slots": slots, "filled": fill, "skipped": "deadline"})
            continue
        result["cases"].append(measure_case(slots, fill, args, scale, bandwidth))
        torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - launched, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ncopy bandwidth {result['copy_bandwidth_gb_s']} GB/s; us a layer (x32 a step), max abs error vs fp64")
    for case in result["cases"]:
        if "arms" not in case:
            continue
        print(f"{case['slots']} slots, {case['filled']} filled: bound {case['bound_us_a_layer']} us "
              f"({case['all_slots_bound_us_a_layer']} reading every slot)")
        for name, arm in case["arms"].items():
            if "us_a_layer" in arm:
                print(f"  {name:22s} {arm['us_a_layer']:8.2f} us  {arm['us_a_step']:8.1f} us a step  "
                      f"x{arm.get('speedup_over_grouped_compiled', '')}  error {arm['max_abs_error']:.2e}")
            else:
                print(f"  {name:22s} {arm['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
