"""Training throughput and memory of the 4-bit QLoRA recipe: the plain stack (baseline) against birbal.train.

Run on a GPU machine, from the repository root, with `src` on PYTHONPATH:

    PYTHONPATH=src python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json

What it does, all in one run so the figures compare like with like:
1. builds a random-weight model of the real Mistral-7B-v0.1 shape (bf16, built on the GPU) and saves it once as
   safetensors under --workdir; every variant reloads it in 4-bit NF4 (double quant, bf16 compute);
2. runs each variant in its own subprocess (a clean CUDA context: an OOM or a crash in one cannot leak memory or
   state into the next, and each reports its own peak), under a per-process GPU memory cap of --cap-gib (24 GiB,
   an RTX 4090) except the one baseline run that is left uncapped to show its peak;
3. times --timed optimiser steps after --warmup steps, grad accumulation 1 micro batch of 2 x 8192 for the full
   rows; on the length mix both sides train on the same examples per optimiser step (see `mix_steps`).

Variants
- baseline: what the challenge's sample submissions ran: AutoModelForCausalLM in 4-bit, peft
  `prepare_model_for_kbit_training` (non-reentrant checkpointing), LoRA r=128/alpha=256 on the 7 projections,
  `model(input_ids, attention_mask, labels).loss` over full logits, bf16 autocast, bnb PagedAdamW32bit.
  On the length mix it pads each micro batch of 2 examples to its longest example (no packing).
- ours: `birbal.train.model.build_qlora_model` + `response_loss_sum` + per-example NEFTune + bf16 autocast +
  PagedAdamW32bit on rows packed by `birbal.train.packing.pack_examples` (position ids reset per example).
- ours_full / ours_mix run SDPA (the attention switched after loading); *_flex run the birbal-4090 profile's own
  flex_attention (block-sparse: packed examples' masked blocks are skipped).
- *_compiled: the same with `train.torch_compile=true` (each decoder layer compiled; the first step compiles).
- *_uncheckedN: the same with `train.unchecked_layers=N` (the last N layers not checkpointed: memory for speed).
- ours_bin16k_*: birbal-4090 as it trains (flex, compiled, 2 unchecked) at its own shape, one 16,384-token
  multipack bin per micro batch (full rows: two 8192-token examples in the bin); *_offloadK adds
  `train.offload_layers=K` (K checkpointed layers keep their saved tensors in pinned host memory instead of a
  recompute); *_norecompute_uncapped keeps every layer's activations on the GPU (~64 GiB, no cap): the step with
  no recompute at all, the ceiling the offload approaches where the link keeps up.
- The JSON's `rtx4090_offload_projection`: a 4090's step for K offloaded layers from this run's figures (see
  `rtx4090_offload_projection`: compute scaled by 165/790, the offloaded bytes over an assumed 25 GB/s link).

Synthetic data (no tokenizer needed): random token ids; example lengths lognormal with median 350 tokens and
sigma 0.9 (mean ~525), clipped to [24, 8192]; the first 35-65% of each example is the prompt (masked), the rest
the response (labelled). The full-row variants use single examples of exactly 8192 tokens, half labelled.

MFU: birbal.train.metrics.flops_per_token (4N per token for the frozen base plus causal attention over each
token's own example within the model's sliding window, `sliding_window` in each result: 4,097 keys for ours as
upstream's flash-attention window, 4,096 for the plain stack; before 2026-12-02 the window was left out, which
counted an 8,192-token row's 3,073 keys a token as 4,097 and overstated its MFU by about 5%; recomputation and
padding not counted) x useful tokens/s / 790 TFLOP/s (the H200's
measured bf16 matmul rate here).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from shapes import MISTRAL_7B  # benchmarks/ is the script's folder, so on sys.path

RESULT_MARK = "@@RESULT "
PHASE_MARK = "@@PHASE "  # one setting of a PHASES run, printed as it ends: kept if the worker then runs out of time
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIX_MEDIAN, MIX_SIGMA, MIX_MIN = 350, 0.9, 24
PROMPT_FRACTION = (0.35, 0.65)

TINY = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=256, rope_theta=10000.0, max_position_embeddings=4096,
            rms_norm_eps=1e-5)

# name -> (implementation, data, capped, attention, torch_compile, unchecked layers, offloaded layers, row shape);
# run in this order, most important first. Row shape "2x8192": a micro batch of 2 rows of 8192 tokens;
# "1x16384": birbal-4090's own, one multipack bin of 16,384 tokens per micro batch (full rows: two 8192-token
# examples in it, attending only to themselves; the mix: packed into 16,384-token rows).
VARIANTS = {
    "ours_full": ("ours", "full", True, "sdpa", False, 0, 0, "2x8192"),
    "ours_mix": ("ours", "mix", True, "sdpa", False, 0, 0, "2x8192"),
    "baseline_full_uncapped": ("baseline", "full", False, "sdpa", False, 0, 0, "2x8192"),
    "baseline_mix": ("baseline", "mix", True, "sdpa", False, 0, 0, "2x8192"),
    "baseline_full": ("baseline", "full", True, "sdpa", False, 0, 0, "2x8192"),
    "ours_mix_flex": ("ours", "mix", True, "flex_attention", False, 0, 0, "2x8192"),
    "ours_full_flex": ("ours", "full", True, "flex_attention", False, 0, 0, "2x8192"),
    "ours_full_flex_compiled": ("ours", "full", True, "flex_attention", True, 0, 0, "2x8192"),
    "ours_mix_flex_compiled": ("ours", "mix", True, "flex_attention", True, 0, 0, "2x8192"),
    # train.unchecked_layers: the last N layers keep their activations (no recompute), inside the cap's headroom
    "ours_full_flex_compiled_unchecked1": ("ours", "full", True, "flex_attention", True, 1, 0, "2x8192"),
    "ours_full_flex_compiled_unchecked2": ("ours", "full", True, "flex_attention", True, 2, 0, "2x8192"),
    "ours_full_flex_compiled_unchecked3": ("ours", "full", True, "flex_attention", True, 3, 0, "2x8192"),
    "ours_mix_flex_compiled_unchecked2": ("ours", "mix", True, "flex_attention", True, 2, 0, "2x8192"),
    # birbal-4090 as it trains (flex, compiled, 2 unchecked) at its own shape, one 16,384-token bin a micro batch
    "ours_bin16k_full": ("ours", "full", True, "flex_attention", True, 2, 0, "1x16384"),
    "ours_bin16k_mix": ("ours", "mix", True, "flex_attention", True, 2, 0, "1x16384"),
    # train.offload_layers=K: K of the 30 checkpointed layers run unchecked, their saved tensors in pinned host
    # memory (copy streams, one offloaded layer prefetched ahead)
    "ours_bin16k_full_offload6": ("ours", "full", True, "flex_attention", True, 2, 6, "1x16384"),
    "ours_bin16k_full_offload10": ("ours", "full", True, "flex_attention", True, 2, 10, "1x16384"),
    "ours_bin16k_full_offload15": ("ours", "full", True, "flex_attention", True, 2, 15, "1x16384"),
    "ours_bin16k_full_offload20": ("ours", "full", True, "flex_attention", True, 2, 20, "1x16384"),
    "ours_bin16k_full_offload30": ("ours", "full", True, "flex_attention", True, 2, 30, "1x16384"),
    "ours_bin16k_mix_offload10": ("ours", "mix", True, "flex_attention", True, 2, 10, "1x16384"),
    "ours_bin16k_mix_offload15": ("ours", "mix", True, "flex_attention", True, 2, 15, "1x16384"),
    "ours_bin16k_mix_offload20": ("ours", "mix", True, "flex_attention", True, 2, 20, "1x16384"),
    # no recompute at all, every layer's activations on the GPU (~64 GiB, so uncapped): the compute-only
    # ceiling the offload approaches when PCIe keeps up (the basis of the 4090 projection with offload)
    "ours_bin16k_full_norecompute_uncapped": ("ours", "full", False, "flex_attention", True, 32, 0, "1x16384"),
    "ours_bin16k_mix_norecompute_uncapped": ("ours", "mix", False, "flex_attention", True, 32, 0, "1x16384"),
}

# One loaded, compiled model measured at several train.offload_layers settings in turn (offload.set_active: the
# layers keep their class, nothing is compiled again): name -> (the VARIANTS entry it runs, the counts, in order).
# The first setting pays the compile in its warm-up (--warmup steps); each later one gets one warm-up step.
PHASES = {
    "ours_bin16k_full_phases15": ("ours_bin16k_full_offload15", (0, 8, 15)),
    "ours_bin16k_full_phases12": ("ours_bin16k_full_offload12", (0, 6, 12)),
    "ours_bin16k_full_phases10": ("ours_bin16k_full_offload10", (0, 5, 10)),
    "ours_bin16k_mix_phases12": ("ours_bin16k_mix_offload12", (0, 6, 12)),
}
VARIANTS["ours_bin16k_full_offload12"] = ("ours", "full", True, "flex_attention", True, 2, 12, "1x16384")
VARIANTS["ours_bin16k_mix_offload12"] = ("ours", "mix", True, "flex_attention", True, 2, 12, "1x16384")


# train.down_proj_outside_checkpoint: name -> the VARIANTS entry it runs with that switch on (the recompute skips
# each checkpointed layer's down-projection product; the same maths, tests/test_train_model.py). Every variant
# sets the switch: the VARIANTS entries run with it off, as birbal-4090 trained until 2026-12-03; since then
# birbal-4090 trains as `ours_bin16k_full_downout` (`_mix_downout` on the length mix).
DOWN_OUTSIDE = {
    "ours_bin16k_full_downout": "ours_bin16k_full",
    "ours_bin16k_mix_downout": "ours_bin16k_mix",
    "ours_bin16k_full_offload15_downout": "ours_bin16k_full_offload15",
    "ours_bin16k_mix_offload15_downout": "ours_bin16k_mix_offload15",
}
# the offload settings beside the switch birbal-4090 trains with, in one load each (2026-12-05: after the offload's
# fetched-back tensors moved to the compute stream's pool)
PHASES["ours_bin16k_full_phases15_downout"] = ("ours_bin16k_full_offload15_downout", (0, 8, 15))
PHASES["ours_bin16k_mix_phases15_downout"] = ("ours_bin16k_mix_offload15_downout", (0, 8, 15))


def spread_subset(members: list[int], count: int) -> list[int]:
    """`count` of the installed offload layers, spread over them."""
    return [] if count <= 0 else sorted({members[int((i + 0.5) * len(members) / count)] for i in range(count)})


_T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


# ---- synthetic data ------------------------------------------------------------------------------------------
def synthetic_example(rng, length: int, vocab: int):
    import numpy as np

    from birbal.train.packing import IGNORE_INDEX, Example

    ids = rng.integers(3, vocab, size=length, dtype=np.int32)
    ids[0], ids[-1] = 1, 2  # BOS ... EOS
    labels = ids.copy()
    prompt = max(1, int(round(length * rng.uniform(*PROMPT_FRACTION))))
    labels[:prompt] = IGNORE_INDEX
    return Example(ids, labels)


def mix_examples(seed: int, count: int, seq_len: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(MIX_MEDIAN), MIX_SIGMA, size=count)), MIX_MIN, seq_len)
    return [synthetic_example(rng, int(n), vocab) for n in lengths]


def full_rows(seed: int, count: int, seq_len: int, vocab: int, per_row: int = 1):
    """Rows of `per_row` examples each, every example exactly seq_len tokens, about half of it labelled (per_row 2:
    birbal-4090's 16,384-token bin holding two 8192-token examples)."""
    import numpy as np

    from birbal.train.packing import IGNORE_INDEX, Example, pack_examples

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        examples = []
        for _ in range(per_row):
            ex = synthetic_example(rng, seq_len, vocab)
            labels = ex.labels.copy()
            labels[: seq_len // 2] = IGNORE_INDEX
            labels[seq_len // 2:] = ex.input_ids[seq_len // 2:]
            examples.append(Example(ex.input_ids, labels))
        packed, _ = pack_examples(examples, seq_len * per_row, pad_id=2)
        assert len(packed) == 1
        rows.extend(packed)
    return rows


def mix_steps(seed: int, steps: int, micro_batch: int, seq_len: int, vocab: int, bin_len: int | None = None):
    """Packed rows per step (ours: one micro batch of `micro_batch` packed rows per optimiser step), and the same
    examples, in the same order, for the baseline (micro batches of `micro_batch` examples, each padded to its
    longest, all accumulated into one optimiser step): both sides see the same tokens per optimiser step."""
    from birbal.train.packing import Example, pack_examples

    need = steps * micro_batch
    count = max(64, need * (bin_len or seq_len) // 300)
    # examples up to seq_len; rows of bin_len (birbal-4090: 16,384-token bins, one per micro batch)
    rows, dropped = pack_examples(mix_examples(seed, count, seq_len, vocab), bin_len or seq_len, pad_id=2)
    assert len(rows) >= need + 1, (len(rows), need)
    rows = rows[:need]  # the last row of a packing is part-filled; it is never among the first `need`
    out = []
    for s in range(steps):
        step_rows = rows[s * micro_batch:(s + 1) * micro_batch]
        examples = []
        for row in step_rows:
            start_of = 0
            for n in row.example_lengths:
                examples.append(Example(row.input_ids[start_of:start_of + n], row.labels[start_of:start_of + n]))
                start_of += n
        out.append((step_rows, examples))
    return out, dropped


def pad_batch(pairs, device):
    """Right-padded batch of (input_ids, labels) arrays with a 2D attention mask, as a plain collator builds it."""
    import torch

    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), 2, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, :len(ids)] = torch.from_numpy(ids)
        labels[i, :len(ids)] = torch.from_numpy(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


# ---- models --------------------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, arch: dict, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    if (folder / "config.json").is_file():
        return {"checkpoint_build_s": 0.0, "checkpoint": str(folder), "reused": True}
    t0 = time.perf_counter()
    config = MistralConfig(**arch, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    size = sum(f.stat().st_size for f in folder.iterdir())
    return {"checkpoint_build_s": round(time.perf_counter() - t0, 1), "checkpoint": str(folder),
            "checkpoint_gib": round(size / 2**30, 2), "parameters": sum(p.numel() for p in model.parameters())}


def load_baseline(checkpoint: Path, device, attn: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": str(device)}, attn_implementation=attn)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_ours(checkpoint: Path, workdir: Path, device, attn: str, compiled: bool, unchecked: int, offload: int = 0,
              down_outside: bool = False):
    from birbal.config import load_recipe
    from birbal.train.model import build_qlora_model
    from birbal.train.neftune import PerExampleNEFTune

    recipe = load_recipe("birbal-4090", [f"model.name_or_path={checkpoint}", f"train.torch_compile={compiled}",
                                          f"train.unchecked_layers={unchecked}", f"train.offload_layers={offload}",
                                          f"train.down_proj_outside_checkpoint={down_outside}"])
    model = build_qlora_model(recipe, workdir / "cache", device)
    if attn != recipe.model.attn_implementation:
        # the SDPA variants: the packed-mask cost without flex_attention's block sparsity
        model.get_base_model().set_attn_implementation(attn)
    neftune = PerExampleNEFTune(model.get_input_embeddings(), recipe.train.neftune_noise_alpha)
    return model, neftune, recipe


KERNEL_GROUPS = (  # first match wins; lower-case substrings of CUDA kernel names
    ("4-bit dequantize", ("dequantize", "kdequant", "bnb")),
    ("attention", ("flex", "fmha", "flash", "attention", "efficient", "triton_tem")),
    ("matmul (GEMM)", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "splitk")),
    ("optimizer", ("optimizer", "adam")),
    ("cross-entropy / softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("copies / casts / elementwise", ("elementwise", "copy", "vectorized", "unrolled", "cat", "fill", "reduce",
                                      "triton_", "index", "memcpy", "memset")),
)


def profile_step(step, path: Path) -> dict:
    """One more step under torch.profiler: GPU time by kernel group, and the top kernels (written to `path`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stats = step()
    kernels: dict[str, float] = {}
    for evt in prof.events():  # device-side kernel events only: CPU ops would count their kernels twice
        if evt.device_type == DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.device_time_total
    busy = sum(kernels.values())
    groups: dict[str, float] = {}
    for key, t in kernels.items():
        low = key.lower()
        group = next((g for g, subs in KERNEL_GROUPS if any(x in low for x in subs)), "other")
        groups[group] = groups.get(group, 0.0) + t
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        handle.write(f"step wall {stats['step_s']:.3f} s (profiler on), GPU kernel time {busy / 1e6:.3f} s\n\n")
        for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            handle.write(f"{t / 1e6:8.3f} s {t / busy:6.1%}  {g}\n")
        handle.write("\n")
        for key, t in top:
            handle.write(f"{t / 1e6:8.3f} s {t / busy:6.1%}  {key[:160]}\n")
    return {"step_s_profiled": round(stats["step_s"], 3), "gpu_kernel_s": round(busy / 1e6, 3),
            "by_group_s": {g: round(t / 1e6, 3) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_s": [[k[:120], round(t / 1e6, 3)] for k, t in top[:12]]}


def host_link_gb_per_s(gib: float = 1.0, repeats: int = 4) -> dict:
    """Pinned host <-> GPU copy rates (GB/s), each way alone and both at once: what train.offload_layers moves on."""
    import torch

    n = int(gib * 2**30)
    host_out, host_in = torch.empty(n, dtype=torch.uint8, pin_memory=True), torch.ones(n, dtype=torch.uint8).pin_memory()
    gpu_in, gpu_out = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.ones(n, dtype=torch.uint8, device="cuda")
    d2h, h2d = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(streams) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            for stream, dst, src in streams:
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return n * repeats / (time.perf_counter() - start) / 1e9

    timed([(d2h, host_out, gpu_out)])  # warm-up
    alone_d2h = timed([(d2h, host_out, gpu_out)])
    alone_h2d = timed([(h2d, gpu_in, host_in)])
    both = timed([(d2h, host_out, gpu_out), (h2d, gpu_in, host_in)])  # bytes of one direction per second
    return {"d2h": round(alone_d2h, 1), "h2d": round(alone_h2d, 1), "each_way_when_both": round(both, 1)}


# ---- one variant, in its own process ---------------------------------------------------------------------------
def memory(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    used, reserved, peak_reserved = total - free, torch.cuda.memory_reserved(device), torch.cuda.max_memory_reserved(device)
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(peak_reserved / 2**30, 2),
            # device-wide: PyTorch's pool + CUDA context + bnb's paged (managed) optimizer state when resident
            "device_used_gib_at_end": round(used / 2**30, 2),
            # the same at the pool's peak: what is outside the pool (context, managed memory) plus its peak
            "device_peak_gib_estimate": round((used - reserved + peak_reserved) / 2**30, 2)}


def allocator_counts(device) -> dict:
    """The caching allocator's cumulative counters: `num_alloc_retries` counts the allocations that found no cached
    block, emptied the cache (cudaFree, which synchronizes the device) and tried again, what a pool at the memory
    cap does; cudaMalloc and cudaFree calls beside it. Over the timed steps a steady step makes none."""
    import torch

    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"alloc_retries": stats.get("num_alloc_retries", 0), "cuda_mallocs": stats.get("num_device_alloc", 0),
            "cuda_frees": stats.get("num_device_free", 0)}


def timed_counts(before: dict, after: dict) -> dict:
    """The counters' growth over the timed steps, as `timed_alloc_retries` and so on."""
    return {f"timed_{k}": after[k] - before[k] for k in before if k in after}


def host_memory() -> dict:
    """This process's peak resident host memory (pinned offload buffers included) and the machine's total."""
    import resource

    out = {"host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    try:
        with open("/proc/meminfo") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
        out["host_total_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return out


def run_variant(name: str, args) -> dict:
    import numpy as np
    import torch

    base_name, phase_counts = PHASES.get(name, (name, None))
    down_outside = base_name in DOWN_OUTSIDE
    impl, data, capped, attn, compiled, unchecked, offload, shape = VARIANTS[DOWN_OUTSIDE.get(base_name, base_name)]
    if args.arch == "tiny":  # a CPU dry run of the code paths: 2 layers, eager SDPA
        unchecked = min(unchecked, 1)
        offload = min(offload, TINY["num_hidden_layers"] - unchecked)
        attn, compiled = "sdpa", False

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    arch = MISTRAL_7B if args.arch == "7b" else TINY
    seq, mb = args.seq_len, args.micro_batch
    result: dict = {"variant": name, "implementation": impl, "data": data, "attention": attn, "torch_compile": compiled,
                    "unchecked_layers": unchecked, "offload_layers": offload,
                    "down_proj_outside_checkpoint": down_outside, "row_shape": shape,
                    "cap_gib": args.cap_gib if capped else None, "micro_batch": mb, "sequence_len": seq,
                    "warmup_steps": args.warmup, "timed_steps": args.timed}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        result["gpu"] = torch.cuda.get_device_name(device)
        if capped:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    torch.manual_seed(1234)
    steps = args.warmup + args.timed
    if phase_counts:
        steps += (len(phase_counts) - 1) * (1 + args.timed)
    if impl == "baseline" and data == "mix":
        steps = max(2, args.warmup_mix_baseline + args.timed)
        result["warmup_steps"] = steps - args.timed

    # data first: cheap, and the same for both implementations (same seeds)
    if data == "full" and shape == "1x16384":
        rows = full_rows(7, steps, seq, arch["vocab_size"], per_row=mb)
        plan = [([row], None) for row in rows]
        result["grad_accum"] = 1
    elif data == "full":
        rows = full_rows(7, steps * mb, seq, arch["vocab_size"])
        plan = [(rows[s * mb:(s + 1) * mb], None) for s in range(steps)]
        result["grad_accum"] = 1
    else:
        if shape == "1x16384":
            plan, dropped = mix_steps(11, steps, 1, seq, arch["vocab_size"], bin_len=seq * mb)
        else:
            plan, dropped = mix_steps(11, steps, mb, seq, arch["vocab_size"])
        result["mix"] = {"lengths": f"lognormal median {MIX_MEDIAN} sigma {MIX_SIGMA}, clipped [{MIX_MIN}, {seq}]",
                         "dropped_too_long": dropped,
                         "examples_per_step": [len(ex) for _, ex in plan]}
        result["grad_accum"] = (f"ours 1 (one micro batch of {mb} packed rows); baseline ceil(examples/{mb}) "
                                f"micro batches of {mb} examples padded to their longest, same examples per step")

    t0 = time.perf_counter()
    phase = "load"
    done: list[dict] = []
    window = None
    try:
        if impl == "baseline":
            model = load_baseline(args.checkpoint, device, attn)
            neftune = None
        else:
            model, neftune, _ = load_ours(args.checkpoint, args.workdir, device, attn, compiled, unchecked, offload,
                                          down_outside)
        result["load_s"] = round(time.perf_counter() - t0, 1)
        window = getattr(model.get_base_model().config, "sliding_window", None)
        result["sliding_window"] = window
        trainable = [p for p in model.parameters() if p.requires_grad]
        result["trainable_parameters"] = sum(p.numel() for p in trainable)
        result["trainable_dtypes"] = sorted({str(p.dtype) for p in trainable})
        if device.type == "cuda":
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW32bit(trainable, lr=2e-5, betas=(0.9, 0.999), eps=1e-8,
                                                  weight_decay=0.01)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.01)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        model.train()
        from birbal.train.model import response_loss_sum
        from birbal.train.packing import collate

        def one_step(step_rows, step_examples) -> dict:
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts = time.perf_counter()
            if impl == "ours":
                batch = {k: v.to(device) for k, v in collate(step_rows).items()}
                neftune.example_length = batch["example_length"]
                with autocast:
                    loss_sum, labelled = response_loss_sum(model, batch)
                loss = loss_sum / max(labelled, 1)
                if not done:  # the first step compiles: say how long its forward took, then its backward
                    progress(f"[{name}] first forward done ({time.perf_counter() - ts:.1f} s)")
                loss.backward()
                if not done:
                    progress(f"[{name}] first backward done ({time.perf_counter() - ts:.1f} s)")
                slots = int(batch["input_ids"].numel())
                lengths = [n for r in step_rows for n in r.example_lengths]
                loss_value = float(loss.detach())
            else:
                if step_examples is None:  # full rows: one micro batch of the single-example rows
                    micro = [pad_batch([(r.input_ids, r.labels) for r in step_rows], device)]
                    lengths = [n for r in step_rows for n in r.example_lengths]
                else:
                    micro = [pad_batch([(e.input_ids, e.labels) for e in step_examples[i:i + mb]], device)
                             for i in range(0, len(step_examples), mb)]
                    lengths = [len(e) for e in step_examples]
                slots, loss_value = 0, 0.0
                for batch in micro:
                    with autocast:
                        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"])
                    (out.loss / len(micro)).backward()
                    slots += int(batch["input_ids"].numel())
                    loss_value += float(out.loss.detach()) / len(micro)
                    del out
            torch.nn.utils.clip_grad_norm_(trainable, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return {"step_s": time.perf_counter() - ts, "slots": slots, "useful": sum(lengths),
                    "lengths": lengths, "loss": loss_value}

        progress(f"[{name}] loaded in {result['load_s']} s")
        offloader = getattr(model, "birbal_offload", None)
        # (offload count, warm-up steps) per setting; one setting unless this is a PHASES entry
        settings = ([(k, args.warmup if i == 0 else 1) for i, k in enumerate(phase_counts)] if phase_counts
                    else [(offload, result["warmup_steps"])])
        result["phases"] = []
        s = 0
        for count, warm in settings:
            if phase_counts:
                offloader.set_active(spread_subset(offloader.members, count))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            first = len(done)
            counts_before = allocator_counts(device)
            for i in range(warm + args.timed):
                if i == warm:
                    counts_before = allocator_counts(device)
                phase = f"step {s} (offload {count})"
                done.append(one_step(*plan[s]))
                done[-1]["offload"] = count
                progress(f"[{name}] offload {count} step {s}: {done[-1]['step_s']:.2f} s, loss {done[-1]['loss']:.3f}, "
                         f"{done[-1]['useful']}/{done[-1]['slots']} useful tokens")
                s += 1
            if phase_counts:
                entry = {"offload_layers": count, "offload_indices": offloader.indices, **memory(device),
                         **{k: result[k] for k in ("cap_gib", "row_shape", "data", "unchecked_layers", "load_s")},
                         **summarize(done[first + warm:], arch, window),
                         "step_s_each": [round(d["step_s"], 3) for d in done[first:]],
                         "offload_gib_per_micro_batch": round(offloader.bytes_offloaded / 2**30, 2),
                         "offload_late_fetches": offloader.late_fetches,
                         **timed_counts(counts_before, allocator_counts(device))}
                if device.type == "cuda" and capped:
                    entry["device_peak_within_cap"] = entry.get("device_peak_gib_estimate", 1e9) <= args.cap_gib
                result["phases"].append(entry)
                print(PHASE_MARK + json.dumps(entry), flush=True)
            else:
                result.update(timed_counts(counts_before, allocator_counts(device)))
        if args.profile_dir is not None and device.type == "cuda":
            phase = "profiled step"
            result["profile"] = profile_step(lambda: one_step(*plan[-1]), args.profile_dir / f"profile_{name}.txt")
        result["status"] = "ok"
    except torch.OutOfMemoryError as err:
        result["status"] = "oom"
        result["error"] = f"{phase}: " + str(err).splitlines()[0][:300]
    except Exception as err:  # recorded, not raised: the next variants still run
        result["status"] = "error"
        result["error"] = f"{phase}: {type(err).__name__}: {str(err)[:400]}"
        result["traceback_tail"] = traceback.format_exc()[-1500:]
    result.update(memory(device))
    result.update(host_memory())
    offloader = getattr(model, "birbal_offload", None) if "model" in locals() else None
    if offloader is not None:
        result["offload_indices"] = offloader.indices
        result["offload_gib_per_micro_batch"] = round(offloader.bytes_offloaded / 2**30, 2)
        result["offload_host_peak_gib"] = round(offloader.peak_host_bytes / 2**30, 2)
        result["offload_late_fetches"] = offloader.late_fetches
        # what one offloaded layer saves for its backward (the compiled graph's choice): [shape, dtype, MiB, moved]
        result["offload_layer_saved_tensors"] = [[list(shape), dtype, round(n / 2**20, 1), moved]
                                                 for shape, dtype, n, moved in offloader.first_layer_saved]
    if device.type == "cuda" and capped:
        result["fits_cap"] = result["status"] == "ok"
        result["device_used_within_cap"] = result.get("device_used_gib_at_end", 1e9) <= args.cap_gib
        result["device_peak_within_cap"] = result.get("device_peak_gib_estimate", 1e9) <= args.cap_gib
    elif device.type == "cuda":
        result["would_fit_cap"] = result["status"] == "ok" and result["peak_reserved_gib"] <= args.cap_gib
    result["steps_completed"] = len(done)
    timed = done[result["warmup_steps"]:] if result["status"] == "ok" and not phase_counts else []
    if timed:
        result.update(summarize(timed, arch, window))
        result["step_s_each"] = [round(d["step_s"], 3) for d in done]
        result["losses"] = [round(d["loss"], 4) for d in done]
        if result.get("offload_gib_per_micro_batch"):
            # the host link's rate each way that would move the offloaded bytes within one step
            result["offload_gb_per_s_needed_each_way"] = round(
                result["offload_gib_per_micro_batch"] * 2**30 / 1e9 / result["s_per_step"], 1)
    if phase_counts:
        result["losses"] = [round(d["loss"], 4) for d in done]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if result.get("losses") and not all(np.isfinite(result["losses"])):
        result["status"] = "error"
        result["error"] = "non-finite loss"
    return result


def summarize(timed: list[dict], arch: dict, window: int | None) -> dict:
    """s/step, tokens/s and MFU over the timed steps; `window`: the trained model's sliding window (the keys a
    token may attend to), which the attention term of the MFU counts."""
    from transformers import MistralConfig

    from birbal.train.metrics import flops_per_token, mean_attention_context

    if not timed:
        return {}
    secs = sum(d["step_s"] for d in timed)
    useful = sum(d["useful"] for d in timed)
    context = mean_attention_context([n for d in timed for n in d["lengths"]], window)
    config = MistralConfig(**arch)
    tps_useful = useful / secs
    return {"s_per_step": round(secs / len(timed), 3),
            "tokens_per_s": round(sum(d["slots"] for d in timed) / secs, 1),
            "useful_tokens_per_s": round(tps_useful, 1),
            "useful_fraction": round(useful / sum(d["slots"] for d in timed), 4),
            "mean_attention_context": round(context, 1),
            "flops_per_token": flops_per_token(config, context),
            "mfu_vs_790": round(tps_useful * flops_per_token(config, context) / 790e12, 4),
            "losses": [round(d["loss"], 4) for d in timed]}


def expand_phases(result: dict) -> list[dict]:
    """A PHASES run as one row per setting (variant `name@offloadK`, `equivalent` the single-setting name)."""
    if not result.get("phases"):
        result.pop("phases", None)
        return [result]
    skip = ("phases", "s_per_step", "tokens_per_s", "status", "error", "traceback_tail", "stderr_tail")
    common = {k: v for k, v in result.items() if k not in skip}
    target = PHASES[result["variant"]][0]
    suffix = "_downout" if target in DOWN_OUTSIDE else ""
    base = DOWN_OUTSIDE.get(target, target).rsplit("_offload", 1)[0]
    rows = []
    for phase in result["phases"]:  # each of these settings finished
        k = phase["offload_layers"]
        rows.append({**common, **phase, "status": "ok", "variant": f"{result['variant']}@offload{k}",
                     "equivalent": f"{base}{suffix}" if k == 0 else f"{base}_offload{k}{suffix}"})
    if result.get("status") != "ok":  # what stopped the next setting
        rows.append({"variant": f"{result['variant']}@next", **{k: result[k] for k in skip[3:] if k in result}})
    return rows


# ---- driver ------------------------------------------------------------------------------------------------------
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = None
    return out


def table(results: list[dict]) -> str:
    head = ("| variant | status | s/step | tokens/s | useful tokens/s | MFU (790) | peak alloc / reserved GiB "
            "| device used GiB (end / peak est.) | offload GiB | allocator retries (timed) | cap |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    def cell(r: dict, key: str, fmt: str) -> str:
        return fmt.format(r[key]) if r.get(key) is not None else "—"

    for r in results:
        def f(key, fmt, r=r):
            return cell(r, key, fmt)
        cap = f"{r['cap_gib']:g} GiB" if r.get("cap_gib") else "none"
        lines.append(f"| {r['variant']} | {r['status']} | {f('s_per_step', '{:.2f}')} | {f('tokens_per_s', '{:,.0f}')} "
                     f"| {f('useful_tokens_per_s', '{:,.0f}')} | {f('mfu_vs_790', '{:.1%}')} "
                     f"| {f('peak_allocated_gib', '{:.2f}')} / {f('peak_reserved_gib', '{:.2f}')} "
                     f"| {f('device_used_gib_at_end', '{:.2f}')} / {f('device_peak_gib_estimate', '{:.2f}')} "
                     f"| {f('offload_gib_per_micro_batch', '{:.2f}')} | {f('timed_alloc_retries', '{:d}')} | {cap} |")
    return "\n".join(lines)


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def worker_argv(args, extra: list[str]) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--workdir", str(args.workdir), "--arch", args.arch,
            "--device", args.device, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
            "--warmup", str(args.warmup), "--timed", str(args.timed), "--cap-gib", str(args.cap_gib),
            "--warmup-mix-baseline", str(args.warmup_mix_baseline),
            *(["--profile-dir", str(args.profile_dir)] if args.profile_dir else []), *extra]


def call_worker(argv: list[str], timeout: float) -> dict:
    """Run one worker in its own process group; its stderr is passed through, and its last lines kept for the
    JSON when it fails or runs out of time (the whole group is killed then: Inductor's compile workers too)."""
    import collections
    import signal
    import threading

    tail: collections.deque[str] = collections.deque(maxlen=25)
    stdout: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def relay():
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip()[:300])

    readers = [threading.Thread(target=relay, daemon=True),
               threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for reader in readers:
            reader.join(5)
        # the settings a PHASES run finished before the time ran out
        phases = [json.loads(line[len(PHASE_MARK):]) for line in stdout if line.startswith(PHASE_MARK)]
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s", "stderr_tail": list(tail),
                **({"phases": phases} if phases else {})}
    for reader in readers:
        reader.join(10)
    for line in reversed(stdout):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return {"status": "error", "error": f"worker exited {proc.returncode} without a result",
            "stderr_tail": list(tail)}


# ---- the dataset's size, for the 24-hour projection ------------------------------------------------------------
# The published train_dataset.json (upaya07/NeurIPS-LLM-data) is about 256 MB for about 204k rows (its hub listing,
# as read in issue 15); their combine_datasets.py:211-212 wrote it with json.dump(rows, f, indent=1), ASCII-escaped.
PUBLISHED_TRAIN_BYTES = 256e6
PUBLISHED_TRAIN_ROWS = 204_000
# A 4090's dense bf16 tensor rate with fp32 accumulation (165 TFLOP/s, spec sheet) over the H200's measured 790.
RTX4090_OVER_H200 = 165.0 / 790.0


def published_tokens_estimate(rows: list[dict], tokenizer) -> dict:
    """Tokens an epoch of the published file, from bytes per token measured on `rows` ({question, answer, source}
    in the published schema: the smoke data, built from fixtures of each real source).

    Bytes are counted as the file holds them: each row's two JSON-escaped strings (the row's keys and indentation,
    the same ~38 bytes for every row, are taken off the file size first); tokens as birbal-4090 trains on them
    (upstream tokenisation: BOS + prompt, answer + EOS). The ratio depends on the text: digits tokenise one by
    one (MathInstruct about 2.4 bytes a token), prose about 4-4.7; so the estimate is given for the fixture rows'
    own ratio and for the ratios of their most and least dense sources.
    """
    from collections import defaultdict

    from birbal.train.packing import UpstreamEncoder, tokenize_example

    enc = UpstreamEncoder(tokenizer)
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row in rows:
        q, a = row["question"], row["answer"]
        full = len(json.dumps([{"question": q, "answer": a}], indent=1).encode()) - 4  # without "[\n" and "\n]"
        content = len(json.dumps(q).encode()) + len(json.dumps(a).encode()) - 4
        tokens = len(tokenize_example(tokenizer, q, a, mode="upstream", upstream=enc))
        for key in (row.get("source", "?"), "all"):
            acc = per_source[key]
            acc[0] += full
            acc[1] += content
            acc[2] += tokens
            acc[3] += 1
    overhead = (per_source["all"][0] - per_source["all"][1]) / per_source["all"][3]
    content_bytes = PUBLISHED_TRAIN_BYTES - PUBLISHED_TRAIN_ROWS * overhead
    ratios = {k: v[1] / v[2] for k, v in per_source.items()}
    sources = {k: r for k, r in ratios.items() if k != "all"}
    estimate = {name: round(content_bytes / ratio) for name, ratio in
                (("at_fixture_ratio", ratios["all"]), ("if_all_like_" + min(sources, key=sources.get),
                                                       min(sources.values())),
                 ("if_all_like_" + max(sources, key=sources.get), max(sources.values())))}
    return {"file_bytes": PUBLISHED_TRAIN_BYTES, "rows": PUBLISHED_TRAIN_ROWS,
            "json_overhead_bytes_per_row": round(overhead, 1), "content_bytes": round(content_bytes),
            "content_bytes_per_token": {k: round(r, 3) for k, r in sorted(ratios.items())},
            "fixture_rows": {k: v[3] for k, v in sorted(per_source.items())},
            "tokens_per_epoch": estimate}


def projection(tokens_per_epoch: float, useful_tokens_per_s: float, epochs: float = 3.0,
               budget_h: float = 24.0) -> dict:
    """Hours for `epochs` on the measuring GPU (an H200 here) and on a 4090 (scaled by RTX4090_OVER_H200), and
    the epochs a 4090 gets through in the budget."""
    h200_h = tokens_per_epoch * epochs / useful_tokens_per_s / 3600
    rtx_h = h200_h / RTX4090_OVER_H200
    return {"tokens_per_epoch": round(tokens_per_epoch), "h200_hours": round(h200_h, 2),
            "rtx4090_hours": round(rtx_h, 1), "rtx4090_epochs_in_budget": round(min(epochs, epochs * budget_h / rtx_h), 2)}


# The 4090 with train.offload_layers: the recompute a layer saves scales with compute (RTX4090_OVER_H200), the bytes
# it moves with the host link. Assumed, not measured: an RTX 4090 on PCIe 4.0 x16 copies pinned memory at about
# 25 GB/s each way (31.5 GB/s raw), and the forward is a third of a no-recompute step (2N of 6N FLOP a token: the
# device-to-host copies must fit in it; the host-to-device ones have the backward's two thirds).
RTX4090_PCIE_GBPS = 25.0
FORWARD_SHARE = 1.0 / 3.0
# 3 epochs of the published set: 57-73M tokens an epoch (README, "Projected time for 3 epochs"), 68.5M at the
# fixture rows' bytes per token
EPOCH_TOKENS = {"low": 57e6, "fixture_ratio": 68.5e6, "high": 73e6}


def rtx4090_offload_projection(results: list[dict], budget_h: float = 24.0) -> dict | None:
    """A 4090's step with K offloaded layers from this run's H200 figures at the 16,384-token shape.

    H200 compute with K of the 30 checkpointed layers offloaded: linear between the measured step with every one of
    them recomputed (`ours_bin16k_full_downout`, as birbal-4090 trains, where measured; else `ours_bin16k_full`)
    and the measured step with no recompute at all (`ours_bin16k_full_norecompute_uncapped`), the saved recompute
    being the same for each layer; scaled to the 4090 by RTX4090_OVER_H200. The link: K layers' bytes (measured per
    layer by the offload variants) must cross it within the forward's share of the step. The 4090's step is the
    larger of the two.
    """
    by_name = {r.get("equivalent", r.get("variant")): r for r in results if r.get("status") == "ok"
               and r.get("s_per_step")}
    # the checkpointed step as birbal-4090 trains it (train.down_proj_outside_checkpoint on) where this run measured
    # it, else the switch off
    checked = by_name.get("ours_bin16k_full_downout") or by_name.get("ours_bin16k_full")
    free = by_name.get("ours_bin16k_full_norecompute_uncapped")
    offloaded = [r for r in by_name.values() if r.get("offload_layers") and r.get("offload_gib_per_micro_batch")
                 and r.get("row_shape") == "1x16384" and r.get("data") == "full"]
    if not (checked and free and offloaded):
        return None
    layer_bytes = sum(r["offload_gib_per_micro_batch"] * 2**30 / r["offload_layers"] for r in offloaded) / len(offloaded)
    recomputed = 32 - checked["unchecked_layers"]
    tokens = checked["tokens_per_s"] * checked["s_per_step"]
    rows = []
    for k in sorted({0, 10, 15, 20, 25, recomputed}):
        h200_s = checked["s_per_step"] - k / recomputed * (checked["s_per_step"] - free["s_per_step"])
        compute_s = h200_s / RTX4090_OVER_H200
        link_s = k * layer_bytes / (RTX4090_PCIE_GBPS * 1e9) / FORWARD_SHARE
        step_s = max(compute_s, link_s)
        rate = tokens / step_s
        rows.append({"offload_layers": k, "h200_compute_s": round(h200_s, 3), "rtx4090_compute_s": round(compute_s, 2),
                     "rtx4090_link_s": round(link_s, 2), "rtx4090_step_s": round(step_s, 2),
                     "rtx4090_tokens_per_s": round(rate), "host_ram_pinned_gib": round(k * layer_bytes / 2**30, 1),
                     "hours_3_epochs": {name: round(3 * n / rate / 3600, 1) for name, n in EPOCH_TOKENS.items()},
                     "tokens_in_budget_m": round(rate * budget_h * 3600 / 1e6)})
    return {"basis": f"H200 steps x {RTX4090_OVER_H200:.3f} (165/790 TFLOP/s); offloaded bytes over "
                     f"{RTX4090_PCIE_GBPS:g} GB/s within {FORWARD_SHARE:.2f} of the step (assumed)",
            "checkpointed_step": checked["variant"], "no_recompute_step": free["variant"],
            "bytes_per_offloaded_layer_gib": round(layer_bytes / 2**30, 3), "tokens_per_step": round(tokens),
            "rows": rows}


def estimate_main(data: Path, useful_tokens_per_s: float) -> dict:
    from birbal.config import load_recipe
    from birbal.models import load_tokenizer

    tokenizer = load_tokenizer(load_recipe("smoke").model.tokenizer, Path("/tmp/birbal-bench-cache"))
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    # the synthetic `fixture-mix` rows are not text of any real source: left out of the ratio
    est = published_tokens_estimate([r for r in rows if r.get("source") != "fixture-mix"], tokenizer)
    est["projection_3_epochs"] = {k: projection(v, useful_tokens_per_s) for k, v in est["tokens_per_epoch"].items()}
    est["useful_tokens_per_s"] = useful_tokens_per_s
    return est


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the JSON results here (rewritten after every variant)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/birbal-bench"))
    ap.add_argument("--arch", choices=["7b", "tiny"], default="7b", help="tiny: a CPU dry run of the code paths")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--warmup-mix-baseline", type=int, default=1)
    ap.add_argument("--timed", type=int, default=3)
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="skip variants that cannot finish by then")
    ap.add_argument("--variant-timeout-s", type=float, default=300.0,
                    help="each variant's worker: its load, its first step (on a cold compile cache more than 175 s "
                         "at 2 x 8192 on an H200: 244 s on 2026-12-02) and the timed steps")
    ap.add_argument("--profile-dir", type=Path, help="profile one extra step per variant; tables written here")
    ap.add_argument("--estimate-tokens", type=Path, metavar="TRAIN_JSONL",
                    help="no GPU: estimate the published file's tokens an epoch from these rows' bytes per token "
                         "(e.g. a smoke run's data/train.jsonl) and project 3 epochs at --rate; print JSON")
    ap.add_argument("--rate", type=float, default=9659.0,
                    help="useful tokens/s for --estimate-tokens (default: the H200 mix rate in results/README.md)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.checkpoint = args.workdir / f"mistral-{args.arch}-random-bf16"
    if args.estimate_tokens:
        print(json.dumps(estimate_main(args.estimate_tokens, args.rate), indent=1))
        return 0

    if args.build:
        arch = MISTRAL_7B if args.arch == "7b" else TINY
        built = build_checkpoint(args.checkpoint, arch, args.device)
        if args.device == "cuda":
            try:
                built["host_link"] = host_link_gb_per_s()
            except Exception as err:  # a measurement on the side: never stops the benchmark
                built["host_link"] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        print(RESULT_MARK + json.dumps(built), flush=True)
        return 0
    if args.worker:
        result = run_variant(args.worker, args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        gc.collect()
        return 0

    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS and v not in PHASES
               and v not in DOWN_OUTSIDE]
    if unknown:
        ap.error(f"unknown variants {', '.join(unknown)}: see VARIANTS, PHASES and DOWN_OUTSIDE in this script")
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "train_throughput", "date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
               "versions": versions(), "arch": MISTRAL_7B if args.arch == "7b" else TINY,
               "settings": {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "warmup": args.warmup,
                            "timed": args.timed, "cap_gib": args.cap_gib,
                            "mix": f"lognormal median {MIX_MEDIAN}, sigma {MIX_SIGMA}, clip [{MIX_MIN}, seq_len]; "
                                   f"prompt fraction uniform {PROMPT_FRACTION}",
                            "mfu": "flops_per_token (4N + 12*L*d*c, c = mean causal context within the example and the "
                                   "model's sliding window) "
                                   "x useful tokens/s / 790 TFLOP/s"},
               "results": [], "skipped": []}
    print(json.dumps(payload["versions"]), file=sys.stderr, flush=True)
    progress("building the random checkpoint")
    build = call_worker(worker_argv(args, ["--build"]), timeout=max(60.0, args.deadline_s - 60))
    payload["checkpoint"] = build
    write_json(args.out, payload)
    print(f"checkpoint: {build}", file=sys.stderr, flush=True)
    if "checkpoint" not in build:
        print(json.dumps(payload))
        return 1
    for name in [v for v in args.variants.split(",") if v]:
        left = args.deadline_s - (time.perf_counter() - start)
        if left < 45:
            payload["skipped"].append({"variant": name, "reason": f"deadline ({left:.0f} s left)"})
            continue
        progress(f"== {name} ({left:.0f} s left)")
        result = call_worker(worker_argv(args, ["--worker", name]), timeout=min(args.variant_timeout_s, left - 5))
        result.setdefault("variant", name)
        payload["results"].extend(expand_phases(result))
        write_json(args.out, payload)
        print(f"   -> {result.get('status')} {result.get('s_per_step')} s/step, "
              f"{result.get('useful_tokens_per_s')} useful tok/s, peak {result.get('peak_allocated_gib')}/"
              f"{result.get('peak_reserved_gib')} GiB {result.get('error', '')}", file=sys.stderr, flush=True)
    payload["total_s"] = round(time.perf_counter() - start, 1)
    payload["rtx4090_offload_projection"] = rtx4090_offload_projection(payload["results"])
    write_json(args.out, payload)
    print(json.dumps(payload))
    print(table(payload["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
