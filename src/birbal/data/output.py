"""Streaming writers of the stage's row files, and token statistics gathered as rows go past."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from birbal.fsutil import fsync_dir

HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def row_line(row: dict) -> str:
    """One row as written: {question, answer, source}, keys sorted, so equal rows give equal bytes."""
    return json.dumps({"question": row["question"], "answer": row["answer"], "source": row.get("source", "")},
                      ensure_ascii=False, sort_keys=True) + "\n"


class JsonlWriter:
    """Writes rows to a hidden `.NAME.partial` file; `commit()` renames it over NAME (after every check passed)."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = partial_path(path)
        self.rows = 0
        self.per_source: Counter[str] = Counter()
        self._handle = None

    def __enter__(self) -> JsonlWriter:
        self._handle = open(self.tmp, "w", encoding="utf-8")
        return self

    def write(self, row: dict) -> None:
        assert self._handle is not None
        self._handle.write(row_line(row))
        self.rows += 1
        self.per_source[row.get("source", "")] += 1

    def __exit__(self, kind, value, traceback) -> None:
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        if kind is not None:
            self.tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)


def remove_partials(folder: Path) -> None:
    for stale in folder.glob(f".*{PARTIAL_SUFFIX}"):
        stale.unlink(missing_ok=True)


class TokenStats:
    """Tokens per row as training sees them. With `tokenization="upstream"` (birbal-4090): the prompt and the
    answer tokenised apart by SentencePiece, as axolotl did (BOS + prompt, answer + EOS; `train/packing.py`);
    with "joint": BOS + question + answer + EOS in one call of the tokenizer, in batches."""

    def __init__(self, tokenizer, windows: tuple[int, ...], batch: int = 512, tokenization: str = "joint"):
        self.tokenizer = tokenizer
        self.windows = tuple(sorted(set(windows)))
        self.batch = batch
        self.encoder = None
        if tokenization == "upstream":
            from birbal.train.packing import UpstreamEncoder

            self.encoder = UpstreamEncoder(tokenizer)
        self._pending: list[tuple[str, str]] = []
        self.lengths: Counter[int] = Counter()

    def add(self, row: dict) -> None:
        self._pending.append((row["question"], row["answer"]))
        if len(self._pending) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self.encoder is not None:
            big = 1 << 30  # no truncation: long rows are counted as long
            self.lengths.update(
                len(self.encoder.tokenize(q, add_eos=False, strip_bos=False, max_length=big))
                + len(self.encoder.tokenize(a, add_eos=True, strip_bos=True, max_length=big))
                for q, a in self._pending)
        else:
            encoded = self.tokenizer([q + a for q, a in self._pending], add_special_tokens=True)["input_ids"]
            self.lengths.update(len(ids) + 1 for ids in encoded)
        self._pending = []

    def as_dict(self) -> dict[str, Any]:
        self._flush()
        rows = sum(self.lengths.values())
        total = sum(length * n for length, n in self.lengths.items())
        histogram: Counter[str] = Counter()
        for length, n in self.lengths.items():
            edge = next((e for e in HISTOGRAM_EDGES if length <= e), None)
            histogram[f"<={edge}" if edge else f">{HISTOGRAM_EDGES[-1]}"] += n
        over = {str(w): sum(n for length, n in self.lengths.items() if length > w) for w in self.windows}
        return {"rows": rows, "total_tokens": total, "max_tokens": max(self.lengths, default=0),
                "mean_tokens": round(total / max(rows, 1), 1),
                "histogram": {k: histogram[k] for k in sorted(histogram, key=_edge_order)},
                "rows_over_window": over,
                "share_over_window": {w: round(n / max(rows, 1), 6) for w, n in over.items()}}


def _edge_order(label: str) -> int:
    value = int(label.lstrip("<=>"))
    return value + (1 if label.startswith(">") else 0)
