"""Where the training data comes from and how it is filtered, formatted and split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from birbal.config.base import Section


class PublishedData(Section):
    """The winners' final mix as published: JSON arrays of {question, answer} rows (question already templated)."""

    name_or_path: str = Field(description="Hub dataset id, or a local folder holding the two files.")
    revision: str | None = Field(None, pattern=r"^[0-9a-f]{40}$", description="40-hex commit of the dataset repo.")
    revision_note: str | None = None
    train_file: str = "train_dataset.json"
    eval_file: str = "eval_dataset.json"
    expected_rows: dict[Literal["train", "eval"], int] | None = Field(
        None, description="Row counts the files must have; a mismatch stops the stage."
    )
    sha256: dict[Literal["train", "eval"], str] | None = Field(
        None, description="sha256 of each file as downloaded; a mismatch stops the stage."
    )


class RawSource(Section):
    """One source of raw {instruction, input, output} rows (JSON lines or a JSON array)."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="Local file; relative paths resolve against the package fixtures.")


class RebuildData(Section):
    """Rebuild the mix from its sources, then filter, template, shuffle and split with one seed."""

    sources: tuple[RawSource, ...] = Field(min_length=1)


class DataConfig(Section):
    mode: Literal["published", "rebuild"]
    published: PublishedData | None = None
    rebuild: RebuildData | None = None
    seed: int = Field(description="Seed of every shuffle; two runs with the same seed give identical files.")
    eval_fraction: float = Field(0.02, gt=0.0, lt=1.0, description="Share of rows held out (98/2 upstream).")
    max_words: int = Field(800, gt=0, description="Keep rows whose instruction+input has fewer words.")
    min_input_words: int = Field(4, ge=0, description="Drop rows whose input has this many words or fewer.")
    dedupe_inputs: bool = Field(True, description="Drop rows whose input was already seen (exact match).")

    @model_validator(mode="after")
    def _mode_section(self) -> DataConfig:
        if self.mode == "published" and self.published is None:
            raise ValueError("mode 'published' needs a 'published' section")
        if self.mode == "rebuild" and self.rebuild is None:
            raise ValueError("mode 'rebuild' needs a 'rebuild' section")
        return self
