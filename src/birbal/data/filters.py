"""The winners' row filters. Word counts split on single spaces, as their scripts did (`str.split(" ")`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


def words(text: str) -> int:
    return len(text.split(" "))


@dataclass
class FilterCounts:
    read: int = 0
    too_long: int = 0
    duplicate_input: int = 0
    short_input: int = 0
    empty_output: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RowFilter:
    """instruction+input under `max_words`; drop exact-duplicate inputs; drop inputs of `min_input_words` or fewer.

    The order (length, then duplicate, then short input) is the winners': the length filter ran per source,
    the duplicate and short-input filters on the combined, shuffled mix.
    """

    max_words: int = 800
    min_input_words: int = 4
    dedupe_inputs: bool = True
    seen_inputs: set[str] = field(default_factory=set)

    def apply(self, rows: Iterable[dict], counts: FilterCounts) -> Iterator[dict]:
        for row in rows:
            counts.read += 1
            if words(f"{row['instruction']} {row['input']}") >= self.max_words:
                counts.too_long += 1
                continue
            if self.dedupe_inputs:
                if row["input"] in self.seen_inputs:
                    counts.duplicate_input += 1
                    continue
                self.seen_inputs.add(row["input"])
            if words(row["input"]) <= self.min_input_words:
                counts.short_input += 1
                continue
            if not row["output"].strip():
                counts.empty_output += 1
                continue
            counts.kept += 1
            yield row
