"""Check a finished run: every recorded output hash, the training budget and memory cap, and (optionally) another
run's manifest. Returns the problems as lines; an empty list means the run is what its records say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from birbal.fsutil import digest_of, sha256_file
from birbal.rundir import MANIFEST, RECORD, STAGE_FOLDERS, STAGES, RunDir, StageRecord

TRAIN_LIMIT_KEYS = ("budget_hours", "budget_used_s", "max_gpu_memory_gib", "peak_gpu_memory_gib")


def _check_outputs(folder: Path, record: StageRecord) -> list[str]:
    problems = []
    prefix = STAGE_FOLDERS[record.stage]
    for rel, recorded in sorted(record.outputs.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{prefix}/{rel}: recorded in {prefix}/{RECORD} but missing")
            continue
        actual = sha256_file(path)
        if actual != recorded:
            problems.append(f"{prefix}/{rel}: sha256 {actual[:16]}… on disk, {recorded[:16]}… recorded")
    if record.outputs_digest != digest_of(record.outputs):
        problems.append(f"{prefix}/{RECORD}: outputs_digest does not match its own outputs list")
    return problems


def _check_train_limits(record: StageRecord) -> list[str]:
    details = record.details
    missing = [key for key in TRAIN_LIMIT_KEYS if key not in details]
    if missing:
        return [f"train: {RECORD} details lack {', '.join(missing)}: the budget and memory cap cannot be checked"]
    problems = []
    budget_s, used_s = details["budget_hours"] * 3600, details["budget_used_s"]
    if used_s is None or used_s > budget_s:
        problems.append(f"train: used {used_s} s of wall clock, over its budget of {details['budget_hours']} h "
                        f"({budget_s:.0f} s)")
    cap, peak = details["max_gpu_memory_gib"], details["peak_gpu_memory_gib"]
    if cap is not None and (peak is None or peak > cap):
        problems.append(f"train: peak GPU memory {peak} GiB, over its cap of {cap} GiB")
    return problems


def _load_manifest(path: Path) -> dict[str, Any]:
    path = path / MANIFEST if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read manifest {path}: {err}") from err


def compare_manifests(ours: dict[str, Any], theirs: dict[str, Any], label: str = "reference") -> list[str]:
    """Per stage, the outputs whose digests differ or that only one side has. Stages the reference lacks are skipped."""
    problems = []
    for stage, their_stage in (theirs.get("stages") or {}).items():
        our_stage = (ours.get("stages") or {}).get(stage)
        if our_stage is None:
            problems.append(f"{stage}: in the {label} manifest but not in this run")
            continue
        our_outputs, their_outputs = our_stage.get("outputs") or {}, their_stage.get("outputs") or {}
        for rel in sorted(set(our_outputs) | set(their_outputs)):
            if rel not in our_outputs:
                problems.append(f"{stage}: {rel} only in the {label}")
            elif rel not in their_outputs:
                problems.append(f"{stage}: {rel} only in this run")
            elif our_outputs[rel] != their_outputs[rel]:
                problems.append(f"{stage}: {rel} differs (this run {our_outputs[rel][:16]}…, "
                                f"{label} {their_outputs[rel][:16]}…)")
    return problems


def verify_run(run_dir: str | Path, against_manifest: str | Path | None = None) -> list[str]:
    """Problems found in `run_dir` (and against another run's manifest.json, a file or a run dir); [] when clean."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        return [f"{path}: no such run directory"]
    run = RunDir(path)
    problems: list[str] = []
    seen = 0
    for stage in STAGES:
        folder = run.stage_dir(stage)
        if not (folder / RECORD).is_file():
            continue
        seen += 1
        record = run.record(stage)
        if record is None:
            problems.append(f"{STAGE_FOLDERS[stage]}/{RECORD}: unreadable or not a stage record")
            continue
        if record.status != "complete":
            problems.append(f"{stage}: status {record.status}" + (f" ({record.error})" if record.error else ""))
            continue
        problems += _check_outputs(folder, record)
        if stage == "train":
            problems += _check_train_limits(record)
    if seen == 0:
        problems.append(f"{path}: no stage records (nothing has run here)")
    manifest_path = path / MANIFEST
    if seen and manifest_path.is_file():
        recorded = _load_manifest(manifest_path)
        current = run.manifest()
        problems += [f"{MANIFEST}: {line}" for line in compare_manifests(recorded, current, "stage records")]
    elif seen:
        problems.append(f"{MANIFEST}: missing")
    if against_manifest is not None:
        try:
            reference = _load_manifest(Path(against_manifest))
        except ValueError as err:
            return [*problems, str(err)]
        problems += compare_manifests(run.manifest(), reference)
    return problems
