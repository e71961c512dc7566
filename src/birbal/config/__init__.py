"""The typed recipe: one YAML profile, validated, with `--set key=value` overrides.

A profile may name another in `base:`; it then holds only the fields it changes (a delta), merged key by key.
Nothing in code changes a recipe value silently: what runs is `Recipe` as printed and saved in the run dir.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from birbal.config.base import Section
from birbal.config.data import DataConfig
from birbal.config.evaluate import EvaluateConfig, ExportConfig
from birbal.config.model import LoraConfig, ModelConfig, QuantizationConfig
from birbal.config.serve import ServeConfig
from birbal.config.train import TrainConfig
from birbal.errors import ConfigError

__all__ = ["Recipe", "load_recipe", "profile_path", "list_profiles", "CONFIG_DIR"]

# configs/ sits at the repository root in a checkout; an installed package carries a copy.
_REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
_PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "profiles"
CONFIG_DIR = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else _PACKAGED_CONFIGS


class Recipe(Section):
    name: str = Field(min_length=1)
    description: str = ""
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def section_digest(self, *sections: str) -> str:
        """sha256 of the named sections as canonical JSON: what a stage's inputs hash over."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=True)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or (os.sep != "/" and os.sep in text)


def profile_path(profile_or_path: str | Path) -> Path:
    """A profile name (`smoke`) or a path to a YAML file.

    A `Path`, or a string that looks like a file path (a `.yaml`/`.yml` suffix or a path separator), is a file; any
    other string is a profile name and always means the packaged profile, whatever the working directory holds.
    Containers run from WORKDIR /runs with the run directory mounted at /runs/<profile name>: an existing-path-first
    rule read that folder as the config (issue 13).
    """
    text = str(profile_or_path)
    if isinstance(profile_or_path, Path) or _looks_like_path(text):
        candidate = Path(profile_or_path)
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    named = CONFIG_DIR / f"{text}.yaml"
    if not named.is_file():
        raise ConfigError(f"unknown profile {text!r}; known profiles: {', '.join(list_profiles())}")
    return named


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    raw = _read_yaml(path)
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    base_path = (path.parent / base_name) if str(base_name).endswith((".yaml", ".yml")) else profile_path(base_name)
    return _deep_merge(_resolve_bases(base_path, (*seen, path.resolve())), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-5` -> (['train', 'learning_rate'], 1e-05). The value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), parsed


def _apply_override(tree: dict[str, Any], dotted: list[str], value: Any, text: str) -> None:
    node = tree
    for depth, part in enumerate(dotted[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(dotted[: depth + 1])} is not a section")
        node = child
    node[dotted[-1]] = value


def _format_validation_error(source: str, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(recipe)"
        given = item.get("input")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        problems.append(f"{where}: {message}{shown}")
    return f"{source}: invalid recipe: " + "; ".join(problems)


def load_recipe(profile_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a profile, apply `key=value` overrides, validate; every problem is reported at once."""
    path = profile_path(profile_or_path)
    tree = _resolve_bases(path)
    for text in overrides:
        dotted, value = parse_override(text)
        _apply_override(tree, dotted, value, text)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(str(path), err)) from None
