"""One loader per source: hub rows (or a local file of their schema) -> {instruction, input, output, source}.

Each loader applies what the winners' scripts did to that source alone, in their order, and counts the rows left
after every step in a `SourceReport`. The shuffle of the combined mix and the filters across sources are in
`mix.py`. Randomness comes from a `random.Random` seeded from (recipe seed, source name) so sources are
independent of each other's order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birbal.config.data import (
    CnnDailyMailSource,
    InstructionRowsSource,
    LengthRule,
    LimaSource,
    MathInstructSource,
    PlatypusSource,
    QuacSource,
)
from birbal.data.filters import words
from birbal.data.sources import RAW_FIELDS, checked, describe, origin_rows, resolve_path
from birbal.errors import DataError
from birbal.fsutil import sha256_file


@dataclass
class SourceReport:
    """What happened to one source's rows: where they came from and how many survived each step."""

    name: str
    kind: str
    origin: str
    revision: str | None
    steps: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, step: str, rows: Iterable[dict]) -> Iterator[dict]:
        """Pass rows through, counting them under `step`. The key is made now, not on first row, so the steps
        keep the order of the code even though the generators run outermost first."""
        self.steps[step] = 0
        return self._counted(step, rows)

    def _counted(self, step: str, rows: Iterable[dict]) -> Iterator[dict]:
        for row in rows:
            self.steps[step] += 1
            yield row

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "origin": self.origin, "revision": self.revision, "rows_after": self.steps,
                **self.extra}


def source_rng(seed: int, name: str) -> random.Random:
    # str seeds are hashed with sha512 by `random`, so this is stable across processes and Python versions
    return random.Random(f"{seed}:{name}")


def keep_length(rule: LengthRule, limit: int, row: dict) -> bool:
    if rule == "none":
        return True
    n = words(f"{row['instruction']} {row['input']}")
    return n < limit if rule == "lt" else n <= limit


def length_filtered(rows: Iterable[dict], rule: LengthRule, limit: int) -> Iterator[dict]:
    return (row for row in rows if keep_length(rule, limit, row))


def _report(source, origin_text: str, revision: str | None) -> SourceReport:
    return SourceReport(name=source.name, kind=source.kind, origin=origin_text, revision=revision)


def _origin_report(source) -> SourceReport:
    origin = source.origin
    report = _report(source, describe(origin), None if origin.path else origin.revision)
    if origin.path:
        path = resolve_path(origin.path)
        if path.is_file():
            report.extra["sha256"] = sha256_file(path)
    return report


def _progress(rows: Iterable[dict], name: str) -> Iterator[dict]:
    return tqdm(rows, desc=f"reading {name}", unit="rows", leave=False, mininterval=2.0)


# --- MathInstruct ------------------------------------------------------------------------------------------------

def strip_hash_suffix(text: str) -> str:
    """GSM8K-style `... #### 42`: keep what comes before the last `####`."""
    return text[:text.rindex("####")].strip() if "####" in text else text


def format_math_answer(answer: str, marker: str) -> str:
    """Reasoning (its `####` suffix stripped), a newline, then the text from `marker` on; unchanged without it."""
    if marker not in answer:
        return answer.strip()
    at = answer.index(marker)
    return f"{strip_hash_suffix(answer[:at].strip())}\n{answer[at:].strip()}".strip()


def load_mathinstruct(source: MathInstructSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rng = source_rng(seed, source.name)
    fields = {"source": str, "instruction": str, "output": str}
    rows = report.count("read", checked(_progress(origin_rows(source.origin, source.name, cache_dir), source.name),
                                        fields, source.name, report.origin))
    subsets = set(source.subsets)
    picked = report.count("subset", (r for r in rows if r["source"] in subsets))
    shaped = []
    for row in picked:
        question = row["instruction"].lower() if rng.random() < source.lowercase_prob else row["instruction"]
        shaped.append({"instruction": "", "input": question.strip(),
                       "output": format_math_answer(row["output"], source.answer_marker), "source": source.name})
    long_enough = [r for r in report.count("input_words", (r for r in shaped if words(r["input"]) >
                                                            source.min_input_words))]
    rng.shuffle(long_enough)
    capped = list(report.count("cap", long_enough[:source.cap]))
    # their combine step: length filter and `print(` filter after the cap, so fewer than `cap` rows remain
    kept = report.count("length", length_filtered(capped, source.length_rule, source.max_words))
    if source.drop_print:
        kept = report.count("no_print", (r for r in kept if "print(" not in r["output"]))
    return list(kept), report


# --- LIMA --------------------------------------------------------------------------------------------------------

def load_lima(source: LimaSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), {"conversations": list},
                                        source.name, report.origin))
    turns = []
    for row in rows:
        convo = row["conversations"]
        if len(convo) < 2 or not all(isinstance(t, str) for t in convo[:2]):
            raise DataError(f"source {source.name!r}: {report.origin}: a conversation needs a user turn and an "
                            f"assistant turn (strings), got {convo[:2]!r}")
        turns.append({"instruction": "", "input": convo[0], "output": convo[1], "source": source.name})
    kept = report.count("length", length_filtered(turns, source.length_rule, source.max_words))
    return list(kept), report


# --- Open-Platypus -----------------------------------------------------------------------------------------------

def _platypus_row(row: dict, source: PlatypusSource) -> dict:
    if source.instruction_as_input and not row["input"].strip():
        return {"instruction": "", "input": row["instruction"], "output": row["output"], "source": source.name}
    return {"instruction": row["instruction"], "input": row["input"], "output": row["output"], "source": source.name}


def load_platypus(source: PlatypusSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    fields = {"instruction": str, "input": str, "output": str, "data_source": str}
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), fields, source.name,
                                        report.origin))
    excluded = set(source.exclude_data_sources)
    human = report.count("no_llm", (r for r in rows if r["data_source"] not in excluded))
    shaped = (_platypus_row(r, source) for r in human)
    kept = report.count("length", length_filtered(shaped, source.length_rule, source.max_words))
    return list(kept), report


# --- QuAC --------------------------------------------------------------------------------------------------------

QUAC_FIELDS = {"wikipedia_page_title": str, "section_title": str, "context": str, "questions": list,
               "orig_answers": dict}


def quac_turns(row: dict, instruction: str, max_turns: int | None, name: str) -> Iterator[dict]:
    answers = row["orig_answers"].get("texts")
    if not isinstance(answers, list) or len(answers) != len(row["questions"]):
        raise DataError(f"source {name!r}: QuAC dialogue {row.get('dialogue_id')!r}: orig_answers.texts must list "
                        f"one answer per question ({len(row['questions'])})")
    header = f"Title: {row['wikipedia_page_title']}\nSection: {row['section_title']}\n\n{row['context']}\n\n"
    history = ""
    for turn, (question, answer) in enumerate(zip(row["questions"], answers, strict=True)):
        if max_turns is not None and turn >= max_turns:
            break
        yield {"instruction": instruction, "input": f"{header}{history}Q: {question}", "output": answer,
               "source": name}
        history += f"Q: {question}\nA: {answer}\n"


def load_quac(source: QuacSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), QUAC_FIELDS,
                                        source.name, report.origin))
    turns = report.count("turns", (t for r in rows for t in quac_turns(r, source.instruction, source.max_turns,
                                                                       source.name)))
    kept = report.count("length", length_filtered(turns, source.length_rule, source.max_words))
    return list(kept), report


# --- CNN/DailyMail -----------------------------------------------------------------------------------------------

def reservoir(rows: Iterable[dict], k: int, rng: random.Random) -> list[dict]:
    """A uniform random sample of k rows in one pass, holding only k (the train split is 287k articles)."""
    sample: list[dict] = []
    for seen, row in enumerate(rows):
        if seen < k:
            sample.append(row)
        else:
            slot = rng.randint(0, seen)
            if slot < k:
                sample[slot] = row
    return sample


def load_cnn_dailymail(source: CnnDailyMailSource, seed: int, cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(_progress(origin_rows(source.origin, source.name, cache_dir), source.name),
                                        {"article": str, "highlights": str}, source.name, report.origin))
    shaped = ({"instruction": source.instruction, "input": r["article"], "output": r["highlights"],
               "source": source.name} for r in rows)
    kept: Iterable[dict] = length_filtered(shaped, source.length_rule, source.max_words)
    kept = report.count("length", kept)
    if source.sample is not None:
        kept = report.count("sample", reservoir(kept, source.sample, source_rng(seed, source.name)))
    return list(kept), report


# --- rows already shaped (the winners' Drive files) --------------------------------------------------------------

def load_instruction_rows(source: InstructionRowsSource, seed: int,
                          cache_dir: Path) -> tuple[list[dict], SourceReport]:
    report = _origin_report(source)
    rows = report.count("read", checked(origin_rows(source.origin, source.name, cache_dir), RAW_FIELDS,
                                        source.name, report.origin))
    shaped = ({"instruction": source.instruction_override if source.instruction_override is not None
               else r["instruction"], "input": r["input"], "output": r["output"], "source": source.name}
              for r in rows)
    kept = report.count("length", length_filtered(shaped, source.length_rule, source.max_words))
    return list(kept), report


Loader = Callable[[Any, int, Path], tuple[list[dict], SourceReport]]
LOADERS: dict[str, Loader] = {
    "mathinstruct": load_mathinstruct,
    "lima": load_lima,
    "platypus": load_platypus,
    "quac": load_quac,
    "cnn_dailymail": load_cnn_dailymail,
    "instruction_rows": load_instruction_rows,
}
