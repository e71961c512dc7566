"""The prepare-data stage: published mix or rebuild from sources -> train.jsonl, eval.jsonl, manifest, contamination.

Outputs are written to hidden temporaries and renamed into place only after every check passed; the manifest is
removed first and written last, so a directory with a manifest is a complete one and a cut-off run is redone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from birbal.config import Recipe
from birbal.data.contamination import Decontaminator
from birbal.data.mix import rebuild_rows
from birbal.data.output import JsonlWriter, TokenStats, remove_partials
from birbal.data.published import fetch_published, published_rows
from birbal.errors import DataError
from birbal.fsutil import atomic_write_json, sha256_file

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
DATA_MANIFEST = "manifest.json"
CONTAMINATION_FILE = "contamination.json"
TOKEN_WINDOW = 8192  # the recipe's packing window; the manifest also reports the profile's own sequence_len


def _write_split(path: Path, rows, stats: TokenStats, decontaminator: Decontaminator, label: str) -> JsonlWriter:
    writer = JsonlWriter(path)
    with writer:
        for row in decontaminator.filter(rows, label):
            writer.write(row)
            stats.add(row)
    return writer


def _published(recipe: Recipe, out_dir: Path, cache_dir: Path, tokenizer, decontaminator: Decontaminator):
    published = recipe.data.published
    assert published is not None
    paths = fetch_published(published, cache_dir)
    info: dict[str, Any] = {"source": published.name_or_path, "revision": published.revision, "files": {}}
    writers, stats = {}, {}
    for split, out_name in (("train", TRAIN_FILE), ("eval", EVAL_FILE)):
        digest = sha256_file(paths[split])
        if published.sha256 and digest != published.sha256[split]:
            raise DataError(f"dataset {published.name_or_path}: {paths[split].name} has sha256 {digest}, expected "
                            f"{published.sha256[split]} (data.published.sha256.{split})")
        counter = {"rows": 0}
        stats[split] = TokenStats(tokenizer, windows=(TOKEN_WINDOW, recipe.train.sequence_len),
                                  tokenization=recipe.train.tokenization)
        writers[split] = _write_split(out_dir / out_name, published_rows(paths[split], published, counter),
                                      stats[split], decontaminator, split)
        if published.expected_rows and counter["rows"] != published.expected_rows[split]:
            raise DataError(f"dataset {published.name_or_path}: {paths[split].name} has {counter['rows']} rows, "
                            f"expected {published.expected_rows[split]} (data.published.expected_rows.{split})")
        info["files"][split] = {"name": paths[split].name, "sha256": digest, "rows": counter["rows"]}
    return writers, stats, info


def _rebuilt(recipe: Recipe, out_dir: Path, cache_dir: Path, tokenizer, decontaminator: Decontaminator):
    train, evaluation, provenance = rebuild_rows(recipe, cache_dir, tokenizer)
    stats = {split: TokenStats(tokenizer, windows=(TOKEN_WINDOW, recipe.train.sequence_len),
                                  tokenization=recipe.train.tokenization)
             for split in ("train", "eval")}
    writers = {"train": _write_split(out_dir / TRAIN_FILE, train, stats["train"], decontaminator, "train"),
               "eval": _write_split(out_dir / EVAL_FILE, evaluation, stats["eval"], decontaminator, "eval")}
    for split, writer in writers.items():
        for name, count in writer.per_source.items():
            provenance["sources"][name][f"rows_{split}"] = count
    return writers, stats, provenance


def prepare_data(recipe: Recipe, out_dir: Path, cache_dir: Path, tokenizer) -> dict[str, Any]:
    """Write train.jsonl, eval.jsonl, contamination.json and the data manifest into `out_dir`; return the manifest."""
    data = recipe.data
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DATA_MANIFEST).unlink(missing_ok=True)
    decontaminator = Decontaminator(data.contamination, data.decontaminate, cache_dir)
    runner = _published if data.mode == "published" else _rebuilt
    try:
        writers, stats, provenance = runner(recipe, out_dir, cache_dir, tokenizer, decontaminator)
        rows = {split: writer.rows for split, writer in writers.items()}
        if rows["train"] == 0 or rows["eval"] == 0:
            raise DataError(f"data: {rows['train']} train and {rows['eval']} eval rows after filtering; both must "
                            f"be > 0")
        for writer in writers.values():
            writer.commit()
    finally:
        remove_partials(out_dir)
    atomic_write_json(out_dir / CONTAMINATION_FILE, decontaminator.report.as_dict())
    token_stats = {split: s.as_dict() for split, s in stats.items()}
    manifest = {
        "mode": data.mode, "seed": data.seed, "provenance": provenance, "rows": rows,
        "files": {name: sha256_file(out_dir / name) for name in (TRAIN_FILE, EVAL_FILE, CONTAMINATION_FILE)},
        "tokens": token_stats,
        "projected_tokens_per_epoch": token_stats["train"]["total_tokens"],
        "contamination": {"mode": data.decontaminate, "ngram": data.contamination.ngram,
                          "rows_flagged": decontaminator.report.as_dict()["rows_flagged"],
                          "rows_dropped": decontaminator.report.rows_dropped},
    }
    atomic_write_json(out_dir / DATA_MANIFEST, manifest)
    print(f"[birbal] prepare-data: {rows['train']:,} train / {rows['eval']:,} eval rows; projected "
          f"{manifest['projected_tokens_per_epoch']:,} tokens per epoch", file=sys.stderr)
    return manifest
