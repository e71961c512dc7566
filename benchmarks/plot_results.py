"""Plots of the committed GPU results (benchmarks/results/*.json), for reading at a glance what the tables say.

Reads only the JSON files named below, as the benchmarks wrote them, and writes three PNGs to `--out-dir`
(default benchmarks/results/plots):
- decode.png: where a decode step's time goes at the Mistral-7B shape on the H200 (`decode_profile.py`'s graph
  replay, kernel time by class plus the gaps between kernels), birbal-4090 and birbal-4090-plus before and after
  each switch, against the bandwidth bound and issue 17's 4.2 ms;
- training.png: useful tokens/s at birbal-4090's own shape (one 16,384-token bin) under the 24 GiB cap, with
  offload, and with no recompute (no cap), against issue 17's 12,500; and the RTX 4090 offload projection
  (`rtx4090_offload_projection`) with the error the same model makes on the H200's own offload steps;
- ni_predictions.png: the NI predictions step's instances/s by arm, each run's baseline beside it;
- train_step.png: where one training step's GPU time goes at birbal-4090's shape (torch.profiler, by kernel group),
  the plain stack beside it from the same run, against the step issue 17's 12,500 tokens/s needs and two floors
  computed (not measured) from the step's FLOPs (`train_step_floor`).

Run: python benchmarks/plot_results.py [--results benchmarks/results] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (file, variant key, label) in the order plotted; each the same method (decode_profile.py, graph replay)
DECODE = [
    ("decode_profile_h200_2026-12-01_final.json", "unmerged:compiled_layers+sdpa+unfused",
     "birbal-4090\nsdpa, unfused"),
    ("decode_profile_h200_2026-12-01_gemv.json", "unmerged:compiled_layers+grouped+lora",
     "birbal-4090\ngrouped, fuse lora"),
    ("decode_profile_h200_2026-12-01_triton.json", "unmerged:compiled_layers+grouped+lora+gemva",
     "birbal-4090\n+ gemv lora_a"),
    ("decode_profile_h200_2026-12-01_triton.json", "unmerged:compiled_layers+grouped+lora+gemvtriton",
     "birbal-4090\n+ gemv triton"),
    ("decode_profile_h200_2026-12-01_tattn.json", "unmerged:compiled_layers+tattn+lora+gemvtriton",
     "birbal-4090\n+ attention\nkernel"),
    ("decode_profile_h200_2026-12-02_rest.json", "unmerged:compiled_layers",
     "birbal-4090\nsame, later\nrun"),
    ("decode_profile_h200_2026-12-02_rest.json", "unmerged:compiled_layers+lenstep+combo+glu",
     "birbal-4090\n+ 3 forms"),
    ("decode_profile_h200_2026-12-02_unmerged_rest.json", "unmerged:compiled_layers+rest",
     "birbal-4090 now\n+ rest"),
    ("decode_profile_h200_2026-12-01_final.json", "merged:compiled_layers+grouped+unfused",
     "plus (merged)\ngrouped, unfused"),
    ("decode_profile_h200_2026-12-01_triton_merged.json", "merged:compiled_layers+grouped+fused+gemva",
     "plus\nfused projections"),
    ("decode_profile_h200_2026-12-01_triton_merged.json", "merged:compiled_layers+grouped+fused+gemvtriton",
     "plus\n+ gemv triton"),
    ("decode_profile_h200_2026-12-01_tattn.json", "merged:compiled_layers+tattn+fused+gemvtriton",
     "plus\n+ attention\nkernel"),
    ("decode_profile_h200_2026-12-01_forms.json", "merged:compiled_layers+lenstep+combo+glu",
     "plus\n+ 3 forms"),
    ("decode_profile_h200_2026-12-02_rest.json", "merged:compiled_layers",
     "plus\nsame, later\nrun"),
    ("decode_profile_h200_2026-12-02_rest.json", "merged:compiled_layers+rest",
     "plus now\n+ rest"),
]
CLASSES = [("products (base weights, lm_head)", ("base_gemv", "lm_head", "gemv_birbal"), "#4c72b0"),
           ("LoRA products", ("lora_a_gemv", "lora_b_gemv", "gemv_triton"), "#dd8452"),
           ("attention", ("attention",), "#55a868"),
           ("small kernels (copies, norms, rotary)", ("copies", "norm_rotary_elementwise", "other"), "#8172b3")]
DECODE_TARGET_MS = 4.2
TRAIN_CAPPED = "train_throughput_h200_2026-12-01_bin16k_phases.json"
TRAIN_FREE = "train_throughput_h200_2026-12-01_norecompute.json"
TRAIN_DOWNOUT = "train_throughput_h200_2026-12-03_downout.json"  # the switch off and on, one run
TRAIN_MIX_DOWNOUT = "train_throughput_h200_2026-12-04_mix_downout.json"  # the length mix, switch off and on, one run
TRAIN_TARGET = 12500
TRAIN_PROFILED = "train_throughput_h200_2026-12-02_bin16k_vs_plain.json"  # both variants profiled in one run
TRAIN_ATTENTION = [("train_attention_h200_2026-12-02_full.json", "full rows (2 x 8,192)"),
                   ("train_attention_h200_2026-12-02_mix.json", "the length mix (34 examples)")]
TRAIN_ATTENTION_AUTOTUNE = "train_attention_h200_2026-12-02_autotune.json"  # flex and flex_autotune, one run
MEASURED_PEAK_TFLOPS = 790.0  # the H200's measured bf16 matmul rate (the MFU basis of train_throughput.py)
# the profile's kernel groups, stacked in this order
STEP_GROUPS = [("matmul (GEMM)", ("matmul (GEMM)",), "#4c72b0"), ("attention", ("attention",), "#55a868"),
               ("copies / casts / element-wise", ("copies / casts / elementwise",), "#8172b3"),
               ("optimizer, 4-bit dequantize, loss, other",
                ("optimizer", "4-bit dequantize", "cross-entropy / softmax", "other"), "#dd8452")]
TOKENS_FOR_3_EPOCHS_IN_24H = 220e6 / 86400  # issue 17: 220M tokens inside 24 h
# (file, session, {arm: label}): the arms' names changed between runs (the seventh session's `static` ran SDPA);
# prefill-only arms are a phase of another arm (the 4090 projection's), not a way to run the step, so not plotted
NI = [("ni_predictions_h200_2026-12-01_static.json", "7th", {
          "baseline": "baseline:\ngenerate, batch 8", "generate_sorted": "generate,\nsorted batches",
          "static": "static, SDPA\n131k tokens", "static_grouped": "static, grouped\n131k tokens",
          "static_24gb": "static, SDPA\n49k tokens"}),
      ("ni_predictions_h200_2026-12-01_24gb.json", "8th", {
          "baseline": "baseline:\ngenerate, batch 8", "static": "static, grouped\n131k tokens",
          "static_24gb": "static, grouped\n49k tokens, 16k\nprefill chunks\n(the defaults now)"}),
      ("ni_predictions_h200_2026-12-02_cap24.json", "15th", {
          "baseline": "baseline:\ngenerate, batch 8", "static": "the defaults\nunder a real\n24 GiB limit"})]


def load(results: Path, name: str) -> dict:
    path = results / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"plot_results: {path} is missing (the plots read the committed results)")


def plot_decode(results: Path, plt):
    fig, ax = plt.subplots(figsize=(16.5, 5.8))
    labels, bounds = [], []
    for i, (name, key, label) in enumerate(DECODE):
        variant = load(results, name)[key]
        replay = variant["graph_replay"]
        by_class = replay["by_class"]
        bottom = 0.0
        for cls_label, keys, colour in CLASSES:
            ms = sum(by_class.get(k, {}).get("us_per_step", 0.0) for k in keys) / 1000
            ax.bar(i, ms, bottom=bottom, color=colour, label=cls_label if i == 0 else None)
            bottom += ms
        gaps = max(replay.get("gap_us_per_step", 0.0), 0.0) / 1000
        ax.bar(i, gaps, bottom=bottom, color="#c8c8c8", label="gaps between kernels" if i == 0 else None)
        ax.text(i, variant["graph_ms_per_step"] + 0.08, f"{variant['graph_ms_per_step']:.2f} ms", ha="center")
        labels.append(label)
        bounds.append(variant["bound_ms"])
    for i, bound in enumerate(bounds):
        ax.hlines(bound, i - 0.4, i + 0.4, colors="black", linestyles="dotted",
                  label="bandwidth bound (the step's bytes at the copy rate)" if i == 0 else None)
    ax.axhline(DECODE_TARGET_MS, color="#c44e52", linestyle="--", label=f"issue 17: {DECODE_TARGET_MS} ms")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("ms per decode step (batch 1, 1,000-token context)")
    ax.set_title("Decode at the Mistral-7B shape, H200 (benchmarks/decode_profile.py, CUDA graph replay)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_training(results: Path, plt):
    capped = load(results, TRAIN_CAPPED)
    free = load(results, TRAIN_FREE)
    downout = load(results, TRAIN_DOWNOUT)
    rows = [(r, f"{r['offload_layers']} layers\noffloaded" if r["offload_layers"] else "recompute,\nno offload")
            for r in capped["results"] if r.get("status") == "ok"]
    rows += [(r, "down proj\noutside the\ncheckpoint\n(12-03)" if r["down_proj_outside_checkpoint"]
              else "recompute\n(12-03)") for r in downout["results"] if r.get("status") == "ok"]
    rows += [(r, "length mix,\ndown proj\noutside\n(12-04)" if r["down_proj_outside_checkpoint"]
              else "length mix,\nrecompute\n(12-04)") for r in load(results, TRAIN_MIX_DOWNOUT)["results"]
             if r.get("status") == "ok" and r["data"] == "mix"]
    rows += [(r, "no recompute\n(111 GiB,\nno cap)") for r in free["results"] if r.get("status") == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (r, _label) in enumerate(rows):
        colour = "#4c72b0" if r.get("cap_gib") else "#8c8c8c"
        left.bar(i, r["useful_tokens_per_s"], color=colour)
        left.text(i, r["useful_tokens_per_s"] + 150, f"{r['useful_tokens_per_s']:,.0f}\n{r['mfu_vs_790']:.1%} MFU",
                  ha="center", fontsize=8)
    left.axhline(TRAIN_TARGET, color="#c44e52", linestyle="--", label=f"issue 17: {TRAIN_TARGET:,} tokens/s")
    left.set_xticks(range(len(rows)), [label for _, label in rows], fontsize=8)
    left.set_ylabel("useful tokens/s")
    left.set_ylim(0, 1.15 * max(r["useful_tokens_per_s"] for r, _ in rows))
    left.set_title("H200, birbal-4090's shape (16,384-token bin); blue: under the 24 GiB cap", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    projection = free.get("rtx4090_offload_projection")
    if projection:
        k = [row["offload_layers"] for row in projection["rows"]]
        rate = [row["rtx4090_tokens_per_s"] for row in projection["rows"]]
        errors = [c["measured_over_model"] for c in projection.get("h200_check", {}).get("rows", [])]
        low, high = (min(errors), max(errors)) if errors else (1.0, 1.0)
        right.plot(k, rate, marker="o", color="#4c72b0", label="projected (H200 steps x 165/790; 25 GB/s link)")
        # no band at 0 layers: the offload model's error applies only to what is offloaded
        right.fill_between(k, [x / high if n else x for x, n in zip(rate, k, strict=True)],
                           [x / low if n else x for x, n in zip(rate, k, strict=True)], color="#4c72b0", alpha=0.15,
                           label=f"the model's error on the H200's own offload steps ({low:.2f}-{high:.2f}x)")
        right.axhline(TOKENS_FOR_3_EPOCHS_IN_24H, color="#c44e52", linestyle="--",
                      label=f"220M tokens in 24 h ({TOKENS_FOR_3_EPOCHS_IN_24H:,.0f} tokens/s)")
        right.set_xlabel("layers whose activations are offloaded to host memory (of 30 recomputed)")
        right.set_ylabel("RTX 4090 useful tokens/s (projected, not measured)")
        right.set_title("RTX 4090 projection from the H200 figures", fontsize=10)
        right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def plot_ni(results: Path, plt):
    fig, ax = plt.subplots(figsize=(11, 5.5))
    x, positions, labels = 0.0, [], []
    for name, session, arms in NI:
        run = load(results, name)
        for arm, label in arms.items():
            values = run["arms"].get(arm, {})
            if "seconds" not in values:
                continue
            rate = values.get("warm_instances_per_s", values["instances_per_s"])
            ax.bar(x, rate, color="#8c8c8c" if arm == "baseline" else "#4c72b0")
            peak = values.get("peak_memory_gib")
            ax.text(x, rate + 0.4, f"{rate:.1f}" + (f"\n{peak:.0f} GiB" if peak else ""), ha="center", fontsize=7)
            positions.append(x)
            labels.append(f"{label}\n({session} session)")
            x += 1
        x += 0.6  # a gap between runs: compare bars within one run
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(positions, labels, fontsize=7)
    ax.set_ylim(0, 1.15 * ax.get_ylim()[1])
    ax.set_ylabel("instances/s (warm: graph captures left out)")
    ax.set_title("NI predictions step, 512 prompts x 32 new tokens, Mistral-7B shape, H200; each run with its "
                 "batch-8 baseline (grey); peak GiB allocated", fontsize=9)
    fig.tight_layout()
    return fig


def train_step_floor(arch: dict, tokens: int = 16384, rows: int = 2, recomputed: int = 30, rank: int = 128,
                     labelled: float = 0.5) -> dict:
    """The FLOPs of one birbal-4090 optimiser step at the profiled shape (one 16,384-token bin of `rows` full
    rows, `recomputed` of the layers checkpointed, LoRA rank `rank` on all seven projections), by what runs them.

    GEMMs: the frozen base's forward and input-gradient products (2N each a token; no weight gradient), the
    recomputed layers' forward again, lm_head over the labelled tokens (forward and input gradient), and each LoRA
    product's forward, recompute and backward (2, 2 x recomputed share, 4 x its parameters a token). Attention:
    4 d c a token and layer forward (Q K^T and P V over the c keys a token attends to: causal, within the sliding
    window as trained, 4,097 keys, `birbal.train.metrics.mean_attention_context`), again in the recompute, and
    2.5x the forward in the backward (dQ, dK, dV and the recomputed scores inside the flash backward)."""
    from birbal.train.metrics import mean_attention_context

    h, m, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    kv = h // arch["num_attention_heads"] * arch["num_key_value_heads"]
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * m
    base = per_layer * layers
    lora = rank * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + m)) * layers
    share = recomputed / layers
    gemm = tokens * (2 * base * (2 + share) + 2 * 2 * arch["vocab_size"] * h * labelled + lora * (2 + 2 * share + 4))
    context = mean_attention_context([tokens // rows] * rows, arch["sliding_window"] + 1)
    forward = 4 * h * context * tokens * layers
    attention = forward * (1 + share) + 2.5 * forward
    return {"gemm_flop": gemm, "attention_flop": attention, "mean_context": context}


def plot_train_step(results: Path, plt):
    from shapes import MISTRAL_7B  # benchmarks/ is this script's folder

    run = load(results, TRAIN_PROFILED)
    by_name = {r["variant"]: r for r in run["results"]}
    measured = [(by_name["baseline_full_uncapped"], "plain stack\n(transformers + peft\n+ bitsandbytes), SDPA,\n"
                 "no cap (30.4 GiB)"), (by_name["ours_bin16k_full"], "birbal-4090\n(24 GiB cap,\n22.5 GiB)")]
    ours = by_name["ours_bin16k_full"]["profile"]["by_group_s"]
    fixed = sum(ours.get(k, 0.0) for k in STEP_GROUPS[3][1])
    flop = train_step_floor(MISTRAL_7B)
    peak = MEASURED_PEAK_TFLOPS * 1e12
    attention_rate = flop["attention_flop"] / ours["attention"]  # as measured: flex, forward, recompute, backward
    # computed, not measured: (label, GEMM rate, attention rate, element-wise seconds)
    floors = [(f"computed: attention\ntwice as fast\n({2 * attention_rate / 1e12:.0f} TFLOP/s)",
               flop["gemm_flop"] / ours["matmul (GEMM)"], 2 * attention_rate, ours["copies / casts / elementwise"]),
              ("computed: and GEMMs\nat 95% of 790,\nelement-wise 0.10 s", 0.95 * peak, 2 * attention_rate, 0.10),
              ("computed floor: GEMMs\nand attention at 790,\nno element-wise", peak, peak, 0.0)]
    fig, ax = plt.subplots(figsize=(12.5, 5.8))
    labels = []
    for i, (result, label) in enumerate(measured):
        groups = result["profile"]["by_group_s"]
        bottom = 0.0
        for name, keys, colour in STEP_GROUPS:
            seconds = sum(groups.get(k, 0.0) for k in keys)
            ax.bar(i, seconds, bottom=bottom, color=colour, label=name if i == 0 else None)
            bottom += seconds
        ax.text(i, bottom + 0.04, f"{bottom:.2f} s GPU\n{result['useful_tokens_per_s']:,.0f} tokens/s", ha="center",
                fontsize=8)
        labels.append(label)
    for j, (label, gemm_rate, attention_rate, elementwise) in enumerate(floors):
        i = len(measured) + j
        parts = [flop["gemm_flop"] / gemm_rate, flop["attention_flop"] / attention_rate, elementwise, fixed]
        bottom = 0.0
        for seconds, (_, _, colour) in zip(parts, STEP_GROUPS, strict=True):
            ax.bar(i, seconds, bottom=bottom, color=colour, hatch="//", edgecolor="white")
            bottom += seconds
        ax.text(i, bottom + 0.04, f"{bottom:.2f} s\n{16384 / bottom:,.0f} tokens/s", ha="center", fontsize=8)
        labels.append(label)
    need = 16384 / TRAIN_TARGET
    ax.axhline(need, color="#c44e52", linestyle="--", label=f"issue 17's {TRAIN_TARGET:,} tokens/s: {need:.2f} s a step")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.15 * ax.get_ylim()[1])
    ax.set_ylabel("GPU seconds per optimiser step (16,384 tokens)")
    ax.set_title("One training step at birbal-4090's shape, H200, torch.profiler (hatched: computed from the step's "
                 f"FLOPs,\n{flop['gemm_flop'] / 1e12:.0f} TFLOP in GEMMs and {flop['attention_flop'] / 1e12:.0f} "
                 f"in attention ({flop['mean_context']:,.0f} keys a token in the 4,097-key window), 30 of 32 layers "
                 "recomputed; optimizer and dequantize as measured)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_train_attention(results: Path, plt):
    """The training attention kernel against kernel (benchmarks/train_attention.py): forward + backward time of each
    arm, the same maths, one 16,384-token bin."""
    autotuned = {a["arm"]: a for a in load(results, TRAIN_ATTENTION_AUTOTUNE)["arms"]}
    fig, axes = plt.subplots(1, len(TRAIN_ATTENTION), figsize=(13, 5.2))
    for ax, (name, title) in zip(axes, TRAIN_ATTENTION, strict=True):
        run = load(results, name)
        arms = list(run["arms"])
        if "full" in name and "flex_autotune" in autotuned:  # timed in its own run, beside its own flex
            ratio = autotuned["flex_autotune"]["forward_backward_s"] / autotuned["flex"]["forward_backward_s"]
            flex = next(a for a in arms if a["arm"] == "flex")
            arms.append({"arm": "flex autotuned\n(own run, scaled\nto this flex)",
                         "forward_backward_s": flex["forward_backward_s"] * ratio,
                         "forward_backward_tflops": flex["forward_backward_tflops"] / ratio})
        baseline = next(a for a in arms if a["arm"] == "flex")["forward_backward_s"]
        for i, arm in enumerate(arms):
            seconds = arm.get("forward_backward_s")
            if seconds is None:  # recorded as an error in the JSON
                why = "out of memory" if "OutOfMemory" in str(arm.get("backward_error", arm.get("error"))) else "error"
                ax.text(i, 0.05 * baseline * 1e3, f"backward did not run\n({why}; the JSON says why)", ha="center",
                        fontsize=7, rotation=90)
                continue
            colour = "#4c72b0" if arm["arm"] == "flex" else "#55a868" if arm["arm"] == "varlen" else "#8c8c8c"
            ax.bar(i, seconds * 1e3, color=colour)
            ax.text(i, seconds * 1e3 * 1.01, f"{seconds * 1e3:.2f} ms\n{arm['forward_backward_tflops']:.0f} TFLOP/s"
                    f"\n{baseline / seconds:.2f}x", ha="center", fontsize=7)
        names = {"flex": "flex as\ntrained", "varlen": "varlen_attn\n(FlashAttention-2)"}
        labels = [names.get(a["arm"], a["arm"].replace("[", "\n").replace(",", "\n").rstrip("]")) for a in arms]
        ax.set_xticks(range(len(arms)), labels, fontsize=7)
        ax.set_ylim(0, 1.25 * max(a["forward_backward_s"] * 1e3 for a in arms if a.get("forward_backward_s")))
        ax.set_ylabel("forward + backward, ms")
        shape = run["shape"]
        ax.set_title(f"{title}: {shape['mean_keys_a_query']:,.0f} keys a query", fontsize=9)
    fig.suptitle("The training attention, kernel against kernel, H200 (benchmarks/train_attention.py): 32 x 8 heads "
                 "of 128, bf16, causal in each example and the 4,097-key window; each checked against fp32",
                 fontsize=9)
    fig.tight_layout()
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--results", type=Path, default=here / "results")
    parser.add_argument("--out-dir", type=Path, default=here / "results" / "plots")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, make in (("decode.png", plot_decode), ("training.png", plot_training),
                       ("ni_predictions.png", plot_ni), ("train_step.png", plot_train_step),
                       ("train_attention.png", plot_train_attention)):
        fig = make(args.results, plt)
        fig.savefig(args.out_dir / name, dpi=110)
        plt.close(fig)
        print(args.out_dir / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
