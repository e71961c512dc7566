"""Readers of row files and hub datasets, streamed (bounded memory) and checked against each source's schema."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from birbal.config.data import HubOrPath, UrlFile
from birbal.errors import DataError
from birbal.fsutil import sha256_file

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = PACKAGE_ROOT / "fixtures"
RAW_FIELDS = ("instruction", "input", "output")
PUBLISHED_FIELDS = ("question", "answer")


def resolve_path(path: str) -> Path:
    """Absolute or relative to the working directory; else relative to the package (fixtures/, reference/)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    packaged = PACKAGE_ROOT / path
    return packaged if packaged.exists() else candidate


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as handle:
        while True:
            char = handle.read(1)
            if not char or not char.isspace():
                return char


def read_rows(path: Path, source: str) -> Iterator[dict]:
    """Rows of a JSON-lines file, or of a file holding one JSON array (streamed with ijson, never loaded whole)."""
    if not path.is_file():
        raise DataError(f"source {source!r}: file not found: {path}")
    if _first_char(path) == "[":
        import ijson

        with open(path, "rb") as handle:
            try:
                # use_float: plain floats, not Decimal, so rows serialise like json.load's would
                yield from ijson.items(handle, "item", use_float=True)
            except ijson.JSONError as err:
                raise DataError(f"source {source!r}: {path}: not a valid JSON array: {err}") from None
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"source {source!r}: {path}:{number}: not valid JSON: {err}") from None


def read_json(path: Path, source: str) -> Any:
    """A whole small JSON document (a task file, a predictions file)."""
    if not path.is_file():
        raise DataError(f"source {source!r}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"source {source!r}: {path}: not valid JSON: {err}") from None


def checked(rows: Iterator[dict], fields: dict[str, type] | tuple[str, ...], source: str,
            where: str | Path) -> Iterator[dict]:
    """Pass rows through, stopping at the first one that lacks a field of the expected type."""
    expected = dict.fromkeys(fields, str) if isinstance(fields, tuple) else fields
    schema = ", ".join(f"{name}: {kind.__name__}" for name, kind in expected.items())
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"source {source!r}: {where}: row {number} is a {type(row).__name__}, expected an "
                            f"object {{{schema}}}")
        wrong = [name for name, kind in expected.items() if not isinstance(row.get(name), kind)]
        if wrong:
            raise DataError(f"source {source!r}: {where}: row {number} lacks or mistypes field(s) "
                            f"{', '.join(wrong)}; expected schema {{{schema}}}")
        yield row


def shown_path(path: Path) -> str:
    """A path as recorded in manifests: relative to the package when bundled, so records match across checkouts."""
    try:
        return f"package:{path.resolve().relative_to(PACKAGE_ROOT).as_posix()}"
    except ValueError:
        return str(path)


def describe(origin: HubOrPath) -> str:
    if origin.path:
        return shown_path(resolve_path(origin.path))
    name = f"{origin.hub_id}" + (f" ({origin.config_name})" if origin.config_name else "")
    return f"{name} split {origin.split} @ {origin.revision}"


def origin_rows(origin: HubOrPath, source: str, cache_dir: Path) -> Iterator[dict]:
    """Rows from a local file, or streamed from the hub at the pinned revision (token from HF_TOKEN)."""
    if origin.path:
        yield from read_rows(resolve_path(origin.path), source)
        return
    if origin.revision is None:
        raise DataError(f"source {source!r}: hub dataset {origin.hub_id} has no pinned revision "
                        f"({origin.revision_note or 'no note'}); set its revision to a 40-hex commit, or path to a "
                        f"local file of the same schema")
    import datasets

    from birbal.models import hub_token

    try:
        stream = datasets.load_dataset(origin.hub_id, origin.config_name, split=origin.split,
                                       revision=origin.revision, token=hub_token(), streaming=True,
                                       cache_dir=str(cache_dir / "hub"))
        yield from stream
    except DataError:
        raise
    except Exception as err:  # the hub client raises many types (offline, 401, 404): all mean "not fetched"
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"source {source!r}: could not load {describe(origin)} from the Hugging Face hub "
                        f"({type(err).__name__}: {first}); check network access and HF_TOKEN, or set its path "
                        f"to a local file of the same schema") from None


def json_items(path: Path, prefix: str, source: str) -> Iterator[Any]:
    """The items of the array at `prefix` (ijson's path syntax, e.g. `data.item`) of one JSON document, streamed:
    QuAC's train_v0.2.json is 68 MB of `{"data": [...]}`."""
    if not path.is_file():
        raise DataError(f"source {source!r}: file not found: {path}")
    import ijson

    with open(path, "rb") as handle:
        try:
            yield from ijson.items(handle, prefix, use_float=True)
        except ijson.JSONError as err:
            raise DataError(f"source {source!r}: {path}: not valid JSON: {err}") from None


def fetch_url(file: UrlFile, cache_dir: Path, source: str) -> Path:
    """A public file (HELM's own download URL), fetched once into `<cache>/urls/<sha256>/` and checked.

    Hand-written over httpx (a dependency already) rather than HELM's `ensure_file_downloaded`, which would pull
    all of crfm-helm and checks no digest. A file is renamed into the cache only after its sha256 matched.
    """
    name = file.url.rstrip("/").rsplit("/", 1)[-1] or "download"
    if file.sha256 is None:
        raise DataError(f"source {source!r}: {file.url} has no pinned sha256 ({file.sha256_note or 'no note'}); no "
                        f"public digest is known for it: fetch it once, set origin.file.sha256 to its `sha256sum`, "
                        f"or set origin.path to a local copy")
    target = cache_dir / "urls" / file.sha256 / name
    if target.is_file() and sha256_file(target) == file.sha256:
        return target
    import hashlib
    import tempfile

    import httpx

    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle, httpx.stream("GET", file.url, follow_redirects=True,
                                                         timeout=60.0) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != file.sha256:
            raise DataError(f"source {source!r}: {file.url}: sha256 {digest.hexdigest()} does not match the pinned "
                            f"{file.sha256}; the file changed upstream or the pin is wrong")
        os.replace(tmp, target)
    except httpx.HTTPError as err:
        raise DataError(f"source {source!r}: could not fetch {file.url} ({type(err).__name__}: {err}); check "
                        f"network access, or set origin.path to a local copy") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
