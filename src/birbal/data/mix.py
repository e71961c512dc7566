"""Rebuild mode: load every source, combine, shuffle, filter, template and split, all from one seed."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birbal.config import Recipe
from birbal.data.filters import FilterCounts, MixFilter
from birbal.data.loaders import LOADERS, SourceReport
from birbal.data.sources import PUBLISHED_FIELDS, checked, read_rows, resolve_path, shown_path
from birbal.data.template import format_question


def load_sources(recipe: Recipe, cache_dir: Path, tokenizer) -> tuple[list[dict], dict[str, SourceReport]]:
    """Every source's rows, in the recipe's order (upstream: QuAC, openQA, CNN/DM, math, Platypus, NI, LIMA)."""
    data = recipe.data
    assert data.rebuild is not None
    combined: list[dict] = []
    reports: dict[str, SourceReport] = {}
    for source in data.rebuild.sources:
        if source.kind == "natural_instructions":
            from birbal.data.inference import launch_workers, make_predictor, model_key, worker_processes
            from birbal.data.ni import load_natural_instructions

            processes = worker_processes(source.predictions)
            rows, report = load_natural_instructions(
                source, data.seed, cache_dir,
                predictor_factory=lambda s=source: make_predictor(recipe, cache_dir, tokenizer, s.predictions),
                model_key=model_key(recipe, source.predictions),
                launch=None if processes == 1 else (
                    lambda folder, names, s=source, n=processes: launch_workers(recipe, s, data.seed, cache_dir,
                                                                                folder, names, n)))
        else:
            rows, report = LOADERS[source.kind](source, data.seed, cache_dir)
        reports[source.name] = report
        combined.extend(rows)
    return combined, reports


def rebuild_rows(recipe: Recipe, cache_dir: Path, tokenizer) -> tuple[list[dict], list[dict], dict[str, Any]]:
    data = recipe.data
    combined, reports = load_sources(recipe, cache_dir, tokenizer)
    random.Random(f"{data.seed}:mix").shuffle(combined)
    counts = FilterCounts()
    mix_filter = MixFilter(min_input_words=data.min_input_words, dedupe_inputs=data.dedupe_inputs,
                           drop_empty_output=data.drop_empty_output)
    kept = [{"question": format_question(r["instruction"], r["input"]), "answer": r["output"], "source": r["source"]}
            for r in mix_filter.apply(tqdm(combined, desc="filtering mix", unit="rows", leave=False,
                                           mininterval=2.0), counts)]
    del combined
    cut = int((1.0 - data.eval_fraction) * len(kept))
    kept_per_source = Counter(r["source"] for r in kept)
    provenance: dict[str, Any] = {"sources": {}, "mix_filters": counts.as_dict()}
    for name, report in reports.items():
        info = report.as_dict()
        info["rows_after_mix_filters"] = kept_per_source.get(name, 0)
        provenance["sources"][name] = info
    assert data.rebuild is not None
    if data.rebuild.compare_with:
        provenance["closeness"] = closeness(resolve_path(data.rebuild.compare_with), kept, recipe)
    return kept[:cut], kept[cut:], provenance


def _row_key(question: str, answer: str) -> bytes:
    return hashlib.blake2b(f"{question}\x00{answer}".encode(), digest_size=12).digest()


def closeness(folder: Path, rows: list[dict], recipe: Recipe) -> dict[str, Any]:
    """How many rebuilt rows also appear in the published set (same question and answer; same question alone)."""
    published = recipe.data.published
    names = (published.train_file, published.eval_file) if published else ("train_dataset.json",
                                                                           "eval_dataset.json")
    pairs: set[bytes] = set()
    questions: set[bytes] = set()
    total = 0
    for name in names:
        path = folder / name
        for row in checked(read_rows(path, f"published copy {folder}"), PUBLISHED_FIELDS, "published copy", path):
            pairs.add(_row_key(row["question"], row["answer"]))
            questions.add(_row_key(row["question"], ""))
            total += 1
    per_source: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = per_source.setdefault(row["source"], {"rows": 0, "same_question_and_answer": 0, "same_question": 0})
        entry["rows"] += 1
        entry["same_question_and_answer"] += _row_key(row["question"], row["answer"]) in pairs
        entry["same_question"] += _row_key(row["question"], "") in questions
    both = sum(e["same_question_and_answer"] for e in per_source.values())
    return {"published_copy": shown_path(folder), "published_rows": total, "rebuilt_rows": len(rows),
            "rows_in_common": both, "share_of_published": round(both / max(total, 1), 6),
            "per_source": dict(sorted(per_source.items()))}
