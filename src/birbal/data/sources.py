"""Readers of row files, checked against the schema each source must have."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from birbal.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RAW_FIELDS = ("instruction", "input", "output")
PUBLISHED_FIELDS = ("question", "answer")


def resolve_path(path: str) -> Path:
    """Absolute or relative to the working directory; else relative to the package's bundled fixtures."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    packaged = FIXTURES.parent / path
    return packaged if packaged.exists() else candidate


def read_rows(path: Path, source: str) -> Iterator[dict]:
    """Rows of a JSON-lines file, or of a file holding one JSON array."""
    if not path.is_file():
        raise DataError(f"source {source!r}: file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        try:
            if first == "[":
                rows = json.load(handle)
                yield from rows
            else:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as err:
                            raise DataError(f"source {source!r}: {path}:{number}: not valid JSON: {err}") from None
        except json.JSONDecodeError as err:
            raise DataError(f"source {source!r}: {path}: not valid JSON: {err}") from None


def checked(rows: Iterator[dict], fields: tuple[str, ...], source: str, path: Path) -> Iterator[dict]:
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"source {source!r}: {path}: row {number} is a {type(row).__name__}, expected an object "
                            f"with {', '.join(fields)}")
        missing = [name for name in fields if not isinstance(row.get(name), str)]
        if missing:
            raise DataError(f"source {source!r}: {path}: row {number} lacks string field(s) {', '.join(missing)}; "
                            f"expected schema {{{', '.join(fields)}}}")
        yield row
