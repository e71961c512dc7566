"""Tokenising rows, masking prompts, and packing examples into fixed-length rows that never attend to each other.

Each packed row carries `position_ids` that restart at 0 for every example. With `use_cache=False` and no 2D
attention mask, transformers builds a block-causal mask from those resets (`find_packed_sequence_indices`), and
flash-attention's varlen path does the same, so packed examples see only themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


# numpy int32 arrays rather than Python lists: the 204k-row mix is ~10^8 tokens, which as Python ints would
# take several GB.
@dataclass(frozen=True, eq=False)
class Example:
    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, eq=False)
class PackedRow:
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    example_lengths: tuple[int, ...]  # real examples, in order; padding (if any) follows them

    @property
    def real_tokens(self) -> int:
        return sum(self.example_lengths)


def tokenize_example(tokenizer, question: str, answer: str, train_on_inputs: bool = False) -> Example:
    """BOS + question + answer + EOS; labels mask the prompt (BOS + question) unless `train_on_inputs`.

    As axolotl does: the prompt is tokenised alone to find how many leading tokens to mask.
    """
    prompt_ids = tokenizer(question, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(question + answer, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    ids = np.asarray(full_ids, dtype=np.int32)
    labels = ids.copy()
    labels[0] = IGNORE_INDEX  # the BOS is never a target, so a packed row never predicts across examples
    if not train_on_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    return Example(ids, labels)


def pack_examples(examples: list[Example], sequence_len: int, pad_id: int,
                  pad_to_sequence_len: bool = True) -> tuple[list[PackedRow], int]:
    """Greedy packing in the given order. Returns (rows, number of examples dropped for being too long).

    An example longer than `sequence_len` is dropped, as axolotl's sample packing drops it.
    """
    rows: list[PackedRow] = []
    current: list[Example] = []
    used = 0
    dropped = 0

    def flush() -> None:
        if not current:
            return
        real = sum(len(ex) for ex in current)
        pad = sequence_len - real if pad_to_sequence_len else 0
        ids = np.concatenate([ex.input_ids for ex in current] + [np.full(pad, pad_id, dtype=np.int32)])
        labels = np.concatenate([ex.labels for ex in current] + [np.full(pad, IGNORE_INDEX, dtype=np.int32)])
        # padding is a segment of its own (positions restart): nothing real attends to it
        positions = np.concatenate([np.arange(len(ex), dtype=np.int32) for ex in current]
                                   + [np.arange(pad, dtype=np.int32)])
        rows.append(PackedRow(ids, labels, positions, tuple(len(ex) for ex in current)))

    for example in examples:
        if len(example) > sequence_len:
            dropped += 1
            continue
        if used + len(example) > sequence_len:
            flush()
            current, used = [], 0
        current.append(example)
        used += len(example)
    flush()
    return rows, dropped


def collate(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch; `example_length` holds, per token, the length of the example it belongs to."""
    width = max(len(r.input_ids) for r in rows)
    batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "example_length": torch.zeros(len(rows), width, dtype=torch.long)}
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        batch["input_ids"][i, :n] = torch.from_numpy(row.input_ids)
        batch["labels"][i, :n] = torch.from_numpy(row.labels)
        batch["position_ids"][i, :n] = torch.from_numpy(row.position_ids)
        start = 0
        for length in row.example_lengths:
            batch["example_length"][i, start:start + length] = length
            start += length
    return batch
