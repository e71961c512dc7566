"""N-gram overlap between training rows and the evaluation sets of the challenge's HELM run specs.

Text is normalised (lower-cased, every run of non-alphanumerics a single space) and cut into word n-grams (13 by
default, as in the GPT-3 paper's contamination study). A row is flagged for a benchmark when its question or answer
shares at least one n-gram with any item of it. Benchmark items shorter than n words cannot be checked this way
and are counted as such in the report. N-grams are held as Python hashes (64-bit ints) of word tuples, one set
per benchmark: bounded by the evaluation sets' size, never by the training mix's.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birbal.config.data import Benchmark, ContaminationConfig
from birbal.data.sources import describe, origin_rows
from birbal.errors import DataError

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def ngram_hashes(text: str, n: int) -> set[int]:
    tokens = normalise(text)
    return {hash(tuple(tokens[i:i + n])) for i in range(len(tokens) - n + 1)}


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside a field: a string, a list of them, or a mapping (e.g. {choices: [...], labels: [...]})."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


@dataclass
class BenchmarkIndex:
    name: str
    origin: str
    revision: str | None
    ngrams: set[int] = field(default_factory=set)
    items: int = 0
    too_short: int = 0

    def summary(self) -> dict[str, Any]:
        return {"origin": self.origin, "revision": self.revision, "items": self.items,
                "items_shorter_than_n": self.too_short, "ngrams": len(self.ngrams)}


def index_benchmark(benchmark: Benchmark, n: int, cache_dir: Path) -> BenchmarkIndex:
    origin = benchmark.origin
    index = BenchmarkIndex(benchmark.name, describe(origin), None if origin.path else origin.revision)
    for number, row in enumerate(origin_rows(origin, f"benchmark {benchmark.name}", cache_dir), 1):
        if not isinstance(row, dict) or not all(name in row for name in benchmark.text_fields):
            raise DataError(f"benchmark {benchmark.name!r}: {index.origin}: row {number} lacks field(s) "
                            f"{', '.join(f for f in benchmark.text_fields if not isinstance(row, dict) or f not in row)}"
                            f"; expected {', '.join(benchmark.text_fields)}")
        index.items += 1
        grams: set[int] = set()
        for name in benchmark.text_fields:
            for text in strings_in(row[name]):
                grams |= ngram_hashes(text, n)
        if not grams:
            index.too_short += 1
        index.ngrams |= grams
    return index


@dataclass
class ContaminationReport:
    ngram: int
    mode: str
    benchmarks: dict[str, dict[str, Any]]
    overlaps: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    rows_checked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rows_flagged: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rows_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"ngram": self.ngram, "mode": self.mode, "benchmarks": self.benchmarks,
                "rows_checked": dict(sorted(self.rows_checked.items())),
                "rows_flagged": dict(sorted(self.rows_flagged.items())),
                "overlaps": {s: dict(sorted(b.items())) for s, b in sorted(self.overlaps.items())},
                "rows_dropped": self.rows_dropped}


class Decontaminator:
    """Index the benchmarks once, then check (and in `drop` mode remove) rows as they stream past."""

    def __init__(self, cfg: ContaminationConfig, mode: str, cache_dir: Path):
        self.cfg = cfg
        self.n = cfg.ngram
        self.mode = mode
        self.cache_dir = cache_dir
        self.indexes: list[BenchmarkIndex] | None = None
        self.report = ContaminationReport(cfg.ngram, mode, {})

    def index(self) -> None:
        """Read the benchmarks (on first use, so a missing training source fails before any benchmark download).

        A hub benchmark without a pinned revision is skipped, with the reason, in `report` mode (the rows are
        kept either way); in `drop` mode it stops the stage, since rows would be kept unchecked.
        """
        if self.indexes is not None:
            return
        self.indexes = []
        for benchmark in tqdm(self.cfg.benchmarks, desc="indexing benchmarks", unit="set", leave=False):
            origin = benchmark.origin
            if not origin.path and origin.revision is None and self.mode == "report":
                self.report.benchmarks[benchmark.name] = {
                    "origin": describe(origin), "skipped": f"no pinned revision ({origin.revision_note or 'no note'})"}
                continue
            index = index_benchmark(benchmark, self.n, self.cache_dir)
            self.indexes.append(index)
            self.report.benchmarks[benchmark.name] = index.summary()

    def hits(self, row: dict) -> list[str]:
        assert self.indexes is not None
        grams = ngram_hashes(row["question"], self.n) | ngram_hashes(row["answer"], self.n)
        return [index.name for index in self.indexes if not grams.isdisjoint(index.ngrams)]

    def filter(self, rows: Iterable[dict], label: str = "rows") -> Iterator[dict]:
        self.index()
        assert self.indexes is not None
        for row in tqdm(rows, desc=f"decontaminating {label}", unit="rows", leave=False, mininterval=2.0):
            source = row.get("source", "published")
            self.report.rows_checked[source] += 1
            found = self.hits(row) if self.indexes else []
            if found:
                self.report.rows_flagged[source] += 1
                for name in found:
                    self.report.overlaps[source][name] += 1
                if self.mode == "drop":
                    self.report.rows_dropped += 1
                    continue
            yield row
