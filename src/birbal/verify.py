"""Check a finished run: every recorded output hash, that each stage was made from the outputs its upstream stage
records now, the training budget and memory cap, and (optionally) another run's manifest. Returns the problems as
lines; an empty list means the run is what its records say. Read only: nothing in the run dir is written, so an
archived run, or another user's, can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from birbal.errors import RunDirError
from birbal.rundir import MANIFEST, RECORD, STAGE_FOLDERS, STAGES, RunDir, StageRecord, output_problems
from birbal.train.budget import describe_plan

# Which upstream stage's outputs digest each stage's inputs name (stages.stage_inputs; serve and evaluate name
# the served model's stage).
UPSTREAM = {"train": "prepare-data", "export": "train", "evaluate": "export"}

TRAIN_LIMIT_KEYS = ("budget_hours", "budget_used_s", "max_gpu_memory_gib", "peak_gpu_memory_gib")


def _check_outputs(folder: Path, record: StageRecord) -> list[str]:
    return output_problems(folder, record)


def _check_chain(run: RunDir, record: StageRecord) -> list[str]:
    """A complete stage made from other upstream outputs than its upstream stage records now is stale: a recipe
    change re-ran the upstream stage and this one was not re-run after it."""
    upstream = UPSTREAM.get(record.stage)
    if upstream is None or upstream not in record.inputs:
        return []
    theirs = run.record(upstream)
    now = theirs.outputs_digest if theirs is not None and theirs.status == "complete" else None
    used = record.inputs[upstream]
    if now == used:
        return []
    return [f"{record.stage}: made from {upstream} outputs {str(used)[:12]}…, but {upstream} now records "
            f"{str(now)[:12]}… (re-run {record.stage} and the stages after it)"]


def _check_train_limits(record: StageRecord) -> list[str]:
    details = record.details
    missing = [key for key in TRAIN_LIMIT_KEYS if key not in details]
    if missing:
        return [f"train: {RECORD} details lack {', '.join(missing)}: the budget and memory cap cannot be checked"]
    problems = []
    budget_s, used_s = details["budget_hours"] * 3600, details["budget_used_s"]
    if used_s is None or used_s > budget_s:
        plan = details.get("last_step_plan")
        cause = f": {describe_plan(plan)}" if used_s is not None and plan else ""
        problems.append(f"train: used {used_s} s of wall clock, over its budget of {details['budget_hours']} h "
                        f"({budget_s:.0f} s){cause}")
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


def compare_manifests(ours: dict[str, Any], theirs: dict[str, Any], label: str = "reference",
                      skip_volatile: bool = True) -> list[str]:
    """Per stage, the outputs whose digests differ or that only one side has. Stages the reference lacks are
    skipped, and (`skip_volatile`) outputs either side marks volatile: timing logs, which differ between any two
    runs."""
    problems = []
    for stage, their_stage in (theirs.get("stages") or {}).items():
        our_stage = (ours.get("stages") or {}).get(stage)
        if our_stage is None:
            problems.append(f"{stage}: in the {label} manifest but not in this run")
            continue
        our_outputs, their_outputs = our_stage.get("outputs") or {}, their_stage.get("outputs") or {}
        volatile = set(our_stage.get("volatile") or ()) | set(their_stage.get("volatile") or ()) \
            if skip_volatile else set()
        for rel in sorted((set(our_outputs) | set(their_outputs)) - volatile):
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
    try:
        run = RunDir(path, writable=False)
    except RunDirError as err:
        return [str(err)]
    problems: list[str] = []
    seen = 0
    for stage in STAGES:
        folder = run.stage_dir(stage)
        if not (folder / RECORD).is_file():
            attempt = run.attempt(stage)
            if attempt is not None:  # tried, never completed
                seen += 1
                problems.append(f"{stage}: status {attempt.status}" + (f" ({attempt.error})" if attempt.error else ""))
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
        problems += _check_chain(run, record)
        if stage == "train":
            problems += _check_train_limits(record)
    if seen == 0:
        problems.append(f"{path}: no stage records (nothing has run here)")
    manifest_path = path / MANIFEST
    if seen and manifest_path.is_file():
        recorded = _load_manifest(manifest_path)
        current = run.manifest()
        problems += [f"{MANIFEST}: {line}" for line in compare_manifests(recorded, current, "stage records",
                                                                              skip_volatile=False)]
    elif seen:
        problems.append(f"{MANIFEST}: missing")
    if against_manifest is not None:
        try:
            reference = _load_manifest(Path(against_manifest))
        except ValueError as err:
            return [*problems, str(err)]
        problems += compare_manifests(run.manifest(), reference)
    return problems
