"""The base of every recipe section: strict, so an unknown or misspelt key is an error, not a silent default."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
