"""Preflight on real-format nvidia-smi samples: good, old driver, no GPU, small GPU; disk and token."""

from __future__ import annotations

from pathlib import Path

import pytest

from birbal import preflight as p
from birbal.config import load_recipe

RTX_4090 = "NVIDIA GeForce RTX 4090, 570.133.07, 24564 MiB\n"
OLD_DRIVER = "NVIDIA GeForce RTX 4090, 550.54.14, 24564 MiB\n"
SMALL_GPU = "NVIDIA GeForce RTX 4070, 570.133.07, 12282 MiB\n"
TWO_COLUMNS = "570.124.06, 24564 MiB\n"  # the brief's query: driver_version,memory.total


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("birbal-4090")


def run(recipe, smi, tmp_path: Path, env=None, free=10**15):
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "hf").mkdir(exist_ok=True)
    return p.run_preflight(recipe, nvidia_smi_output=smi, run_dir=tmp_path / "runs" / "r1", hub_cache=tmp_path / "hf",
                           env=env if env is not None else {"HF_TOKEN": "hf_x"}, free_bytes=lambda _: free)


def test_a_4090_with_a_new_driver_passes(recipe, tmp_path):
    checks = run(recipe, RTX_4090, tmp_path)
    assert p.failures(checks) == []
    assert [c.name for c in checks] == ["gpu", "driver", "disk:run+cache", "hf-token", "host-ram"]


def test_old_driver_names_the_minimum(recipe, tmp_path):
    assert p.failures(run(recipe, OLD_DRIVER, tmp_path)) == [
        "FAIL driver: driver 550.54.14 is older than 570.124.06, the minimum for CUDA 12.8.1 (the images' CUDA): "
        "upgrade the NVIDIA driver"]
    # The same driver is fine for a CUDA 12.4 image (NVIDIA's table: 12.4 GA needs >= 550.54.14).
    assert p.check_driver(OLD_DRIVER, "12.4").ok
    assert not p.check_driver("x, 550.54.13, 24564 MiB", "12.4").ok


def test_no_gpu(recipe, tmp_path):
    lines = p.failures(run(recipe, None, tmp_path))
    assert lines[0].startswith("FAIL gpu: no NVIDIA GPU visible") and lines[1].startswith("FAIL driver: no NVIDIA driver")
    assert len(lines) == 2


def test_small_gpu(recipe, tmp_path):
    assert p.failures(run(recipe, SMALL_GPU, tmp_path)) == [
        "FAIL gpu: GPU 0 (NVIDIA GeForce RTX 4070) has 12.0 GiB; the recipe needs 24 GiB (train.max_gpu_memory_gib, "
        "or the served model's weights)"]


def test_memory_threshold_defaults_to_22_gib_without_a_cap(recipe):
    uncapped = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_gpu_memory_gib": None})})
    assert p.required_gpu_gib(uncapped) == 22
    assert p.check_gpu("A10G, 570.133.07, 23028 MiB", 22).ok
    assert not p.check_gpu("T4, 570.133.07, 15360 MiB", 22).ok


def test_two_column_query_and_unparseable_output():
    gpus = p.parse_nvidia_smi(TWO_COLUMNS + "570.124.06, 81559 MiB\n")
    assert [(g.index, g.name, g.driver_version, round(g.memory_total_gib, 2)) for g in gpus] == [
        (0, None, "570.124.06", 23.99), (1, None, "570.124.06", 79.65)]
    assert p.check_driver(TWO_COLUMNS).ok
    bad = p.check_gpu("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 22)
    assert not bad.ok and "expected [name,] driver_version, memory.total" in bad.message


def test_disk_estimate_for_the_4090_recipe(recipe):
    assert p.base_parameters(recipe) == 7_241_732_096
    assert p.lora_parameters(recipe) == 335_544_320  # PLATFORM_NOTES: 335.5M trainable
    estimate = p.disk_estimate(recipe)
    assert estimate.base_weights == 2 * 7_241_732_096
    assert estimate.checkpoints == 335_544_320 * 12 * 11  # save_total_limit 10, plus the final adapter
    assert 55 * p.GIB < estimate.run_dir < 60 * p.GIB


def test_full_disk_fails_with_the_estimate(recipe, tmp_path):
    lines = p.failures(run(recipe, RTX_4090, tmp_path, free=20 * p.GIB))
    assert len(lines) == 1 and lines[0].startswith("FAIL disk:run+cache: ")
    assert "20.0 GiB free; about 70.2 GiB are needed" in lines[0]


def test_gated_model_needs_a_token_unless_cached(recipe, tmp_path):
    lines = p.failures(run(recipe, RTX_4090, tmp_path, env={}))
    assert lines == ["FAIL hf-token: mistralai/Mistral-7B-v0.1 is gated: accept its licence on huggingface.co, "
                     "then export HF_TOKEN=<a read token>"]
    snapshot = tmp_path / "hf" / "hub" / "models--mistralai--Mistral-7B-v0.1" / "snapshots" / recipe.model.revision
    snapshot.mkdir(parents=True)
    checks = run(recipe, RTX_4090, tmp_path, env={}, free=60 * p.GIB)  # weights cached: only the run dir counts
    assert p.failures(checks) == []


def test_smoke_on_cpu_needs_no_gpu_or_token(tmp_path):
    checks = run(load_recipe("smoke"), None, tmp_path, env={}, free=3 * p.GIB)
    assert p.failures(checks) == []
    assert checks[0].message == "not needed (train.device is cpu)"


def test_the_submission_profile_needs_what_serving_needs_not_a_training_run(tmp_path):
    """birbal-submission trains nothing: a bf16 base plus the adapter on the GPU, the base and adapter on disk."""
    submission = load_recipe("birbal-submission")
    assert p.serve_only(submission) and not p.serve_only(load_recipe("birbal-4090"))
    # 2 bytes x (7.24B + 0.34B) = 14.1 GiB of weights, plus the caches' headroom: a 16 GiB card serves it, a 12 GiB not.
    assert p.required_gpu_gib(submission) == 16.1
    assert p.check_gpu("NVIDIA RTX A4000, 570.133.07, 16376 MiB", p.required_gpu_gib(submission)).ok
    assert p.failures(run(submission, SMALL_GPU, tmp_path))[0].startswith("FAIL gpu: GPU 0 (NVIDIA GeForce RTX 4070)")
    estimate = p.disk_estimate(submission)
    assert (estimate.checkpoints, estimate.export) == (0, 0)
    assert estimate.base_weights == 2 * 7_241_732_096 + 4 * 335_544_320
    # 20 GiB free holds it (the training recipe's 70 GiB estimate did not).
    assert p.failures(run(submission, RTX_4090, tmp_path, free=20 * p.GIB)) == []
