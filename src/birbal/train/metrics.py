"""Training metrics: JSON lines, the loss-curve plot, and model FLOPs utilisation.

MFU formula (stated in the report): per trained token, 4*N for a frozen base (forward 2N, backward through the
activations 2N; no weight gradients for frozen weights; LoRA's own FLOPs are under 5% and left out) plus causal
attention 12 * n_layers * d_model * c, c being the mean number of tokens of the same example a token attends to
(packed examples do not attend to each other), within the model's sliding window (`mean_attention_context`).
Recomputation by gradient checkpointing is not counted (it is hardware work, not model work). N counts the matmul
parameters of the blocks plus lm_head.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from birbal.fsutil import atomic_write_text

H200_BF16_TFLOPS_MEASURED = 790.0  # 8192^3 bf16 matmul on the H200 here (PLATFORM_NOTES.md)


def matmul_parameters(config) -> int:
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2
    mlp = 3 * d * f
    return layers * (attention + mlp) + d * config.vocab_size


def flops_per_token(config, mean_context: float) -> float:
    return 4.0 * matmul_parameters(config) + 12.0 * config.num_hidden_layers * config.hidden_size * mean_context


def mean_attention_context(example_lengths: list[int], window: int | None = None) -> float:
    """Mean over tokens of how many tokens each attends to, for examples of these lengths (causal): itself and
    the earlier tokens of its example, at most `window` keys in all (the model's sliding window as it trains:
    Mistral-7B's 4,096 plus the one that upstream's flash-attention window adds, train/model.py), so an 8,192-token
    example attends to 3,073 keys a token on average, not 4,097."""
    tokens = sum(example_lengths)
    if not tokens:
        return 0.0

    def keys(n: int) -> int:
        if window is None or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window

    return sum(keys(n) for n in example_lengths) / tokens


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint: those steps are redone."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def plot_loss(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def peak_gpu_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)
