"""benchmarks/plot_results.py draws its five plots from the committed results (it reads the JSON files the
benchmarks wrote, so a renamed key or a missing file breaks it here, not when someone wants the picture)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_the_plots_are_drawn_from_the_committed_results(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_results.py"), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("decode.png", "training.png", "ni_predictions.png", "train_step.png", "train_attention.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name  # a drawn figure, not an empty canvas


def test_a_missing_result_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_results.py"), "--results", str(tmp_path),
                          "--out-dir", str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        f"plot_results: {tmp_path / 'decode_profile_h200_2026-12-01_final.json'} is missing (the plots read the "
        "committed results)"]
