"""`birbal compare`: two runs set side by side, on the smoke chain's own outputs (the session's smoke run)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from birbal.errors import EvaluateError
from birbal.evaluate.compare import (
    ProbeConfig,
    RunView,
    _per_instance_row,
    bootstrap_delta,
    compare_runs,
    model_source,
)
from birbal.fsutil import hash_tree
from birbal.rundir import RunDir

SMALL = ("--rows", "4", "--helm-prompts", "2", "--max-tokens", "128")  # a small probe set keeps the tests cheap


def _tree(path: Path) -> dict[str, str]:
    return hash_tree(path)


def _copy(smoke_run: Path, dest: Path) -> Path:
    shutil.copytree(smoke_run, dest, ignore=shutil.ignore_patterns("checkpoints", "inductor", "compare"))
    return dest


def _second_adapter_run(smoke_run: Path, dest: Path) -> Path:
    """A run whose model is the smoke run's base with another real adapter: the trained one with its LoRA B
    matrices halved, recorded by the train stage's record (re-made through RunDir); no export, serve, evaluate."""
    from safetensors.torch import load_file, save_file

    root = _copy(smoke_run, dest)
    for folder in ("export", "serve", "evaluate"):
        shutil.rmtree(root / folder)
    weights = root / "train" / "adapter" / "adapter_model.safetensors"
    tensors = {k: (v * 0.5 if "lora_B" in k else v).contiguous() for k, v in load_file(weights).items()}
    assert any("lora_B" in k for k in tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    run = RunDir(root)
    old = run.record("train")
    record = run.begin("train", old.inputs)
    run.finish(record, hash_tree(root / "train", exclude=("stage.json",)), old.details, old.outcome or "finished")
    return root


def test_a_run_compared_with_itself_is_identical(smoke_run, tmp_path):
    repro = _copy(smoke_run, tmp_path / "repro")
    before = _tree(smoke_run)
    result = run_cli("compare", "--run-dir", str(repro), "--against", str(smoke_run), *SMALL, "--resamples", "1000")
    assert _tree(smoke_run) == before  # the other run directory is only read
    compare = json.loads((repro / "compare" / "compare.json").read_text())
    check = compare["model_check"]
    assert check["mean_kl"] == 0.0 and check["worst"]["kl"] == 0.0
    assert check["agreement"] == 1.0 and check["first_token_agreement"] == 1.0
    assert check["eval_loss"]["this"] == check["eval_loss"]["reference"] > 0
    assert check["probes"]["eval"] > 0 and check["probes"]["helm"] > 0
    assert check["verdict"]["level"] == "identical"
    assert check["this"]["merged"] == str(repro / "export" / "merged")  # its own copy, bytes checked
    rows = compare["scores"]["rows"]
    assert rows and all(r["delta"] == 0.0 and r["interval"]["paired"] and r["interval"]["within_noise"] for r in rows)
    record = json.loads((repro / "compare" / "stage.json").read_text())
    manifest = (smoke_run / "manifest.json").read_bytes()
    assert record["inputs"]["against"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert record["inputs"]["this"]["path"] == str(repro.resolve())
    assert set(record["outputs"]) >= {"compare.json", "compare.md"}
    report = (repro / "report.md").read_text()
    assert "## Comparison: repro against smoke" in report and "identical" in report
    assert str(repro / "report.md") in result.stdout


def test_two_different_adapters_give_a_positive_kl_and_both_show(smoke_run, tmp_path):
    other = _second_adapter_run(smoke_run, tmp_path / "halved")
    path = compare_runs(other, smoke_run, device="cpu", resamples=200, probes=ProbeConfig(4, 2, 128))
    compare = json.loads((other / "compare" / "compare.json").read_text())
    check = compare["model_check"]
    assert check["mean_kl"] > 1e-4 and check["worst"]["kl"] > check["mean_kl"]
    assert check["eval_loss"]["this"] != check["eval_loss"]["reference"]
    assert check["verdict"]["level"] != "identical"
    assert check["this"]["kind"] == "adapter" and check["this"]["origin"] == "train/stage.json"
    assert check["reference"]["kind"] == "merged" and check["reference"]["origin"] == "serve/stage.json"
    text = path.read_text()
    assert "+ adapter" in text and str(smoke_run / "export" / "merged") in text  # both models named
    assert "worst per-token KL" in text and "greedy (arg-max) agreement" in text
    # the other run evaluated, this one not: its scores shown, no interval claimed
    rows = compare["scores"]["rows"]
    assert rows and all(r["this"] is None and r["other"] is not None and r["interval"] is None for r in rows)


def test_a_changed_model_file_is_refused(smoke_run, tmp_path):
    repro = _copy(smoke_run, tmp_path / "tampered")
    config = repro / "export" / "merged" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    with pytest.raises(EvaluateError, match="differs from its export record"):
        model_source(RunView(repro, "--run-dir"), tmp_path / "cache")


@pytest.mark.parametrize("case", ["no-model", "no-against", "against-missing"])
def test_bad_input_is_one_line(smoke_run, tmp_path, case):
    empty = RunDir(tmp_path / "empty")
    shutil.copyfile(smoke_run / "recipe.yaml", empty.path / "recipe.yaml")
    empty.write_manifest()
    args, code, words = {
        "no-model": (["--run-dir", str(smoke_run), "--against", str(empty.path)], 9, "names no model"),
        "no-against": (["--run-dir", str(smoke_run)], 2, "required: --against"),
        "against-missing": (["--run-dir", str(empty.path), "--against", str(tmp_path / "nowhere")], 9,
                            "is not a directory"),
    }[case]
    before = _tree(smoke_run)
    result = run_cli("compare", *args, check=False)
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("birbal")]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(smoke_run) == before


def test_bootstrap_interval_is_fixed_and_paired():
    rng = np.random.default_rng(0)
    other = {(i,): float(v) for i, v in enumerate(rng.integers(0, 2, 400))}
    same = bootstrap_delta(other, dict(other))
    assert same["delta"] == same["low"] == same["high"] == 0.0 and same["paired"]
    better = {k: 1.0 if i % 5 == 0 else v for i, (k, v) in enumerate(other.items())}  # ~10% of wrongs fixed
    a, b = bootstrap_delta(better, other), bootstrap_delta(better, other)
    assert a == b  # fixed seed
    assert 0 < a["low"] < a["delta"] < a["high"] and not a["within_noise"]
    unpaired = bootstrap_delta({(i + 1000,): v for (i,), v in better.items()}, other)
    assert not unpaired["paired"] and unpaired["high"] - unpaired["low"] > a["high"] - a["low"]


def test_helm_per_instance_worst_case_as_helm_takes_it():
    """Per-instance stats in HELM's per_instance_stats.json schema: the robustness row takes each instance's
    worst over its original and its robustness perturbations; fairness perturbations do not count for it."""
    from birbal.evaluate.helm_output import TABLE_ROWS

    def stat(value, perturbation=None):
        name = {"name": "exact_match", "split": "test"}
        if perturbation:
            name["perturbation"] = perturbation
        return {"name": name, "count": 1, "sum": value, "sum_squared": value, "min": value, "max": value,
                "mean": value, "variance": 0.0, "stddev": 0.0}

    typo = {"name": "misspelling_sweep", "robustness": True, "fairness": False, "computed_on": "perturbed",
            "prob": 0.05}
    dialect = {"name": "dialect", "robustness": False, "fairness": True, "computed_on": "perturbed", "prob": 1.0,
               "source_class": "SAE", "target_class": "AAVE"}
    entries = [
        {"instance_id": "id1", "train_trial_index": 0, "stats": [stat(1.0)]},
        {"instance_id": "id1", "train_trial_index": 0, "perturbation": typo, "stats": [stat(0.0, typo)]},
        {"instance_id": "id1", "train_trial_index": 0, "perturbation": dialect, "stats": [stat(1.0, dialect)]},
        {"instance_id": "id2", "train_trial_index": 0, "stats": [stat(1.0)]},
        {"instance_id": "id2", "train_trial_index": 0, "perturbation": typo, "stats": [stat(1.0, typo)]},
        {"instance_id": "id2", "train_trial_index": 0, "perturbation": dialect, "stats": [stat(0.0, dialect)]},
    ]
    rows = {r.label: r for r in TABLE_ROWS}
    plain = _per_instance_row(rows["MMLU - EM"], "exact_match", entries, "mmlu")
    robust = _per_instance_row(rows["MMLU - EM (Robustness)"], "exact_match", entries, "mmlu")
    fair = _per_instance_row(rows["MMLU - EM (Fairness)"], "exact_match", entries, "mmlu")
    assert plain == {("mmlu", 0, "id1"): 1.0, ("mmlu", 0, "id2"): 1.0}
    assert robust == {("mmlu", 0, "id1"): 0.0, ("mmlu", 0, "id2"): 1.0}
    assert fair == {("mmlu", 0, "id1"): 1.0, ("mmlu", 0, "id2"): 0.0}


def _helm_run(root: Path, values: list[float]) -> Path:
    """A run whose evaluate stage holds one HELM run folder in HELM's layout (run_spec.json, stats.json,
    per_instance_stats.json), summarised by the kit's own summariser."""
    from birbal.evaluate.helm_output import summarise_runs
    from birbal.fsutil import atomic_write_json

    run = RunDir(root)
    record = run.begin("evaluate", {"suite": "open"})
    name = "mmlu:subject=anatomy,method=multiple_choice_joint,model=neurips_local"
    folder = run.stage_dir("evaluate") / "helm" / "runs" / "birbal-open" / name
    metric = {"name": "exact_match", "split": "test"}
    atomic_write_json(folder / "run_spec.json", {"name": name})
    atomic_write_json(folder / "stats.json", [{"name": metric, "count": len(values), "sum": sum(values),
                                               "sum_squared": sum(v * v for v in values), "min": min(values),
                                               "max": max(values), "mean": sum(values) / len(values)}])
    atomic_write_json(folder / "per_instance_stats.json", [
        {"instance_id": f"id{i}", "train_trial_index": 0,
         "stats": [{"name": metric, "count": 1, "sum": v, "sum_squared": v * v, "min": v, "max": v, "mean": v}]}
        for i, v in enumerate(values)])
    summary = summarise_runs(folder.parent)
    atomic_write_json(run.stage_dir("evaluate") / "summary.json", {**summary, "suite": "open"})
    run.finish(record, hash_tree(run.stage_dir("evaluate"), exclude=("stage.json",)))
    return root


def test_helm_scores_side_by_side_with_a_paired_interval(tmp_path):
    theirs = _helm_run(tmp_path / "submission", [1.0] * 60 + [0.0] * 40)
    ours = _helm_run(tmp_path / "repro", [1.0] * 58 + [0.0] * 2 + [1.0] * 3 + [0.0] * 37)
    text = compare_runs(ours, theirs, models=False, resamples=2000).read_text()
    rows = {r["label"]: r for r in json.loads((ours / "compare" / "compare.json").read_text())["scores"]["rows"]}
    mmlu = rows["MMLU - EM"]
    assert mmlu["published"] == pytest.approx(0.629, abs=5e-4)
    assert (mmlu["other"], mmlu["this"]) == (pytest.approx(0.60), pytest.approx(0.61))
    ci = mmlu["interval"]
    assert ci["paired"] and ci["instances_this"] == 100 and ci["delta"] == pytest.approx(0.01)
    assert ci["low"] < 0 < ci["high"] and ci["within_noise"]  # 2 lost, 3 gained of 100: noise
    assert mmlu["published_within_this"] and mmlu["published_within_other"]
    assert rows["GSM8K - EM"]["interval"] is None and rows["GSM8K - EM"]["this"] is None
    assert "| MMLU - EM | 0.629 | 0.600 | 0.610 | 0.010 | [" in text
    assert "Not run: --no-models" in text


REVISION = "81601431fbf95ca6f0ef3be364433183fddcec94"  # a public revision of upaya07/Birbal-7B-V1 (issue 18)


def _submission_like_run(smoke_run: Path, root: Path) -> Path:
    """A run shaped like the birbal-submission profile's: no data, train or export stage; a serve record naming
    a base and a hub adapter at a revision (the fields serve/stage.py records for a published adapter)."""
    run = RunDir(root)
    shutil.copyfile(smoke_run / "recipe.yaml", run.path / "recipe.yaml")
    base = smoke_run / "cache" / "random-base"
    record = run.begin("serve", {"serve": "digest", "model": str(base), "adapter": f"upaya07/Birbal-7B-V1@{REVISION}",
                                 "adapter_files": {"adapter_config.json": "0" * 64}, "upstream": None})
    run.finish(record, outputs={}, outcome="stopped")
    return root


def test_a_submission_shaped_run_names_its_hub_adapter(smoke_run, tmp_path):
    submission = _submission_like_run(smoke_run, tmp_path / "submission")
    source = model_source(RunView(submission, "--against"), tmp_path / "cache")
    assert (source.kind, source.origin) == ("adapter", "serve/stage.json")
    assert (source.adapter, source.adapter_revision) == ("upaya07/Birbal-7B-V1", REVISION)
    assert source.base == str(smoke_run / "cache" / "random-base") and source.adapter_files
    repro = _copy(smoke_run, tmp_path / "repro")
    result = run_cli("compare", "--run-dir", str(repro), "--against", str(submission), *SMALL, "--resamples", "100",
                     check=False, env={"HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stderr.splitlines() if line.startswith("birbal")]
    assert result.returncode == 9 and len(lines) == 1, result.stderr
    assert f"upaya07/Birbal-7B-V1@{REVISION}" in lines[0] and "HF_TOKEN" in lines[0]
    assert not (repro / "compare").exists()  # nothing half-written


HELM_PYTHON = Path(os.environ.get("BIRBAL_TEST_HELM_PYTHON") or os.environ.get("BIRBAL_HELM_PYTHON")
                   or "/tmp/helm-venv/bin/python")


@pytest.mark.skipif(not HELM_PYTHON.is_file(), reason=f"no HELM environment at {HELM_PYTHON}")
def test_per_instance_worst_case_matches_helms_own():
    """The robustness and fairness rows' per-instance worst cases average to what crfm-helm's own
    compute_worst_case_metrics gives for the same per-instance stats (random, 60 instances, two perturbations)."""
    import subprocess

    from birbal.evaluate.helm_output import TABLE_ROWS

    rng = np.random.default_rng(7)
    typo = {"name": "misspelling_sweep", "robustness": True, "fairness": False, "computed_on": "perturbed"}
    dialect = {"name": "dialect", "robustness": False, "fairness": True, "computed_on": "perturbed"}
    entries = []
    for i in range(60):
        for p in (None, typo, dialect):
            name = {"name": "exact_match", "split": "test", **({"perturbation": p} if p else {})}
            value = float(rng.integers(0, 2))
            entries.append({"instance_id": f"id{i}", "train_trial_index": 0, **({"perturbation": p} if p else {}),
                            "stats": [{"name": name, "count": 1, "sum": value}]})
    helm = subprocess.run([str(HELM_PYTHON), str(Path(__file__).parent / "helm_worst_case_check.py")],
                          input=json.dumps(entries), capture_output=True, text=True, timeout=120)
    assert helm.returncode == 0, helm.stderr[-2000:]
    theirs = json.loads(helm.stdout)
    rows = {r.label: r for r in TABLE_ROWS}
    for kind, label in (("robustness", "MMLU - EM (Robustness)"), ("fairness", "MMLU - EM (Fairness)")):
        ours = _per_instance_row(rows[label], "exact_match", entries, "mmlu")
        assert len(ours) == 60
        assert sum(ours.values()) / len(ours) == pytest.approx(theirs[kind])
    assert theirs["robustness"] != theirs["fairness"]  # the two kinds really differ on this data
