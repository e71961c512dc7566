"""The NI predictions step: instances/s of `birbal.data.inference.BaseModelPredictor` against the path it replaced
(`generate` on 8 prompts at a time in task order), on the same random-weight model and prompts, one run.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    PYTHONPATH=src python benchmarks/ni_predictions.py --out benchmarks/results/ni_predictions.json

A CPU check of the script itself: `--arch tiny --device cpu --instances 24 --baseline-instances 16`.

What it does, in one process:
1. builds a random bf16 model of the Mistral-7B-v0.1 shape on the device (`shapes.MISTRAL_7B`) and the real
   Mistral-7B-v0.1 tokenizer (mistral-common, as the smoke recipe; or `--tokenizer-folder`);
2. makes `--instances` prompts of random vocabulary pieces whose token counts follow a log-normal around
   `--median-prompt-tokens` (the NI prompt of the README: preamble, Definition, every Positive Example, the
   instance; the real distribution over the 462 tasks is not measured here), each answered with 32 new tokens;
3. times, after a warm-up, (a) `baseline`: today's path before this change, batches of 8 in the given order,
   each left-padded through `generate` (the same `generate_batch`), on the first `--baseline-instances` prompts;
   (b) `ours`: `BaseModelPredictor.__call__` with the recipe defaults (length-sorted, 64 rows, 131,072 padded
   tokens a batch) on all prompts; (c) `ours_24gb`: the same with a batch budget that fits a 24 GB card
   (`--budget-24gb` tokens: 14.5 GB of bf16 weights leave about 8 GB, 128 KiB of KV cache a token); (d) the
   prefill share of (c) (`max_new_tokens=1`), for the 4090 projection;
4. projects the hours for `--total-instances` (462 tasks, on the order of a million; pass the real count when
   known): one H200 (measured rate), 8 H200s (the tasks split over 8 processes; assumed linear: the processes share
   nothing), one RTX 4090 (not measured: the 24 GB arm's prefill time scaled by the dense bf16 tensor throughput
   ratio, its decode time by the memory bandwidth ratio, spec-sheet numbers in SPECS).

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
    parser.add_argument("--budget-24gb", type=int, default=49152, help="padded tokens a batch on a 24 GB card")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-folder", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ni_bench"))
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, MistralConfig

    from birbal.config.data import NIPredictions
    from birbal.data.inference import BaseModelPredictor

    device = torch.device(args.device)
    res: dict = {"benchmark": "ni_predictions", "argv": sys.argv[1:], "python": platform.python_version(),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arms": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")

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

    # warm-up: kernels, allocator, one batch of each width class
    warm = BaseModelPredictor.from_model(model, tokenizer, defaults)
    warm(prompts[:8])

    def baseline() -> list[str]:
        p = BaseModelPredictor.from_model(model, tokenizer, defaults)
        out: list[str] = []
        subset = prompts[:args.baseline_instances]
        for start in range(0, len(subset), 8):
            out.extend(p.generate_batch(p.encode(subset[start:start + 8])))
        return out

    arms = [("baseline", baseline, args.baseline_instances),
            ("ours", lambda: BaseModelPredictor.from_model(model, tokenizer, defaults)(prompts), len(prompts)),
            ("ours_24gb", lambda: BaseModelPredictor.from_model(
                model, tokenizer, defaults.model_copy(update={"max_batch_tokens": args.budget_24gb}))(prompts),
             len(prompts)),
            ("ours_24gb_prefill", lambda: BaseModelPredictor.from_model(
                model, tokenizer, defaults.model_copy(update={"max_batch_tokens": args.budget_24gb,
                                                              "max_new_tokens": 1}))(prompts), len(prompts))]
    outputs: dict[str, list[str]] = {}
    for name, fn, count in arms:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out, seconds = timed(fn, device)
        outputs[name] = out  # type: ignore[assignment]
        res["arms"][name] = {"instances": count, "seconds": round(seconds, 3),
                             "instances_per_s": round(count / seconds, 3)}
        if device.type == "cuda":
            res["arms"][name]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        save()
        gc.collect()

    base, ours = res["arms"]["baseline"], res["arms"]["ours"]
    res["speedup_ours_over_baseline"] = round(ours["instances_per_s"] / base["instances_per_s"], 2)
    n = args.baseline_instances
    res["same_text_as_baseline"] = sum(a == b for a, b in zip(outputs["baseline"], outputs["ours"][:n],
                                                              strict=True))
    total = args.total_instances
    small, prefill = res["arms"]["ours_24gb"], res["arms"]["ours_24gb_prefill"]
    prefill_s = prefill["seconds"]
    decode_s = max(small["seconds"] - prefill_s, 0.0)
    h, g = SPECS["h200_sxm"], SPECS["rtx_4090"]
    per_4090 = prefill_s * h["bf16_tflops"] / g["bf16_tflops"] + decode_s * h["bandwidth_gb_s"] / g["bandwidth_gb_s"]
    hours = lambda seconds_per_instance: round(total * seconds_per_instance / 3600, 2)  # noqa: E731
    res["projection"] = {
        "total_instances": total,
        "assumptions": ("prompt lengths as generated here, not measured on the 462 tasks; 8 H200s: the tasks split "
                        "over 8 processes with linear scaling; RTX 4090: not measured, the 24 GB-budget arm's prefill "
                        "time x the bf16 TFLOPS ratio plus its decode time x the bandwidth ratio (SPECS)"),
        "specs": SPECS, "kv_bytes_per_token_7b": KV_BYTES_PER_TOKEN_7B,
        "hours": {
            "baseline_batch8_1x_h200": hours(base["seconds"] / base["instances"]),
            "ours_1x_h200": hours(ours["seconds"] / ours["instances"]),
            "ours_8x_h200": hours(ours["seconds"] / ours["instances"] / 8),
            "ours_1x_rtx4090_projected": hours(per_4090 / small["instances"]),
            "baseline_batch8_1x_rtx4090_projected": hours(
                base["seconds"] / base["instances"] * h["bandwidth_gb_s"] / g["bandwidth_gb_s"]),
        }}
    save()
    print(json.dumps({k: res[k] for k in ("arms", "speedup_ours_over_baseline", "projection")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
