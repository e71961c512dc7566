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


# Mistral-7B-v0.1's layer (its config.json: hidden 4096, MLP 14336, 32 query and 8 KV heads, rope_theta 1e4 as the
# tiny model's, initializer_range 0.02) with two of its 32 layers and its 32,000-token vocabulary: every kernel
# the served step launches at the real shape (the 32 layers run the same ones), 0.7B parameters instead of 7.2B
SEVEN_B_LAYERS = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "initializer_range": 0.02}


def merged_folder(shape: str = "tiny") -> Path:
    """A folder like `export/merged/`: config.json, model.safetensors and the tokenizer files. `shape` "7b-layers":
    the smoke model's architecture with Mistral-7B's layer shape (SEVEN_B_LAYERS). Built once per shape."""
    return _merged_folder(shape)


@functools.cache
def _merged_folder(shape: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="birbal-serve-tests-"))
    recipe = smoke()
    model = recipe.model
    if shape == "7b-layers":
        model = model.model_copy(update={"architecture": model.architecture.model_copy(update=SEVEN_B_LAYERS)})
    elif shape != "tiny":
        raise ValueError(f"unknown test model shape {shape!r}")
    folder = materialise_random_base(model, root / "merged")
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
