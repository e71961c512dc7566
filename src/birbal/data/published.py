"""The winners' published mix (upaya07/NeurIPS-LLM-data): fetched at a pinned revision, streamed, checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from birbal.config.data import PublishedData
from birbal.data.sources import PUBLISHED_FIELDS, checked, read_rows
from birbal.errors import DataError


def fetch_published(published: PublishedData, cache_dir: Path) -> dict[str, Path]:
    """Local paths of the train and eval files: a local folder as is, else downloaded from the hub."""
    files = {"train": published.train_file, "eval": published.eval_file}
    local = Path(published.name_or_path).expanduser()
    if local.is_dir():
        paths = {split: local / name for split, name in files.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(f"dataset {published.name_or_path}: missing {', '.join(missing)} (expected JSON arrays "
                            f"of {{question, answer}})")
        return paths
    if published.revision is None:
        raise DataError(f"dataset {published.name_or_path}: data.published.revision is not set; a hub download "
                        f"needs a 40-hex commit")
    from huggingface_hub import hf_hub_download

    from birbal.models import hub_token

    paths = {}
    for split, name in files.items():
        try:
            paths[split] = Path(hf_hub_download(published.name_or_path, name, repo_type="dataset",
                                                revision=published.revision, token=hub_token(),
                                                cache_dir=cache_dir / "hub"))
        except Exception as err:  # the hub client raises many types (offline, 401, 404): all mean "not fetched"
            first = str(err).splitlines()[0] if str(err) else ""
            raise DataError(
                f"could not fetch {name} of dataset {published.name_or_path} at revision {published.revision} "
                f"from the Hugging Face hub ({type(err).__name__}: {first}); check network access and HF_TOKEN, "
                f"or set data.published.name_or_path to a local folder holding {published.train_file} and "
                f"{published.eval_file}") from None
    return paths


def published_rows(path: Path, published: PublishedData, counter: dict[str, int]) -> Iterator[dict]:
    """{question, answer, source: "published"} rows, streamed from the JSON array; `counter["rows"]` counts them."""
    for row in checked(read_rows(path, published.name_or_path), PUBLISHED_FIELDS, published.name_or_path, path):
        counter["rows"] += 1
        yield {"question": row["question"], "answer": row["answer"], "source": "published"}
