"""The report, rebuilt from a run directory alone: a realistic smoke-shaped run, and an empty one."""

from __future__ import annotations

import json
from pathlib import Path

from birbal.evaluate.helm_output import figures, summarise_runs
from birbal.evaluate.report import build_report
from birbal.evaluate.winners import score_against_published
from birbal.fsutil import atomic_write_json, atomic_write_text, hash_tree
from birbal.rundir import RECORD, RunDir

FIXTURE = Path(__file__).parent / "fixtures" / "helm_output" / "runs" / "birbal-open"
PNG = b"\x89PNG\r\n\x1a\n"


def _smoke_like_run(root: Path) -> RunDir:
    run_dir = RunDir(root)
    data = run_dir.stage_dir("prepare-data")
    record = run_dir.begin("prepare-data", {"data": "x"})
    atomic_write_json(data / "manifest.json", {
        "mode": "rebuild", "seed": 1234, "rows": {"train": 90, "eval": 10},
        "tokens": {"train": {"rows": 90, "total_tokens": 12345, "mean_tokens": 137.2, "rows_over_window": 0},
                   "eval": {"rows": 10, "total_tokens": 1400, "mean_tokens": 140.0, "rows_over_window": 1}}})
    run_dir.finish(record, hash_tree(data, exclude=(RECORD,)))

    train = run_dir.stage_dir("train")
    record = run_dir.begin("train", {"train": "y"})
    lines = [{"event": "train", "step": s, "loss": 10.4 - 0.2 * s, "lr": 2e-3, "tokens_per_s": 900.0 + s}
             for s in range(1, 37)]
    lines += [{"event": "eval", "step": s, "eval_loss": 10.0 - 0.15 * s} for s in (12, 24, 36)]
    atomic_write_text(train / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines) + '{"event": "tr')
    run_dir.finish(record, hash_tree(train, exclude=(RECORD,)), outcome="finished", details={
        "budget_hours": 0.25, "budget_used_s": 540.0, "peak_gpu_memory_gib": 26.5, "max_gpu_memory_gib": 24,
        "global_step": 36, "tokens_seen": 294912, "outcome": "finished", "sessions": 2,
        "time_lost_to_crashes_s": 90.0})

    evaluate = run_dir.stage_dir("evaluate")
    record = run_dir.begin("evaluate", {"suite": "open"})
    summary = summarise_runs(FIXTURE)
    summary.update({"suite": "open", "url": "http://127.0.0.1:8089", "max_eval_instances": 5,
                    "client": "helm-run (.cache/helm-venv/bin/helm-run)",
                    "score": score_against_published(figures(summary))})
    atomic_write_json(evaluate / "summary.json", summary)
    run_dir.finish(record, hash_tree(evaluate, exclude=(RECORD,)))
    atomic_write_json(root / "build" / "manifest.json",
                      {"images": {"birbal-serve": {"digest": "sha256:" + "ab" * 32}}})
    return run_dir


def test_report_from_a_full_run_dir(tmp_path):
    run_dir = _smoke_like_run(tmp_path / "run-1")
    path = build_report(run_dir)
    text = path.read_text()
    assert path == run_dir.path / "report.md"
    assert "| MMLU - EM | 0.500 | 0.629 |" in text  # ours beside the winners'
    assert "0.127 (sam_sum - ROUGE-2)" in text
    assert "rank " in text and "of 9" in text  # the win-rate score against the published pool
    assert "| optimiser steps | 36 |" in text
    assert "tokens/s (mean of logged steps) | 918" in text  # (901 + ... + 936) / 36
    assert "Budget used: 60.0% of this run's 0.25 h; 0.6% of the challenge's 24 h" in text
    assert "| sessions / time lost to crashes | 2 / 1.5 min |" in text
    assert "Time lost to crashes: 1.5 min" in text
    assert "{" not in text.split("## Images")[0]  # no Python dicts, no JSON dumps
    assert "not run GiB" not in text
    for stage in ("prepare-data", "train", "export", "serve", "evaluate"):
        assert f"| {stage} |" in text.split("## Stages")[1].split("##")[0]
    assert "| export | not run |" in text
    assert "OVER the 4090 limit" in text  # 26.5 GiB > 24 GiB
    assert "| train | 90 | 12345 |" in text
    assert "Contamination check: not run" in text
    assert "sha256:" + "ab" * 32 in text
    assert "| torch |" in text
    for png in ("loss.png", "scores.png"):
        assert (run_dir.path / "report" / png).read_bytes().startswith(PNG)


def test_report_names_a_budget_overrun_and_the_plan_it_outran(tmp_path):
    run_dir = _smoke_like_run(tmp_path / "run-1")
    assert "over the budget" not in build_report(run_dir).read_text()
    train = run_dir.stage_dir("train")
    record = run_dir.begin("train", {"train": "y"})
    run_dir.finish(record, hash_tree(train, exclude=(RECORD,)), outcome="stopped_by_budget", details={
        "budget_hours": 20 / 3600, "budget_used_s": 25.026, "budget_overrun_s": 5.026, "global_step": 125,
        "last_step_plan": {"step": 125, "planned_s": 0.35, "left_s": 0.4, "took_s": 5.426}})
    text = build_report(run_dir).read_text()
    assert ("| **over the budget** | 5.026 s | a stall outran the plan's margin: step 125 was started with 0.4 s "
            "left and 0.35 s planned, and took 5.426 s |") in text


def test_report_of_an_empty_run_dir_says_not_run(tmp_path):
    text = build_report(tmp_path / "empty").read_text()
    assert "Evaluation: not run" in text
    assert "Training: not run" in text
    assert "Data preparation: not run" in text
    assert "Image build: not run" in text
    assert "| MMLU - EM | 0.629 | not run |" in text  # the winners' figures are still shown
    assert not (tmp_path / "empty" / "report" / "loss.png").exists()


def test_failed_evaluation_is_reported_not_hidden(tmp_path):
    run_dir = RunDir(tmp_path / "run-2")
    record = run_dir.begin("evaluate", {"suite": "open"})
    run_dir.fail(record, "HELM could not download its datasets")
    text = build_report(run_dir).read_text()
    assert "The evaluate stage failed: HELM could not download its datasets" in text
    assert "Evaluation: not run" in text


def test_a_quick_run_shows_the_winners_table_marked_not_comparable(tmp_path):
    run_dir = RunDir(tmp_path / "run-q")
    evaluate = run_dir.stage_dir("evaluate")
    record = run_dir.begin("evaluate", {"suite": "quick"})
    atomic_write_json(evaluate / "summary.json", {"suite": "quick", "client": "httpx", "rows": [
        {"label": "quick: short answers - EM", "value": 0.25, "metric": "exact_match"}]})
    run_dir.finish(record, hash_tree(evaluate, exclude=(RECORD,)), details={"url": "http://127.0.0.1:9"})
    record = run_dir.begin("train", {"t": 1})
    run_dir.finish(record, {}, details={"budget_hours": 0.25, "budget_used_s": 45.0, "device": "cpu",
                                        "peak_gpu_memory_gib": None, "max_gpu_memory_gib": None})
    run_dir.fail(run_dir.begin("evaluate", {"suite": "quick"}), "the model server at http://x is not reachable")
    text = build_report(run_dir).read_text()
    assert "The winners' published figures" in text and "**not comparable**" in text
    assert "| MMLU - EM | 0.629 | not comparable |" in text
    assert "The last evaluate attempt failed" in text and "| quick: short answers - EM | 0.250 |" in text
    assert "not measured (trained on cpu)" in text and "not run GiB" not in text
    assert "against http://127.0.0.1:9" in text
