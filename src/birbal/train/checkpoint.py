"""Checkpoints written atomically: a `step-NNNNNNNN/` folder appears whole (one rename) or not at all."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import torch

from birbal.errors import TrainError
from birbal.fsutil import atomic_directory, atomic_write_json
from birbal.rundir import changed_keys

STEP_DIR = re.compile(r"^step-(\d{8})$")
ADAPTER = "adapter"
STATE = "trainer_state.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_independent_adapter_config(model, base_model: str | None) -> None:
    """Make the adapter's saved config the same in every reproduction: the base named by the recipe (not the
    absolute cache path it was loaded from, which peft writes into adapter_config.json and the README), and
    `target_modules` sorted (peft keeps a set, saved in an order that changes with Python's hash seed)."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        if base_model:
            config.base_model_name_or_path = base_model
        if isinstance(config.target_modules, (set, frozenset, list, tuple)):
            config.target_modules = sorted(config.target_modules)


def _readme_names_the_recipe_base(folder: Path, model, base_model: str | None) -> None:
    """peft's model card (README.md) names the base by the path it was loaded from (the base config's
    `_name_or_path`, not the adapter config): put the recipe's name there too. Hand-written: peft has no option."""
    readme = folder / "README.md"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loaded_from = getattr(getattr(base, "config", None), "_name_or_path", None)
    if base_model and loaded_from and loaded_from != base_model and readme.is_file():
        readme.write_text(readme.read_text().replace(str(loaded_from), base_model))


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    base_model: str | None = None) -> Path:
    final = folder / f"step-{step:08d}"
    run_independent_adapter_config(model, base_model)
    with atomic_directory(final) as tmp:
        # save_embedding_layers=False is what peft's "auto" concludes for this recipe (LoRA on the 7 block
        # projections only: no embedding targeted or resized), said outright: "auto" asks the hub whether
        # `base_model` has a config.json and then loads its unpinned config to compare vocabulary sizes, a
        # network call at every checkpoint that an offline run pays as a warning and a possible timeout
        model.save_pretrained(tmp / ADAPTER, safe_serialization=True, save_embedding_layers=False)
        _readme_names_the_recipe_base(tmp / ADAPTER, model, base_model)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        atomic_write_json(tmp / STATE, trainer_state)  # written last inside the folder, read first on resume
    return final


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Half-written ones are hidden `.step-*.partial` folders, never listed."""
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / STATE).is_file() and (child / ADAPTER).is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(folder: Path, keep: int, protect: set[int]) -> list[int]:
    """Delete the oldest checkpoints beyond `keep`, never one in `protect` (the best, the latest)."""
    checkpoints = list_checkpoints(folder)
    removable = [(step, path) for step, path in checkpoints if step not in protect]
    excess = len(checkpoints) - keep
    removed = []
    for step, path in removable[: max(excess, 0)]:
        shutil.rmtree(path)
        removed.append(step)
    for stale in folder.glob(".step-*"):  # temporaries of a save killed half way
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


class CorruptCheckpoint(TrainError):
    """A checkpoint folder that looks whole but does not read (a truncated or missing file)."""


ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINT_FILES = (STATE, f"{ADAPTER}/{ADAPTER_WEIGHTS}", "optimizer.pt", "scheduler.pt", "rng_state.pt")


def read_checkpoint(folder: Path, device: str = "cpu") -> tuple[dict, dict, dict, dict, dict]:
    """(trainer state, adapter tensors, optimizer, scheduler, rng) of `folder`, every file read before any is
    used, so a checkpoint is taken whole or not at all. CorruptCheckpoint names the file that does not read."""
    from safetensors.torch import load_file

    current = STATE
    try:
        saved = json.loads((folder / STATE).read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        current = f"{ADAPTER}/{ADAPTER_WEIGHTS}"
        adapter = load_file(folder / ADAPTER / ADAPTER_WEIGHTS, device=device)
        loaded = []
        for current in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
            loaded.append(load_torch(folder / current))
    # Each reader fails its own way on a cut file (JSONDecodeError, SafetensorError, RuntimeError from torch's
    # zip reader, EOFError / UnpicklingError, OSError for a missing one): any of them means this file is unusable.
    except Exception as err:  # noqa: BLE001
        raise CorruptCheckpoint(f"checkpoint {folder.name} is unreadable ({current}: {type(err).__name__}: "
                                f"{str(err).splitlines()[0][:160] if str(err) else 'empty'})") from None
    return saved, adapter, *loaded  # type: ignore[return-value]


def set_aside(folder: Path) -> Path:
    """Rename an unreadable checkpoint out of the list (kept, not deleted: it may be looked at)."""
    aside = folder.with_name(f"{folder.name}.corrupt")
    if aside.exists():
        aside = folder.with_name(f"{folder.name}.corrupt-{int(time.time())}")
    folder.rename(aside)
    return aside


def resume_problem(folder: Path, data_digest: str, recipe_values: dict, resumable: tuple[str, ...]) -> str | None:
    """Why the newest readable checkpoint under `folder` must not be resumed by a run with these inputs (trained
    on other data, or by other numeric recipe values: the keys that changed are named); None when it may."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            saved = json.loads((path / STATE).read_text())
        except (OSError, ValueError):
            continue  # unreadable: the trainer sets it aside and tries the one before
        inputs = saved.get("inputs") or {}
        before = inputs.get("recipe")
        if inputs.get("data_digest") != data_digest:
            if before is None:
                return f"checkpoint {path.name} does not record the data it was trained on (an older birbal-repro)"
            keys = changed_keys(before, recipe_values, ("data", "model.tokenizer", "train.sequence_len"))
            return (f"checkpoint {path.name} was trained on other data (prepare-data outputs "
                    f"{str(inputs.get('data_digest'))[:12]}…, now {data_digest[:12]}…"
                    + (f"; changed: {'; '.join(keys)}" if keys else "") + ")")
        if before is not None:
            skip = {f"train.{k}" for k in resumable}
            keys = [k for k in changed_keys(before, recipe_values, ("model", "quantization", "lora", "train"))
                    if k.split(":")[0] not in skip]
            if keys:
                return f"checkpoint {path.name} was made by other recipe values ({'; '.join(keys)})"
        return None
    return None


def supersede(out_dir: Path, names: tuple[str, ...]) -> Path:
    """Move `names` under `out_dir` (the checkpoints and logs of a training that no longer applies) into
    `out_dir/superseded-<UTC time>/`, so a fresh training starts clean and nothing is deleted."""
    target = out_dir / f"superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out_dir / name).exists():
            (out_dir / name).rename(target / name)
    return target
