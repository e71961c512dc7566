"""Checkpoints written atomically: a `step-NNNNNNNN/` folder appears whole (one rename) or not at all."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

from birbal.fsutil import atomic_directory, atomic_write_json

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


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, trainer_state: dict) -> Path:
    final = folder / f"step-{step:08d}"
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp / ADAPTER, safe_serialization=True)
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
