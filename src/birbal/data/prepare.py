"""The prepare-data stage: published mix or rebuild from sources -> train.jsonl, eval.jsonl, data manifest."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birbal.config import Recipe
from birbal.data.filters import FilterCounts, RowFilter
from birbal.data.sources import PUBLISHED_FIELDS, RAW_FIELDS, checked, read_rows, resolve_path
from birbal.data.template import format_question
from birbal.errors import DataError
from birbal.fsutil import atomic_write_json, atomic_write_text, sha256_file

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
DATA_MANIFEST = "manifest.json"
HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _fetch_published(recipe: Recipe, cache_dir: Path) -> dict[str, Path]:
    published = recipe.data.published
    assert published is not None
    files = {"train": published.train_file, "eval": published.eval_file}
    local = Path(published.name_or_path).expanduser()
    if local.is_dir():
        return {split: local / name for split, name in files.items()}
    from huggingface_hub import hf_hub_download

    from birbal.models import hub_token

    paths = {}
    for split, name in files.items():
        try:
            paths[split] = Path(hf_hub_download(published.name_or_path, name, repo_type="dataset",
                                                revision=published.revision, token=hub_token(),
                                                cache_dir=cache_dir / "hub"))
        except Exception as err:  # the hub client raises many types (offline, 401, 404): all mean "not fetched"
            raise DataError(
                f"could not fetch {name} of dataset {published.name_or_path}@{published.revision} from the "
                f"Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"check network access and HF_TOKEN, or set data.published.name_or_path to a local folder"
            ) from None
    return paths


def _published_rows(recipe: Recipe, cache_dir: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    published = recipe.data.published
    assert published is not None
    paths = _fetch_published(recipe, cache_dir)
    splits: dict[str, list[dict]] = {}
    info: dict[str, Any] = {"source": published.name_or_path, "revision": published.revision, "files": {}}
    for split, path in paths.items():
        digest = sha256_file(path) if path.is_file() else None
        if published.sha256 and digest != published.sha256[split]:
            raise DataError(f"dataset {published.name_or_path}: {path.name} has sha256 {digest}, "
                            f"expected {published.sha256[split]} (data.published.sha256.{split})")
        rows = [{"question": r["question"], "answer": r["answer"]}
                for r in checked(read_rows(path, published.name_or_path), PUBLISHED_FIELDS,
                                 published.name_or_path, path)]
        if published.expected_rows and len(rows) != published.expected_rows[split]:
            raise DataError(f"dataset {published.name_or_path}: {path.name} has {len(rows)} rows, expected "
                            f"{published.expected_rows[split]} (data.published.expected_rows.{split})")
        splits[split] = rows
        info["files"][split] = {"name": path.name, "sha256": digest, "rows": len(rows)}
    return splits["train"], splits["eval"], info


def _rebuilt_rows(recipe: Recipe) -> tuple[list[dict], list[dict], dict[str, Any]]:
    data = recipe.data
    assert data.rebuild is not None
    rng = random.Random(data.seed)
    combined: list[dict] = []
    per_source: dict[str, dict[str, Any]] = {}
    for source in data.rebuild.sources:
        path = resolve_path(source.path)
        rows = [dict(instruction=r["instruction"], input=r["input"], output=r["output"], source=source.name)
                for r in checked(read_rows(path, source.name), RAW_FIELDS, source.name, path)]
        per_source[source.name] = {"path": str(path), "sha256": sha256_file(path), "rows_read": len(rows)}
        combined.extend(rows)
    rng.shuffle(combined)
    counts = FilterCounts()
    row_filter = RowFilter(max_words=data.max_words, min_input_words=data.min_input_words,
                           dedupe_inputs=data.dedupe_inputs)
    kept = [{"question": format_question(r["instruction"], r["input"]), "answer": r["output"], "source": r["source"]}
            for r in row_filter.apply(combined, counts)]
    if len(kept) < 2:
        raise DataError(f"only {len(kept)} row(s) survive the filters ({counts.as_dict()}): nothing to split")
    cut = int((1.0 - data.eval_fraction) * len(kept))
    train, evaluation = kept[:cut], kept[cut:]
    for name, info in per_source.items():
        info["rows_train"] = sum(1 for r in train if r["source"] == name)
        info["rows_eval"] = sum(1 for r in evaluation if r["source"] == name)
    return train, evaluation, {"sources": per_source, "filters": counts.as_dict()}


def token_statistics(rows: list[dict], tokenizer, window: int) -> dict[str, Any]:
    """Tokens per row as training sees them (BOS + question + answer + EOS), with a length histogram."""
    lengths = []
    for start in tqdm(range(0, len(rows), 512), desc="tokenising", unit="batch", leave=False):
        batch = rows[start:start + 512]
        encoded = tokenizer([r["question"] + r["answer"] for r in batch], add_special_tokens=True)["input_ids"]
        lengths.extend(len(ids) + 1 for ids in encoded)
    histogram = Counter()
    for length in lengths:
        edge = next((e for e in HISTOGRAM_EDGES if length <= e), None)
        histogram[f"<={edge}" if edge else f">{HISTOGRAM_EDGES[-1]}"] += 1
    over = sum(1 for n in lengths if n > window)
    return {"rows": len(lengths), "total_tokens": sum(lengths), "max_tokens": max(lengths, default=0),
            "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1), "histogram": dict(histogram),
            "rows_over_window": over, "share_over_window": round(over / max(len(lengths), 1), 6),
            "window": window}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def prepare_data(recipe: Recipe, out_dir: Path, cache_dir: Path, tokenizer) -> dict[str, Any]:
    """Write train.jsonl, eval.jsonl and the data manifest into `out_dir`; return the manifest."""
    if recipe.data.mode == "published":
        train, evaluation, provenance = _published_rows(recipe, cache_dir)
    else:
        train, evaluation, provenance = _rebuilt_rows(recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / TRAIN_FILE, train)
    _write_jsonl(out_dir / EVAL_FILE, evaluation)
    stats = {"train": token_statistics(train, tokenizer, recipe.train.sequence_len),
             "eval": token_statistics(evaluation, tokenizer, recipe.train.sequence_len)}
    manifest = {
        "mode": recipe.data.mode, "seed": recipe.data.seed, "provenance": provenance,
        "rows": {"train": len(train), "eval": len(evaluation)},
        "files": {TRAIN_FILE: sha256_file(out_dir / TRAIN_FILE), EVAL_FILE: sha256_file(out_dir / EVAL_FILE)},
        "tokens": stats,
        "projected_tokens_per_epoch": stats["train"]["total_tokens"],
    }
    atomic_write_json(out_dir / DATA_MANIFEST, manifest)
    return manifest
