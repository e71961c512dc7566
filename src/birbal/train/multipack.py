"""Which examples make each micro-batch and each optimiser step: axolotl 0.3.0's multipack with HF Trainer's loop.

Upstream (their `training/axolotl` at 6b2bb5d, transformers acc394c / 4.35 Trainer):

- Order: HF Trainer's `RandomSampler(train_dataset)` (trainer.py:796 at 4.35) with no generator: each epoch's
  `__iter__` draws a seed from torch's global CPU generator, seeded by `set_seed(args.seed)` (trainer.py:337; seed
  42, the TrainingArguments default, since nips_02 leaves `#seed: 57` commented out) and permutes with it. Emulated
  by `epoch_orders`: the draws come from a generator seeded with `train.seed` (nothing else on their CPU
  generator is known to draw between epochs; the GPU draws NEFTune and dropout).
- Bins: `MultipackDistributedDataloader.generate_batches` (utils/dataloader.py:180-207) runs `allocate`
  (dataloader.py:62-110) with n=1 rank over the sampler's order into bins of `seq_max_length *
  sample_packing_seq_len_multiplier` = sequence_len x micro_batch_size tokens (trainer_builder.py:612 sets the
  multiplier to micro_batch_size). With one rank, its binary search takes the longest prefix whose lengths sum
  to at most the capacity: next-fit. One bin per micro-batch (`chunk(..., batch_size // multiplier)` = 1,
  dataloader.py:217-219). Re-packed every epoch (`__iter__` calls generate_batches).
- Epoch length: the loader yields `_len_est()` micro-batches and stops (dataloader.py:216-247, 261-279):
  floor(0.99 * total_tokens / packing_efficiency_estimate // sequence_len // micro_batch_size) - 1, the estimate
  being the packing efficiency of one earlier pass rounded UP to 0.01 (utils/trainer.py:206-238). So each epoch
  ends a few bins early; if an epoch packs into fewer bins, it yields empty no-op batches (never seen in practice).
- Steps: HF's loop (trainer.py:1838-1920 at 4.35) steps the optimiser when the running count of micro-batches,
  over all epochs, is a multiple of gradient_accumulation_steps, or at an epoch's last micro-batch when the epoch
  has no more micro-batches than that; it stops at max_steps = ceil(num_epochs * max(len // accumulation, 1))
  (trainer.py:1581-1597), which is also the cosine schedule's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

EpochLength = Literal["estimate", "all_bins"]


def epoch_orders(n: int, seed: int, epochs: int) -> list[np.ndarray]:
    """The RandomSampler's permutation for each epoch (torch 2.0's `RandomSampler.__iter__` with generator=None)."""
    draws = torch.Generator().manual_seed(seed)
    orders = []
    for _ in range(epochs):
        sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=draws).item())
        orders.append(torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed)).numpy())
    return orders


def next_fit_bins(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[np.ndarray]:
    """`allocate` with one rank: consecutive runs of `order` whose lengths sum to at most `capacity`."""
    bins: list[np.ndarray] = []
    start, used = 0, 0
    ordered = lengths[order]
    for i, length in enumerate(ordered):
        if used + int(length) > capacity and i > start:
            bins.append(order[start:i])
            start, used = i, 0
        used += int(length)
    if start < len(order):
        bins.append(order[start:])
    return bins


def efficiency_estimate(total_tokens: int, bins: int, capacity: int) -> float:
    """utils/trainer.py:220-238: tokens / (bins x capacity), rounded up to 0.01."""
    return math.ceil(total_tokens / (bins * capacity) * 100.0) / 100.0


def estimated_len(total_tokens: int, efficiency: float, sequence_len: int, micro_batch_size: int) -> int:
    """`MultipackDistributedDataloader.__len__` (dataloader.py:261-290), one device."""
    return max(1, math.floor(0.99 * total_tokens / efficiency // sequence_len // micro_batch_size) - 1)


@dataclass(frozen=True)
class Plan:
    steps: list[list[np.ndarray | None]]  # per optimiser step, its micro-batches (example indices; None: no-op)
    epoch_micro_batches: list[int]        # micro-batches each epoch yields
    bins_per_epoch: list[int]             # bins each epoch actually packed into
    efficiency: float                     # the estimate (rounded up)
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return len(self.steps)


def plan_steps(lengths: np.ndarray, *, seed: int, sequence_len: int, micro_batch_size: int,
               accumulation: int, num_epochs: float, epoch_length: EpochLength = "estimate",
               max_steps: int | None = None, packing: bool = True) -> Plan:
    """Every optimiser step's micro-batches, a pure function of its arguments (so a resume needs no cursor).

    epoch_length="estimate" (birbal-4090): upstream's loop above. "all_bins" (plus profile): every bin of every
    epoch is trained on; steps are consecutive groups of `accumulation` micro-batches over the epochs, the last
    one possibly shorter. packing=False: each micro-batch is `micro_batch_size` consecutive examples of the order
    (HF's own DataLoader), the epoch all of them.
    """
    capacity = sequence_len * micro_batch_size
    total = int(lengths.sum())
    epochs = math.ceil(num_epochs)
    orders = epoch_orders(len(lengths), seed, epochs)
    # The efficiency pass (utils/trainer.py:204-238) ran over its own RandomSampler order; ours is drawn from
    # seed + 1. The estimate is rounded up to 0.01, so another order almost never changes it.
    probe = next_fit_bins(lengths, epoch_orders(len(lengths), seed + 1, 1)[0], capacity)
    efficiency = efficiency_estimate(total, len(probe), capacity)
    if packing:
        per_epoch = [next_fit_bins(lengths, order, capacity) for order in orders]
    else:
        per_epoch = [[order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
                     for order in orders]
    if epoch_length == "all_bins" or not packing:
        stream = [b for bins in per_epoch for b in bins]
        count = len(stream)
        limit = math.ceil(count * num_epochs / epochs) if num_epochs != epochs else count
        stream = stream[:limit]
        steps = [stream[i:i + accumulation] for i in range(0, len(stream), accumulation)]
        if max_steps:
            steps = steps[:max_steps]
        return Plan(steps, [len(b) for b in per_epoch], [len(b) for b in per_epoch], efficiency,
                    math.ceil(len(per_epoch[0]) / accumulation))
    length = estimated_len(total, efficiency, sequence_len, micro_batch_size)
    per_epoch_steps = max(length // accumulation, 1)
    planned = math.ceil(num_epochs * per_epoch_steps)
    limit = min(planned, max_steps) if max_steps else planned
    steps: list[list[np.ndarray | None]] = []
    current: list[np.ndarray | None] = []
    seen = 0
    for bins in per_epoch:
        epoch = list(bins[:length]) + [None] * max(0, length - len(bins))
        for i, micro in enumerate(epoch):
            seen += 1
            current.append(micro)
            if seen % accumulation == 0 or (length <= accumulation and i + 1 == length):
                steps.append(current)
                current = []
                if len(steps) == limit:
                    break
        if len(steps) == limit:
            break
    return Plan(steps, [length] * epochs, [len(b) for b in per_epoch], efficiency, per_epoch_steps)
