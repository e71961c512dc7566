"""Tokenising rows, masking prompts, and packing examples into fixed-length rows that never attend to each other.

Each packed row carries `position_ids` that restart at 0 for every example. With `use_cache=False` and no 2D
attention mask, transformers builds a block-causal mask from those resets (`find_packed_sequence_indices`), and
flash-attention's varlen path does the same, so packed examples see only themselves.
"""

from __future__ import annotations

import re
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


UPSTREAM_MAX_LENGTH = 8192  # axolotl's `_tokenize(..., truncation=True, max_length=sequence_len)` (nips_02: 8192)


class UpstreamEncoder:
    """What transformers 4.35's slow `LlamaTokenizer` (axolotl's `tokenizer_type: LlamaTokenizer`, legacy mode, the
    default then: tokenization_llama.py:163-171) did to a string: split out the special tokens' literal texts
    (`<s>`, `</s>`, `<unk>`, its added-tokens trie) and encode every other piece with SentencePiece itself
    (`_tokenize` -> `sp_model.encode`), each piece getting SentencePiece's dummy-prefix '▁'.

    Hand-written because no tokenizer of transformers 5 behaves so: its LlamaTokenizer merges runs of spaces
    differently ('a  b' -> '▁a', '▁▁', 'b' where SentencePiece gives '▁a', '▁', '▁b') and drops a leading space.
    """

    def __init__(self, tokenizer):
        import sentencepiece

        vocab = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
        if not vocab:
            raise ValueError("the tokenizer has no SentencePiece model file (tokenizer.model), which the upstream "
                             "tokenisation needs (train.tokenization=upstream)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab))
        specials = {tokenizer.bos_token: tokenizer.bos_token_id, tokenizer.eos_token: tokenizer.eos_token_id,
                    tokenizer.unk_token: tokenizer.unk_token_id}
        self.specials = {text: int(i) for text, i in specials.items() if text}
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
                                + ")")
        self.bos_id, self.eos_id = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def tokenize(self, text: str, add_eos: bool, strip_bos: bool, max_length: int) -> list[int]:
        """axolotl's `PromptTokenizingStrategy._tokenize` (prompt_tokenizers.py:61-93): BOS added, truncated to
        `max_length`, EOS appended when not already last and the text was not truncated, BOS optionally stripped;
        an empty text gives no tokens at all (not even EOS)."""
        if not text:
            return []
        ids = ([self.bos_id] + self.encode(text))[:max_length]
        if ids[-1] != self.eos_id and len(ids) < max_length and add_eos:
            ids.append(self.eos_id)
        if ids[0] == self.bos_id and strip_bos:
            ids = ids[1:]
        return ids


def tokenize_example(tokenizer, question: str, answer: str, train_on_inputs: bool = False,
                     mode: str = "joint", upstream: UpstreamEncoder | None = None,
                     max_length: int = UPSTREAM_MAX_LENGTH) -> Example:
    """One training example; labels mask the prompt unless `train_on_inputs`.

    mode="upstream" (birbal-4090): axolotl 0.3.0's `InstructionPromptTokenizingStrategy.tokenize_prompt`
    (prompt_tokenizers.py:106-132) with the `alpaca_chat.load_qa` prompter, whose template is the bare question
    (prompters.py:57-59, system prompt ""): the prompt alone (BOS, no EOS), then the answer alone (its BOS
    stripped, EOS appended), concatenated; so an answer starts with SentencePiece's dummy prefix ('yes' -> '▁yes',
    '3' -> '▁', '3'). Labels: the prompt's tokens (BOS included) are -100, the answer's and its EOS are targets.
    `upstream` is the encoder to use (built from `tokenizer` when None).

    mode="joint" (plus profile): BOS + question + answer tokenised in one call of `tokenizer`, as the server
    tokenises a prompt and its continuation, + EOS; the prompt's length comes from tokenising it alone.
    """
    if mode == "upstream":
        enc = upstream or UpstreamEncoder(tokenizer)
        prompt_ids = enc.tokenize(question, add_eos=False, strip_bos=False, max_length=max_length)
        response_ids = enc.tokenize(answer, add_eos=True, strip_bos=True, max_length=max_length)
        ids = np.asarray(prompt_ids + response_ids, dtype=np.int32)
        labels = ids.copy()
        if not train_on_inputs:
            labels[: len(prompt_ids)] = IGNORE_INDEX
        return Example(ids, labels)
    prompt_ids = tokenizer(question, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(question + answer, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    ids = np.asarray(full_ids, dtype=np.int32)
    labels = ids.copy()
    labels[0] = IGNORE_INDEX  # the BOS is never a target, so a packed row never predicts across examples
    if not train_on_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    return Example(ids, labels)


def make_row(examples: list[Example], pad_id: int, width: int) -> PackedRow:
    """Examples side by side, padded to `width` (padding: `pad_id`, no labels, positions of their own)."""
    real = sum(len(ex) for ex in examples)
    pad = max(width - real, 0)
    ids = np.concatenate([ex.input_ids for ex in examples] + [np.full(pad, pad_id, dtype=np.int32)])
    labels = np.concatenate([ex.labels for ex in examples] + [np.full(pad, IGNORE_INDEX, dtype=np.int32)])
    # padding is a segment of its own (positions restart): nothing real attends to it
    positions = np.concatenate([np.arange(len(ex), dtype=np.int32) for ex in examples]
                               + [np.arange(pad, dtype=np.int32)])
    return PackedRow(ids, labels, positions, tuple(len(ex) for ex in examples))


def padded_width(real: int, multiple: int) -> int:
    """axolotl's collator pads a row to a multiple of `pad_to_multiple_of` (collators.py:74-80): 64 *
    ceil(sequence_len / 64) with pad_to_sequence_len (trainer_builder.py:634-641), else 64."""
    return max(1, -(-real // multiple)) * multiple


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
        if current:
            rows.append(make_row(current, pad_id, sequence_len if pad_to_sequence_len else 0))

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
