"""birbal-submission: the base plus the published adapter, loaded by the real huggingface_hub and peft code, here
pointed at local files (a tiny random Mistral, a tiny PEFT adapter laid out as a hub cache snapshot)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_cli
from serve_model import engine, merged_folder
from test_serve_upstream import (
    CASES,
    adapter_folder,
    assert_same_response,
    ours,
    peft_reference,
    upstream_process,
)

from birbal.config import load_recipe
from birbal.errors import ServeError
from birbal.rundir import RunDir

REPO_ID = "upaya07/Birbal-7B-V1"


def _local(extra: tuple[str, ...] = ()) -> list[str]:
    """birbal-submission with the 7B base swapped for the tiny local one (and its CPU settings); the published
    adapter's repository and revision stay the profile's."""
    smoke = load_recipe("smoke")
    return [f"model.name_or_path={merged_folder()}", "model.attn_implementation=sdpa",
            "model.tokenizer.source=mistral-common", f"model.tokenizer.sha256={smoke.model.tokenizer.sha256}",
            "serve.dtype=float32", "serve.device=cpu", "serve.decode=static", *extra]


def _hub_cache(root, revision: str):
    """huggingface_hub's cache layout: models--{owner}--{name}/snapshots/{commit}/ (and refs/main)."""
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter_folder() / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def test_the_profile_validates_and_pins_base_and_adapter():
    result = run_cli("validate", "--profile", "birbal-submission")
    assert "upaya07/Birbal-7B-V1" in result.stdout
    recipe, faithful = load_recipe("birbal-submission"), load_recipe("birbal-4090")
    published = recipe.serve.published_adapter
    assert (published.name_or_path, published.revision) == (REPO_ID, "81601431fbf95ca6f0ef3be364433183fddcec94")
    assert recipe.model == faithful.model and recipe.model.revision == "26bca36bde8333b5d7f72e9ed20ccda6a618af24"
    # served as main.py served it: bf16 base, adapter unmerged in the base's dtype, their request policy
    assert recipe.serve.model_dump(exclude={"published_adapter"}) == faithful.serve.model_dump(
        exclude={"published_adapter"})
    assert (recipe.serve.model, recipe.serve.dtype, recipe.serve.adapter_dtype, recipe.serve.request_policy,
            recipe.serve.quantize, recipe.serve.postprocess) == ("adapter", "bfloat16", "base", "upstream", "none",
                                                                 "birbal")
    with pytest.raises(Exception, match="40-hex commit"):
        load_recipe("birbal-submission", ["serve.published_adapter.revision=main"])


def test_the_published_adapter_loads_from_a_hub_cache_and_serves_as_their_server(tmp_path):
    from birbal.fsutil import digest_of
    from birbal.rundir import published_digest
    from birbal.serve.stage import engine_factory

    recipe = load_recipe("birbal-submission", _local())
    revision = recipe.serve.published_adapter.revision
    cache = _hub_cache(tmp_path / "hub", revision)
    load, sources = engine_factory(recipe, RunDir(tmp_path / "run"), tmp_path / "run" / "cache", hub_cache=cache)
    assert sources["adapter"] == f"{REPO_ID}@{revision}"
    # /health's model_digest names the pinned base and adapter commits, as evaluate expects (never another run's)
    assert sources["upstream"] == published_digest(recipe) == digest_of(
        {"base": f"{recipe.model.name_or_path}@{recipe.model.revision}", "adapter": f"{REPO_ID}@{revision}"})
    assert published_digest(load_recipe("birbal-submission", [*_local(), f"serve.published_adapter.revision={'a' * 40}"])) \
        != sources["upstream"]
    assert set(sources["adapter_files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    served = load()
    assert f"{REPO_ID}@{revision}" in served.source
    reference = peft_reference()
    for _, body in CASES[:3]:
        assert_same_response(ours(served, body), upstream_process(reference, engine().tokenizer, body))


def test_without_the_hub_it_fails_in_one_line_naming_repository_and_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from birbal.serve.stage import engine_factory

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda _: None)  # its 5 retries, without waits
    recipe = load_recipe("birbal-submission", _local())
    with pytest.raises(ServeError) as caught:
        engine_factory(recipe, RunDir(tmp_path / "run"), tmp_path / "cache", hub_cache=tmp_path / "empty-hub")
    message = str(caught.value)
    assert f"{REPO_ID}@81601431fbf95ca6f0ef3be364433183fddcec94" in message and "\n" not in message


def test_the_serve_stage_offline_exits_with_that_line(tmp_path):
    """The CLI as a judge runs it, with the hub switched off (HF_HUB_OFFLINE) and an empty cache."""
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}
    args = [f"--set={o}" for o in _local()]
    result = run_cli("serve", "--profile", "birbal-submission", "--run-dir", str(tmp_path / "run"), *args,
                     "--port", "0", check=False, env=env, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("birbal: error:")]
    assert len(errors) == 1 and f"{REPO_ID}@81601431fbf95ca6f0ef3be364433183fddcec94" in errors[0], result.stderr
    assert "hf_x" not in result.stderr


def test_reproduce_skips_data_training_and_export(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "invoke", "reproduce", "--profile", "birbal-submission",
                             "--runtime", "local", "--run-dir", str(tmp_path / "r"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line[2:] for line in result.stderr.splitlines() if line.startswith("$ ")]
    assert [line.split(" -m birbal ")[1].split()[0] for line in lines] == ["serve", "evaluate", "report"], lines
    assert "upaya07/Birbal-7B-V1@81601431fbf95ca6f0ef3be364433183fddcec94" in result.stderr
