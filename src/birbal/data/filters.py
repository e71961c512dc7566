"""The winners' filters on the combined mix. Word counts split on single spaces, as their scripts did.

Per-source length filters live with each loader (`loaders.keep_length`): upstream compared differently per source.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


def words(text: str) -> int:
    """`len(text.split(" "))`: an empty string counts as one word, as upstream's check did."""
    return len(text.split(" "))


@dataclass
class FilterCounts:
    read: int = 0
    duplicate_input: int = 0
    short_input: int = 0
    empty_output: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class MixFilter:
    """Drop exact-duplicate inputs, then inputs of `min_input_words` words or fewer (their combine step).

    The order matters and is upstream's: an input enters the seen-set before the length check, so a short input
    also shadows its later duplicates, and the first copy in shuffled order is the one kept. Upstream's output
    check (`len(output.split(" ")) < 1`) can never fire; `drop_empty_output` turns a real one on.
    """

    min_input_words: int = 4
    dedupe_inputs: bool = True
    drop_empty_output: bool = False
    seen_inputs: set[str] = field(default_factory=set)

    def apply(self, rows: Iterable[dict], counts: FilterCounts) -> Iterator[dict]:
        for row in rows:
            counts.read += 1
            if self.dedupe_inputs:
                if row["input"] in self.seen_inputs:
                    counts.duplicate_input += 1
                    continue
                self.seen_inputs.add(row["input"])
            if words(row["input"]) <= self.min_input_words:
                counts.short_input += 1
                continue
            if self.drop_empty_output and not row["output"].strip():
                counts.empty_output += 1
                continue
            counts.kept += 1
            yield row
