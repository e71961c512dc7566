"""Shared by tests/test_serve_*.py: the smoke profile's tiny random Mistral, laid out as an export's merged folder.

Built once per test process (the weights are seeded, so every build is the same) under a temporary folder.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

from birbal.config import load_recipe
from birbal.config.serve import ServeConfig
from birbal.models import load_tokenizer, materialise_random_base


@functools.cache
def smoke():
    return load_recipe("smoke")


@functools.cache
def merged_folder() -> Path:
    """A folder like `export/merged/`: config.json, model.safetensors and the tokenizer files."""
    root = Path(tempfile.mkdtemp(prefix="birbal-serve-tests-"))
    recipe = smoke()
    folder = materialise_random_base(recipe.model, root / "merged")
    load_tokenizer(recipe.model.tokenizer, root).save_pretrained(folder)
    return folder


def serve_cfg(**changes) -> ServeConfig:
    return smoke().serve.model_copy(update=changes)


@functools.cache
def engine(postprocess: str = "none"):
    from birbal.serve.engine import Engine

    return Engine.from_merged(merged_folder(), serve_cfg(postprocess=postprocess))


def exported_run_dir(root: Path):
    """A run dir whose export stage is complete, holding the tiny model as export/merged/ (hashed, recorded)."""
    import shutil

    from birbal.fsutil import sha256_file
    from birbal.rundir import RunDir

    run_dir = RunDir(root)
    merged = run_dir.stage_dir("export") / "merged"
    shutil.copytree(merged_folder(), merged)
    record = run_dir.begin("export", {"test": "serve"})
    outputs = {f"merged/{p.name}": sha256_file(p) for p in sorted(merged.iterdir()) if p.is_file()}
    run_dir.finish(record, outputs=outputs)
    return run_dir


def identity(run_dir) -> dict:
    """What this run's server reports in GET /health (as the serve stage builds it)."""
    digest, stage = run_dir.model_digest("merged")
    return {"run_id": run_dir.run_id, "model_digest": digest, "model_stage": stage}


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on a free port in a thread, until the block ends; yields (url, port) once /health
    answers 200."""
    import threading

    import uvicorn
    from conftest import free_port

    from birbal.evaluate.client import wait_until_healthy

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 60, poll_s=0.2)
        yield url, port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
