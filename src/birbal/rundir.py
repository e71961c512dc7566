"""The run directory: one folder per stage, a `stage.json` record in each, and `manifest.json` gathering them.

A stage is complete only when its `stage.json` says so, and that record is the last thing the stage writes
(atomically). A stage killed half way leaves `running` (or nothing), so it is resumed or redone, never trusted.
A complete stage whose inputs digest is unchanged and whose outputs are all present is skipped on re-run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from birbal.errors import RunDirError
from birbal.fsutil import atomic_write_json, atomic_write_text, digest_of
from birbal.versions import software_versions

STAGES = ("prepare-data", "train", "export", "serve", "evaluate")
STAGE_FOLDERS = {"prepare-data": "data", "train": "train", "export": "export", "serve": "serve",
                 "evaluate": "evaluate"}
RECORD = "stage.json"
MANIFEST = "manifest.json"
IMAGES = "images.json"  # written by `invoke reproduce --runtime docker`: the images' ids and digests
SCHEMA_VERSION = 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    stage: str
    status: str  # running | complete | failed
    inputs: dict[str, Any]
    inputs_digest: str
    started_at: str
    finished_at: str | None = None
    duration_s: float | None = None
    outcome: str | None = None  # e.g. finished | stopped_by_budget (train)
    outputs: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    outputs_digest: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    versions: dict[str, Any] = field(default_factory=software_versions)
    schema_version: int = SCHEMA_VERSION


class RunDir:
    """One reproduction's folder. Everything a run writes lives below it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"run dir {self.path} cannot be created: {err.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunDirError(f"run dir {self.path} is not writable")

    @property
    def run_id(self) -> str:
        return self.path.name

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGE_FOLDERS:
            raise RunDirError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.path / STAGE_FOLDERS[stage]

    def record(self, stage: str) -> StageRecord | None:
        """The stage's record, or None when absent or unreadable (an unreadable record is never complete)."""
        path = self.stage_dir(stage) / RECORD
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return StageRecord(**raw)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            return None

    def outputs_present(self, record: StageRecord) -> bool:
        folder = self.stage_dir(record.stage)
        return all((folder / rel).is_file() for rel in record.outputs)

    def is_complete(self, stage: str, inputs_digest: str | None = None) -> bool:
        record = self.record(stage)
        if record is None or record.status != "complete":
            return False
        if inputs_digest is not None and record.inputs_digest != inputs_digest:
            return False
        return self.outputs_present(record)

    def outputs_digest(self, stage: str) -> str:
        """Digest of a complete stage's outputs: what the next stage's inputs name."""
        record = self.record(stage)
        if record is None or record.status != "complete" or record.outputs_digest is None:
            raise RunDirError(f"stage {stage!r} is not complete in {self.path}: run it first")
        return record.outputs_digest

    def write_record(self, record: StageRecord) -> None:
        atomic_write_json(self.stage_dir(record.stage) / RECORD, asdict(record))
        self.write_manifest()

    def begin(self, stage: str, inputs: dict[str, Any]) -> StageRecord:
        record = StageRecord(stage=stage, status="running", inputs=inputs, inputs_digest=digest_of(inputs),
                             started_at=utc_now())
        record.details["pid"] = os.getpid()
        record.details["_t0"] = time.time()
        self.write_record(record)
        return record

    def finish(self, record: StageRecord, outputs: dict[str, str], details: dict[str, Any] | None = None,
               outcome: str = "finished") -> StageRecord:
        t0 = record.details.pop("_t0", None)
        record.details.pop("pid", None)
        record.status = "complete"
        record.outcome = outcome
        record.outputs = dict(sorted(outputs.items()))
        record.outputs_digest = digest_of(record.outputs)
        record.finished_at = utc_now()
        record.duration_s = round(time.time() - t0, 3) if t0 else None
        record.details.update(details or {})
        self.write_record(record)
        return record

    def fail(self, record: StageRecord, error: str) -> None:
        t0 = record.details.pop("_t0", None)
        record.status = "failed"
        record.error = error
        record.finished_at = utc_now()
        record.duration_s = round(time.time() - t0, 3) if t0 else None
        self.write_record(record)

    def save_recipe(self, recipe_yaml: str) -> Path:
        path = self.path / "recipe.yaml"
        atomic_write_text(path, recipe_yaml)
        return path

    def manifest(self) -> dict[str, Any]:
        stages = {}
        for stage in STAGES:
            record = self.record(stage)
            if record is None:
                continue
            stages[stage] = {
                "status": record.status, "outcome": record.outcome, "inputs_digest": record.inputs_digest,
                "outputs_digest": record.outputs_digest, "outputs": record.outputs,
                "started_at": record.started_at, "finished_at": record.finished_at,
                "duration_s": record.duration_s, "details": record.details, "error": record.error,
            }
        recipe = self.path / "recipe.yaml"
        images = self.path / IMAGES
        return {"images": json.loads(images.read_text()).get("images") if images.is_file() else None,
                "run_id": self.run_id, "schema_version": SCHEMA_VERSION, "updated_at": utc_now(),
                "recipe": recipe.name if recipe.is_file() else None, "versions": software_versions(),
                "stages": stages}

    def write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest())
