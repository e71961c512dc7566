"""The run directory: one folder per stage, a `stage.json` record in each, and `manifest.json` gathering them.

A stage's `stage.json` is written only when the stage runs to an end (complete), atomically, as the last thing the
stage writes. An attempt in progress, and one that failed or was killed, lives in `stage.attempt.json` beside it,
so a failure never overwrites a complete record; the attempt file goes when the stage next completes.
A complete stage is skipped on re-run when its inputs digest is unchanged and its outputs still hash to the
record; a downstream stage trusts an upstream output only after its bytes hash to the upstream record
(`verified_outputs_digest`).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from birbal.errors import RunDirError
from birbal.fsutil import ATTEMPT_RECORD, atomic_write_json, atomic_write_text, digest_of, sha256_file
from birbal.versions import software_versions

STAGES = ("prepare-data", "train", "export", "serve", "evaluate")
STAGE_FOLDERS = {"prepare-data": "data", "train": "train", "export": "export", "serve": "serve",
                 "evaluate": "evaluate"}
RECORD = "stage.json"
ATTEMPT = ATTEMPT_RECORD  # stage.attempt.json: the latest attempt that has not completed (running or failed)
MANIFEST = "manifest.json"
RUN_ID = "run-id"  # a random id made at the first stage, so a server can prove which run it serves
IMAGES = "images.json"  # written by `invoke reproduce --runtime docker`: the images' ids and digests
SCHEMA_VERSION = 1
# Outputs whose bytes hold timings (step seconds, wall-clock sessions): recorded and re-hashed like every output,
# but not comparable between two reproductions (`verify --against` lists them apart).
VOLATILE_OUTPUTS = {"train": ("metrics.jsonl", "ledger.jsonl")}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def published_digest(recipe) -> str:
    """The identity of a published model (birbal-submission): the base and the adapter at their pinned commits. A hub
    commit names its files' bytes, so this is what the server reports in /health and evaluate expects."""
    published = recipe.serve.published_adapter
    return digest_of({"base": f"{recipe.model.name_or_path}@{recipe.model.revision}",
                      "adapter": f"{published.name_or_path}@{published.revision}"})


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
    recipe: dict[str, Any] | None = None  # the resolved recipe (flattened keys) the stage ran with
    volatile: list[str] = field(default_factory=list)  # outputs holding timings: not compared between runs


def flatten(payload: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: recipe values by dotted key, to name the keys that changed."""
    if isinstance(payload, dict) and payload:
        out: dict[str, Any] = {}
        for key, value in payload.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): payload}


def changed_keys(before: dict[str, Any] | None, after: dict[str, Any] | None,
                 sections: tuple[str, ...] | None = None) -> list[str]:
    """`key: old -> new` for each flattened recipe key that differs (within `sections`, dotted prefixes)."""
    if before is None or after is None:
        return []  # a record from before recipes were recorded: nothing to name
    keys = sorted(set(before) | set(after))
    if sections is not None:
        keys = [k for k in keys if any(k == s or k.startswith(s + ".") for s in sections)]
    def shown(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k}: {shown(before.get(k, '(absent)'))} -> {shown(after.get(k, '(absent)'))}" for k in keys
            if before.get(k, "(absent)") != after.get(k, "(absent)")]


def output_problems(folder: Path, record: StageRecord, only: str | None = None) -> list[str]:
    """Each recorded output of `record` (those under `only`, a relative folder prefix, when given) that is missing
    or whose bytes no longer hash to the record. The files are hashed in parallel (hashlib and file reads release
    the GIL): a 7B model's shards take seconds instead of tens of seconds at every server start."""
    from concurrent.futures import ThreadPoolExecutor

    problems = []
    prefix = STAGE_FOLDERS[record.stage]
    items = [(rel, recorded) for rel, recorded in sorted(record.outputs.items()) if only is None or rel.startswith(only)]
    present = [(rel, recorded) for rel, recorded in items if (folder / rel).is_file()]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(present)))) as pool:
        actual = dict(zip([rel for rel, _ in present], pool.map(lambda item: sha256_file(folder / item[0]), present),
                          strict=True))
    for rel, recorded in items:
        if rel not in actual:
            problems.append(f"{prefix}/{rel}: recorded in {prefix}/{RECORD} but missing")
        elif actual[rel] != recorded:
            problems.append(f"{prefix}/{rel}: sha256 {actual[rel][:16]}… on disk, {recorded[:16]}… recorded")
    if record.outputs_digest != digest_of(record.outputs):
        problems.append(f"{prefix}/{RECORD}: outputs_digest does not match its own outputs list")
    return problems


class RunDir:
    """One reproduction's folder. Everything a run writes lives below it."""

    def __init__(self, path: str | Path, writable: bool = True):
        """`writable=False` reads a run (verify, report of an archived run): nothing is created or demanded."""
        self.path = Path(path).expanduser().resolve()
        self.writable = writable
        self.recipe_yaml: str | None = None  # written to recipe.yaml when a stage completes (the CLI sets it)
        self.recipe_values: dict[str, Any] | None = None  # recorded in each completed stage's record
        self._verified: dict[str, str] = {}
        if not writable:
            if not self.path.is_dir():
                raise RunDirError(f"run dir {self.path} does not exist")
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"run dir {self.path} cannot be created: {err.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunDirError(f"run dir {self.path} is not writable")

    @property
    def run_id(self) -> str:
        """This run's id: `<folder name>-<8 hex>`, made once and kept in `run-id` (the folder name alone when the
        run dir is read-only and has none). A server reports it, so evaluate can tell this run's from another's."""
        path = self.path / RUN_ID
        try:
            text = path.read_text().strip()
            if text:
                return text
        except (OSError, UnicodeDecodeError):
            pass
        if not self.writable:
            return self.path.name
        text = f"{self.path.name}-{secrets.token_hex(4)}"
        atomic_write_text(path, text + "\n")
        return text

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGE_FOLDERS:
            raise RunDirError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.path / STAGE_FOLDERS[stage]

    @staticmethod
    def _read(path: Path) -> StageRecord | None:
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return StageRecord(**raw)
        except (OSError, json.JSONDecodeError, TypeError, UnicodeDecodeError):
            return None

    def record(self, stage: str) -> StageRecord | None:
        """The stage's record (`stage.json`: complete, or left by an older version), or None when absent or
        unreadable (an unreadable record is never complete)."""
        return self._read(self.stage_dir(stage) / RECORD)

    def attempt(self, stage: str) -> StageRecord | None:
        """The stage's latest attempt that has not completed (running, or failed with its error), or None."""
        return self._read(self.stage_dir(stage) / ATTEMPT)

    def latest(self, stage: str) -> StageRecord | None:
        """What the stage did last: its unfinished attempt when there is one, else its record."""
        return self.attempt(stage) or self.record(stage)

    def outputs_present(self, record: StageRecord) -> bool:
        folder = self.stage_dir(record.stage)
        return all((folder / rel).is_file() for rel in record.outputs)

    def output_problems(self, stage: str) -> list[str]:
        """The complete stage's outputs that are missing or no longer hash to its record ([] when all do)."""
        record = self.record(stage)
        if record is None or record.status != "complete":
            return [f"{stage}: not complete"]
        return output_problems(self.stage_dir(stage), record)

    def is_complete(self, stage: str, inputs_digest: str | None = None) -> bool:
        record = self.record(stage)
        if record is None or record.status != "complete":
            return False
        if inputs_digest is not None and record.inputs_digest != inputs_digest:
            return False
        return self.outputs_present(record)

    def outputs_digest(self, stage: str) -> str:
        """Digest of a complete stage's outputs, as recorded (no re-hash: see `verified_outputs_digest`)."""
        record = self.record(stage)
        if record is None or record.status != "complete" or record.outputs_digest is None:
            raise RunDirError(f"stage {stage!r} is not complete in {self.path}: run it first")
        return record.outputs_digest

    def verified_outputs_digest(self, stage: str) -> str:
        """The outputs digest of a complete stage, after re-hashing every output it recorded: what a downstream
        stage may trust. Raises RunDirError naming the first file that is missing or changed."""
        digest = self.outputs_digest(stage)
        if self._verified.get(stage) == digest:
            return digest  # hashed already by this process
        problems = self.output_problems(stage)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RunDirError(f"{problems[0]}{more}: the {stage} stage's outputs are not what it recorded; run "
                              f"the {stage} stage again (it redoes a stage whose outputs changed), then this one")
        self._verified[stage] = digest
        return digest

    def model_digest(self, serve_model: str) -> tuple[str, str]:
        """(digest, stage) of the model this run serves, verified: the export's outputs for `merged`, the export's
        copy of the adapter (`export/adapter/`, what the server loads) for `adapter`. A server reports it in
        GET /health; evaluate checks it."""
        if serve_model == "merged":
            return self.verified_outputs_digest("export"), "export"
        # the adapter's files only: the server loads nothing else of the export (a birbal-4090 export also holds
        # the merged weights, 14.5 GB at 7B, whose re-hash at every start was most of a restart's time)
        self.outputs_digest("export")  # complete, or RunDirError
        record = self.record("export")
        assert record is not None
        problems = output_problems(self.stage_dir("export"), record, only="adapter/")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RunDirError(f"{problems[0]}{more}: the export stage's outputs are not what it recorded; run "
                              f"the export stage again (it redoes a stage whose outputs changed), then this one")
        return digest_of({k: v for k, v in record.outputs.items() if k.startswith("adapter/")}), "export"

    def write_record(self, record: StageRecord) -> None:
        """Write `record` where it belongs: `stage.json` when complete, else the stage's attempt file."""
        if not self.writable:
            raise RunDirError(f"run dir {self.path} was opened read-only")
        folder = self.stage_dir(record.stage)
        if record.status == "complete":
            atomic_write_json(folder / RECORD, asdict(record))
            try:
                (folder / ATTEMPT).unlink()
            except FileNotFoundError:
                pass
        else:
            atomic_write_json(folder / ATTEMPT, asdict(record))
        self.write_manifest()

    def begin(self, stage: str, inputs: dict[str, Any]) -> StageRecord:
        record = StageRecord(stage=stage, status="running", inputs=inputs, inputs_digest=digest_of(inputs),
                             started_at=utc_now(), recipe=self.recipe_values)
        record.details["pid"] = os.getpid()
        record.details["_t0"] = time.time()
        self.run_id  # noqa: B018 - made now, so the server of this run can report it
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
        record.volatile = [rel for rel in record.outputs if rel in VOLATILE_OUTPUTS.get(record.stage, ())]
        record.finished_at = utc_now()
        record.duration_s = round(time.time() - t0, 3) if t0 else None
        record.details.update(details or {})
        self.write_record(record)
        if self.recipe_yaml is not None:
            self.save_recipe(self.recipe_yaml)  # only a completed stage: recipe.yaml describes finished stages
        return record

    def fail(self, record: StageRecord, error: str) -> None:
        """Record a failed attempt in the attempt file; a complete `stage.json` is left as it was."""
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
            record, attempt = self.record(stage), self.attempt(stage)
            if record is None and attempt is None:
                continue
            shown = record or attempt
            assert shown is not None
            stages[stage] = {
                "status": shown.status, "outcome": shown.outcome, "inputs_digest": shown.inputs_digest,
                "outputs_digest": shown.outputs_digest, "outputs": shown.outputs,
                "started_at": shown.started_at, "finished_at": shown.finished_at,
                "duration_s": shown.duration_s, "details": shown.details, "error": shown.error,
                "volatile": shown.volatile,
            }
            if record is not None and attempt is not None:
                stages[stage]["attempt"] = {"status": attempt.status, "started_at": attempt.started_at,
                                            "finished_at": attempt.finished_at, "error": attempt.error}
        recipe = self.path / "recipe.yaml"
        images = self.path / IMAGES
        return {"images": json.loads(images.read_text()).get("images") if images.is_file() else None,
                "run_id": self.run_id, "schema_version": SCHEMA_VERSION, "updated_at": utc_now(),
                "recipe": recipe.name if recipe.is_file() else None, "versions": software_versions(),
                "stages": stages}

    def write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest())
