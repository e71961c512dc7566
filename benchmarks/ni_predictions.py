"""The NI predictions step: instances/s of `birbal.data.inference.BaseModelPredictor`'s static engine (the
default, `ni_predictions.engine: static`) against `generate` (`engine: generate`, length-sorted batches) and the
path before both (`generate` on 8 prompts at a time in task order), on the same random-weight model and prompts,
one run.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    PYTHONPATH=src python benchmarks/ni_predictions.py --out benchmarks/results/ni_predictions.json

A CPU check of the script itself: `--arch tiny --device cpu --instances 24 --baseline-instances 16`.

What it does, in one process:
1. builds a random bf16 model of the Mistral-7B-v0.1 shape on the device (`shapes.MISTRAL_7B`) and the real
   Mistral-7B-v0.1 tokenizer (mistral-common, as the smoke recipe; or `--tokenizer-folder`);
2. makes `--instances` prompts of random vocabulary pieces whose token counts follow a log-normal around
   `--median-prompt-tokens` (the NI prompt of the README: preamble, Definition, every Positive Example, the
   instance; the real distribution over the 462 tasks is not measured here), each answered with 32 new tokens;
3. times, after a warm-up, in this order (a deadline, `--deadline-s`, skips the arms it would not finish):
   (a) `static`: `BaseModelPredictor.__call__` with the recipe defaults (static engine, CUDA graphs per bucketed
   shape, grouped decode attention, 64 rows and 49,152 padded tokens a batch, prefilled in chunks of 16,384
   prompt tokens: a 24 GB card's budget, 14.5 GB of bf16 weights leaving about 8 GB, 128 KiB of KV cache a token;
   its peak memory says whether it fits) on all prompts; its graph captures
   are timed inside it and reported (`capture_s`: once per shape per process, so `warm_instances_per_s` leaves
   them out); (b) `static_sdpa`: the same with `decode_attention: sdpa`;
   (c) `generate_sorted`: `engine: generate` with the same batches (the step before this engine);
   (d) `baseline`: batches of 8 in the given order through `generate` (the path before both), on the first
   `--baseline-instances` prompts;
   (e) `static_prefill`: the prefill share of (a) (`max_new_tokens=1`), for the 4090 projection; (f)
   `static_large`: (a) with `--large-budget` padded tokens a batch in one prefill forward (the defaults until the
   eighth session: 41 GiB on an H200, no faster there than (a));
4. projects the hours for `--total-instances` (462 tasks, on the order of a million; pass the real count when
   known): one H200 (measured rate, graph captures left out), 8 H200s (the tasks split over 8 processes; assumed
   linear: the processes share nothing), one RTX 4090 (not measured: (a)'s prefill time, (e), scaled by the
   dense bf16 tensor throughput ratio, its decode time by the memory bandwidth ratio, spec-sheet numbers in SPECS).

Every figure comes from this one run; the projections say what they assume in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

from shapes import MISTRAL_7B  # benchmarks/ is the script's folder, so on sys.path
from train_throughput import memory  # peak memory, pool and device-wide, as training reports it

TINY = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=4096, rope_theta=10000.0, max_position_embeddings=4096,
            rms_norm_eps=1e-5)
# Spec-sheet figures (dense, no sparsity): bf16 tensor TFLOPS with fp32 accumulate, memory bandwidth GB/s.
SPECS = {"h200_sxm": {"bf16_tflops": 989.0, "bandwidth_gb_s": 4800.0},
         "rtx_4090": {"bf16_tflops": 165.2, "bandwidth_gb_s": 1008.0}}
KV_BYTES_PER_TOKEN_7B = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16: 128 KiB


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_tokenizer(cache: Path, folder: Path | None):
    if folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from birbal.config import load_recipe
    from birbal.models import load_tokenizer as load

    return load(load_recipe("smoke").model.tokenizer, cache)


def make_prompts(tokenizer, n: int, median: int, sigma: float, cap: int, seed: int) -> list[str]:
    """Texts of random vocabulary pieces; lengths log-normal around `median` tokens, within [32, cap]."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(3, tokenizer.vocab_size) if i not in special]
    prompts = []
    for _ in range(n):
        length = min(cap, max(32, int(round(median * math.exp(rng.gauss(0.0, sigma))))))
        prompts.append(tokenizer.decode([rng.choice(vocab) for _ in range(length)]))
    return prompts


def timed(fn, device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def table(res: dict) -> str:
    """The arms as a Markdown table."""
    lines = ["| arm | instances | s | instances/s | warm instances/s | graphs (capture s) "
             "| peak GiB allocated / reserved / device-wide |", "|---|---|---|---|---|---|---|"]
    for name, arm in res["arms"].items():
        if "seconds" not in arm:
            lines.append(f"| {name} | {arm.get('skipped', arm.get('error', ''))} | | | | | |")
            continue
        graphs = f"{arm['graphs_captured']} ({arm['capture_s']})" if "graphs_captured" in arm else ""
        lines.append(f"| {name} | {arm['instances']} | {arm['seconds']} | {arm['instances_per_s']} | "
                     f"{arm.get('warm_instances_per_s', '')} | {graphs} | "
                     f"{arm.get('peak_memory_gib', '')} / {arm.get('peak_reserved_gib', '')} / "
                     f"{arm.get('device_peak_gib_estimate', '')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", choices=["mistral7b", "tiny"], default="mistral7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--instances", type=int, default=512, help="prompts for the batched arms")
    parser.add_argument("--baseline-instances", type=int, default=128, help="the first N prompts for batch 8")
    parser.add_argument("--median-prompt-tokens", type=int, default=600)
    parser.add_argument("--sigma", type=float, default=0.6, help="log-normal spread of prompt lengths")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--total-instances", type=int, default=1_000_000,
                        help="instances over the 462 tasks, for the projection (not measured here)")
    parser.add_argument("--large-budget", type=int, default=131072,
                        help="padded tokens a batch, one prefill forward, for the static_large arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-folder", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ni_bench"))
    parser.add_argument("--deadline-s", type=float, default=240.0,
                        help="seconds from the start after which no arm starts (each needs --arm-reserve-s)")
    parser.add_argument("--arm-reserve-s", type=float, default=30.0)
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="limit PyTorch's pool to this many GiB (torch.cuda.set_per_process_memory_fraction, as "
                             "benchmarks/train_throughput.py caps itself), e.g. 24 for an RTX 4090's card; an arm "
                             "that needs more fails with an out-of-memory error, recorded as that arm's result")
    parser.add_argument("--arms", default=None,
                        help="comma-separated arms to run (default: all); the batch-8 baseline always runs")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, MistralConfig

    from birbal.config.data import NIPredictions
    from birbal.data.inference import BaseModelPredictor

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the memory calls below want an index
        device = torch.device("cuda", torch.cuda.current_device())
    res: dict = {"benchmark": "ni_predictions", "argv": sys.argv[1:], "python": platform.python_version(),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arms": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")

    if args.cap_gib is not None:
        if device.type != "cuda":
            parser.error("--cap-gib: only on a CUDA device")
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
        res["cap_gib"] = args.cap_gib
    arch = MISTRAL_7B if args.arch == "mistral7b" else TINY
    tokenizer = load_tokenizer(args.workdir / "cache", args.tokenizer_folder)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MistralConfig(**arch, bos_token_id=1, eos_token_id=2,
                                                               tie_word_embeddings=False),
                                                 dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    res["model"] = {"arch": args.arch, "parameters": sum(p.numel() for p in model.parameters()),
                    "build_s": round(time.perf_counter() - t0, 1), "dtype": str(next(model.parameters()).dtype)}
    prompts = make_prompts(tokenizer, args.instances, args.median_prompt_tokens, args.sigma, args.max_prompt_tokens,
                           args.seed)
    defaults = NIPredictions(max_prompt_tokens=args.max_prompt_tokens)
    lengths = [len(ids) for ids in BaseModelPredictor.from_model(model, tokenizer, defaults).encode(prompts)]
    res["prompts"] = {"count": len(prompts), "tokens_mean": round(sum(lengths) / len(lengths), 1),
                      "tokens_min": min(lengths), "tokens_max": max(lengths),
                      "tokens_median": sorted(lengths)[len(lengths) // 2], "new_tokens": defaults.max_new_tokens}
    save()

    # warm-up: kernels, allocator
    warm = BaseModelPredictor.from_model(model, tokenizer, defaults.model_copy(update={"engine": "generate"}))
    warm(prompts[:8])
    del warm

    def baseline() -> list[str]:
        p = BaseModelPredictor.from_model(model, tokenizer, defaults.model_copy(update={"engine": "generate"}))
        out: list[str] = []
        subset = prompts[:args.baseline_instances]
        for start in range(0, len(subset), 8):
            out.extend(p.generate_batch(p.encode(subset[start:start + 8])))
        return out

    arms = [("static", {}, len(prompts)),
            ("static_sdpa", {"decode_attention": "sdpa"}, len(prompts)),
            ("generate_sorted", {"engine": "generate"}, len(prompts)),
            ("baseline", None, args.baseline_instances),
            ("static_prefill", {"max_new_tokens": 1}, len(prompts)),
            ("static_large", {"max_batch_tokens": args.large_budget, "max_prefill_tokens": None}, len(prompts))]
    if args.arms:
        wanted = set(args.arms.split(",")) | {"baseline"}
        unknown = wanted - {name for name, _, _ in arms}
        if unknown:
            parser.error(f"--arms: unknown {sorted(unknown)}; known: {[name for name, _, _ in arms]}")
        arms = [arm for arm in arms if arm[0] in wanted]
    outputs: dict[str, list[str]] = {}
    for name, update, count in arms:
        elapsed = time.perf_counter() - started
        if elapsed + args.arm_reserve_s > args.deadline_s:
            res["arms"][name] = {"skipped": f"deadline: {elapsed:.0f} s of {args.deadline_s} s gone"}
            save()
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        predictor = None
        if update is None:
            fn = baseline
        else:
            predictor = BaseModelPredictor.from_model(model, tokenizer, defaults.model_copy(update=update))
            fn = lambda p=predictor: p(prompts)  # noqa: E731
        try:
            out, seconds = timed(fn, device)
        except torch.OutOfMemoryError as err:  # under --cap-gib: the arm does not fit; the others still run
            res["arms"][name] = {"error": f"OutOfMemoryError: {str(err).splitlines()[0][:300]}", **memory(device)}
            model.config._attn_implementation = "sdpa"
            del predictor, fn
            gc.collect()
            save()
            continue
        outputs[name] = out  # type: ignore[assignment]
        arm = res["arms"][name] = {"instances": count, "seconds": round(seconds, 3),
                                   "instances_per_s": round(count / seconds, 3)}
        engine = predictor._engine if predictor is not None else None
        if engine is not None:
            warm_s = seconds - engine.capture_s
            arm.update({"graphs_captured": engine.captured, "capture_s": round(engine.capture_s, 3),
                        "warm_seconds": round(warm_s, 3), "warm_instances_per_s": round(count / warm_s, 3),
                        "shapes": sorted(engine._shapes)})
        arm.update(memory(device))
        if device.type == "cuda":
            arm["peak_memory_gib"] = arm["peak_allocated_gib"]
            if args.cap_gib is not None:
                arm["device_peak_within_cap"] = arm["device_peak_gib_estimate"] <= args.cap_gib
        model.config._attn_implementation = "sdpa"  # undo the grouped attention's switch for the arms after it
        del predictor, engine, fn
        gc.collect()
        save()

    arms_done = {k: v for k, v in res["arms"].items() if "seconds" in v}

    def same(a: str, b: str) -> int | None:
        if a not in outputs or b not in outputs:
            return None
        n = min(len(outputs[a]), len(outputs[b]))
        return sum(x == y for x, y in zip(outputs[a][:n], outputs[b][:n], strict=True))

    res["same_text"] = {"static_vs_generate_sorted": same("static", "generate_sorted"),
                        "static_vs_baseline": same("static", "baseline"),
                        "static_vs_static_sdpa": same("static", "static_sdpa"),
                        "generate_sorted_vs_baseline": same("generate_sorted", "baseline"),
                        "note": "bf16 on random weights: near-tied logits, so float rounding (a kernel, a padded "
                                "width, masked slots) flips tokens; the CPU fp32 tests check equality"}

    def rate(name: str, warm: bool = True) -> float | None:
        arm = arms_done.get(name)
        if arm is None:
            return None
        return arm["instances"] / (arm.get("warm_seconds", arm["seconds"]) if warm else arm["seconds"])

    res["speedup"] = {f"{a}_over_{b}": round(rate(a) / rate(b), 2)
                      for a in ("static", "static_sdpa") for b in ("generate_sorted", "baseline")
                      if rate(a) and rate(b)}
    total = args.total_instances
    h, g = SPECS["h200_sxm"], SPECS["rtx_4090"]
    hours = {}
    for name in ("baseline", "generate_sorted", "static", "static_sdpa"):
        if rate(name):
            hours[f"{name}_1x_h200"] = round(total / rate(name) / 3600, 2)
            hours[f"{name}_8x_h200"] = round(total / rate(name) / 8 / 3600, 2)
    if "baseline" in arms_done:
        base = arms_done["baseline"]
        hours["baseline_1x_rtx4090_projected"] = round(
            total * base["seconds"] / base["instances"] * h["bandwidth_gb_s"] / g["bandwidth_gb_s"] / 3600, 2)
    if "static" in arms_done and "static_prefill" in arms_done:
        small_arm, prefill = arms_done["static"], arms_done["static_prefill"]
        prefill_s = prefill["seconds"]
        decode_s = max(small_arm["warm_seconds"] - prefill_s, 0.0)
        per_4090 = (prefill_s * h["bf16_tflops"] / g["bf16_tflops"]
                    + decode_s * h["bandwidth_gb_s"] / g["bandwidth_gb_s"])
        hours["static_1x_rtx4090_projected"] = round(total * per_4090 / small_arm["instances"] / 3600, 2)
    elif "static" in arms_done:  # no prefill/decode split: the two scalings bound it
        warm = arms_done["static"]["warm_seconds"] / arms_done["static"]["instances"]
        ratios = sorted((h["bandwidth_gb_s"] / g["bandwidth_gb_s"], h["bf16_tflops"] / g["bf16_tflops"]))
        hours["static_1x_rtx4090_projected_bounds"] = [round(total * warm * r / 3600, 2) for r in ratios]
    res["projection"] = {
        "total_instances": total,
        "assumptions": ("prompt lengths as generated here, not measured on the 462 tasks; static arms at their warm "
                        "rate (graph captures, once per bucketed shape per process, left out: capture_s says what "
                        "they cost here); 8 H200s: the tasks split over 8 processes with linear scaling; RTX 4090: "
                        "not measured, the static arm's prefill time (static_prefill; the defaults are a 24 GB "
                        "card's budget) x the bf16 TFLOPS ratio plus its decode time x the bandwidth ratio (SPECS); "
                        "the baseline's whole time x the bandwidth ratio"),
        "specs": SPECS, "kv_bytes_per_token_7b": KV_BYTES_PER_TOKEN_7B, "hours": hours}
    save()
    print(json.dumps({k: res[k] for k in ("arms", "same_text", "speedup", "projection")}, indent=2))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
