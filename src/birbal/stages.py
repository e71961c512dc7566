"""Each stage as a function of (resolved recipe, the previous stage's outputs), with skip / record / fail logic.

The CLI calls these; the containers run the same CLI. A stage is skipped when its record is complete, its inputs
digest is unchanged and its outputs still hash to the record; otherwise it runs (and resumes what it can, e.g.
training from its last complete checkpoint), saying which recipe keys or files changed. Its inputs name the
upstream stage's outputs digest only after those outputs have been re-hashed (`RunDir.verified_outputs_digest`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from birbal.config import Recipe
from birbal.errors import BirbalError
from birbal.fsutil import digest_of
from birbal.rundir import RunDir, StageRecord, changed_keys

CACHE = "cache"

StageBody = Callable[[Path], tuple[dict[str, str], dict[str, Any], str]]


def log(message: str) -> None:
    print(f"[birbal] {message}", file=sys.stderr, flush=True)


def cache_dir(run_dir: RunDir) -> Path:
    return run_dir.path / CACHE


# The recipe keys each stage's result depends on, its upstream stages' included (dotted prefixes): the keys named
# when a finished stage runs again because its recipe changed.
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "prepare-data": ("data", "model.tokenizer", "train.sequence_len"),
}
DEPENDS_ON["train"] = (*DEPENDS_ON["prepare-data"], "model", "quantization", "lora", "train")
DEPENDS_ON["export"] = (*DEPENDS_ON["train"], "export")
DEPENDS_ON["serve"] = (*DEPENDS_ON["export"], "serve")
DEPENDS_ON["evaluate"] = (*DEPENDS_ON["serve"], "evaluate")


def stage_inputs(recipe: Recipe, run_dir: RunDir, stage: str) -> dict[str, Any]:
    """What a stage's result depends on: recipe sections, and the verified outputs digest of the stage before it
    (RunDirError naming the file when an upstream output no longer hashes to its record)."""
    if stage == "prepare-data":
        return {"recipe": digest_of({"data": recipe.data.model_dump(mode="json"),
                                     "tokenizer": recipe.model.tokenizer.model_dump(mode="json"),
                                     "window": recipe.train.sequence_len})}
    if stage == "train":
        return {"recipe": recipe.section_digest("model", "quantization", "lora", "train"),
                "prepare-data": run_dir.verified_outputs_digest("prepare-data")}
    if stage == "export":
        return {"recipe": recipe.section_digest("model", "lora", "export"),
                "train": run_dir.verified_outputs_digest("train")}
    if stage == "evaluate":
        return {"recipe": recipe.section_digest("evaluate", "serve"),
                "export": run_dir.verified_outputs_digest("export")}
    raise ValueError(stage)


def why_rerun(run_dir: RunDir, stage: str, inputs: dict[str, Any]) -> str | None:
    """None when the stage is complete for `inputs` with every output hashing to its record; else why it runs."""
    record = run_dir.record(stage)
    if record is None or record.status != "complete":
        return None if record is None and run_dir.attempt(stage) is None else "not complete"
    if record.inputs_digest != digest_of(inputs):
        keys = changed_keys(record.recipe, run_dir.recipe_values, DEPENDS_ON.get(stage))
        upstream = [name for name, value in inputs.items() if name != "recipe" and record.inputs.get(name) != value]
        parts = []
        if keys:
            parts.append("recipe changed since it completed (" + "; ".join(keys[:6])
                         + (f"; {len(keys) - 6} more" if len(keys) > 6 else "") + ")")
        if upstream:
            parts.append(f"the outputs of {', '.join(upstream)} changed since it completed")
        return ", ".join(parts) or "its inputs changed since it completed"
    problems = run_dir.output_problems(stage)
    if problems:
        return f"its outputs no longer match its record ({problems[0]}" + (
            f", and {len(problems) - 1} more)" if len(problems) > 1 else ")")
    return ""


def run_stage(run_dir: RunDir, stage: str, inputs: dict[str, Any], body: StageBody,
              force: bool = False) -> StageRecord | None:
    """Run `body(stage_dir)` unless the stage is already complete for these inputs (and its outputs still hash to
    its record). Returns the record, or None when skipped. A failure is recorded in the stage's attempt file and
    re-raised; a complete record is never overwritten by it."""
    reason = why_rerun(run_dir, stage, inputs)
    if not force and reason == "":
        log(f"{stage}: complete with unchanged inputs, skipped ({run_dir.stage_dir(stage)})")
        return None
    folder = run_dir.stage_dir(stage)
    folder.mkdir(parents=True, exist_ok=True)
    record = run_dir.begin(stage, inputs)
    why = " (--force)" if force else (f" ({reason})" if reason else "")
    log(f"{stage}: running -> {folder}{why}")
    try:
        outputs, details, outcome = body(folder)
    except BaseException as err:
        reason = str(err) if isinstance(err, BirbalError) else f"{type(err).__name__}: {err}"
        run_dir.fail(record, reason)
        raise
    record = run_dir.finish(record, outputs, details, outcome)
    log(f"{stage}: {outcome} in {record.duration_s:.1f} s")
    return record


def prepare_data_stage(recipe: Recipe, run_dir: RunDir, force: bool = False) -> StageRecord | None:
    from birbal.data.prepare import prepare_data
    from birbal.fsutil import hash_tree
    from birbal.models import load_tokenizer

    def body(folder: Path):
        if recipe.data.mode == "published":
            from birbal.data.published import fetch_published

            # The data first: without hub access the stage then fails naming the dataset it tried to fetch.
            fetch_published(recipe.data.published, cache_dir(run_dir))
        tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir(run_dir))
        manifest = prepare_data(recipe, folder, cache_dir(run_dir), tokenizer)  # it prints the rows and tokens
        outputs = hash_tree(folder, exclude=("stage.json",))
        return outputs, {"rows": manifest["rows"], "tokens_per_epoch": manifest["projected_tokens_per_epoch"]}, "finished"

    return run_stage(run_dir, "prepare-data", stage_inputs(recipe, run_dir, "prepare-data"), body, force)


def train_stage(recipe: Recipe, run_dir: RunDir, force: bool = False) -> StageRecord | None:
    from birbal.errors import TrainError
    from birbal.rundir import flatten
    from birbal.train import checkpoint as ckpt
    from birbal.train.recipe import CHECKPOINTS, LEDGER, METRICS, RESUMABLE_DIFFERENCES, QLoRARecipe

    inputs = stage_inputs(recipe, run_dir, "train")
    values = run_dir.recipe_values or flatten(recipe.model_dump(mode="json"))

    def body(folder: Path):
        # Checkpoints trained on other data (or by other numbers) are never resumed: refused, naming what changed,
        # or with --force moved aside so training starts afresh.
        problem = ckpt.resume_problem(folder / CHECKPOINTS, inputs["prepare-data"], values, RESUMABLE_DIFFERENCES)
        if problem and not force:
            raise TrainError(f"{problem}: resuming it would mix the two. `train --force` moves the old checkpoints "
                             f"and logs to train/superseded-<time>/ and trains afresh; or use a new --run-dir")
        if problem:
            aside = ckpt.supersede(folder, (CHECKPOINTS, METRICS, LEDGER))
            log(f"train: {problem}; moved to {aside}, training afresh (--force)")
        trainer = QLoRARecipe(recipe, run_dir.stage_dir("prepare-data"), folder, cache_dir(run_dir),
                              inputs={"data_digest": inputs["prepare-data"], "recipe": values})
        try:
            trainer.setup()
            outcome = trainer.train()
            result = trainer.finalize(outcome)
        finally:
            trainer.cleanup()
        log(train_summary(result.outcome, result.details))
        return result.outputs, result.details, result.outcome

    return run_stage(run_dir, "train", inputs, body, force)


def train_summary(outcome: str, d: dict) -> str:
    """The train stage's last log line. A run the budget stops before its first eval has no eval loss to report,
    and a metrics log with no train step no train loss: each said so, not formatted as a number (which failed the
    stage after its training had finished)."""
    loss = ("no step trained" if d["first_train_loss"] is None
            else f"loss {d['first_train_loss']:.3f} -> {d['final_train_loss']:.3f}")
    best = (f"best eval_loss {d['best_eval_loss']:.4f} (step {d['best_step']})" if d["best_eval_loss"] is not None
            else f"no eval yet: the adapter of step {d['best_step']}, the last checkpoint")
    from birbal.train.budget import describe_plan

    over, plan = d.get("budget_overrun_s") or 0, d.get("last_step_plan")
    overrun = "" if over <= 0 else f", {over:.1f} s OVER it" + (f": {describe_plan(plan)}" if plan else "")
    return (f"train: {outcome} at step {d['global_step']}/{d['total_steps']}, {loss}, {best}, budget used "
            f"{d['budget_used_s'] / 3600:.3f} of {d['budget_hours']} h{overrun}")


def export_stage(recipe: Recipe, run_dir: RunDir, force: bool = False) -> StageRecord | None:
    from birbal.export.merge import merge_adapter
    from birbal.fsutil import hash_tree

    def body(folder: Path):
        details = merge_adapter(recipe, run_dir.stage_dir("train") / "adapter", folder, cache_dir(run_dir))
        log(f"export: merged {details['parameters']:,} parameters ({details['dtype']}); max logit difference "
            f"against base + adapter {details['merge_max_logit_diff']:.2e}")
        return hash_tree(folder, exclude=("stage.json",)), details, "finished"

    return run_stage(run_dir, "export", stage_inputs(recipe, run_dir, "export"), body, force)
