"""The HELM summariser on recorded output files in HELM's layout, and the challenge's win-rate arithmetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from birbal.errors import EvaluateError
from birbal.evaluate.helm_output import figures, summarise_runs
from birbal.evaluate.winners import (
    OPEN_SCENARIOS,
    WINNER_ID,
    geometric_score,
    mean_win_rates,
    published_ranks,
    score_against_published,
    winner_figures,
)

FIXTURE = Path(__file__).parent / "fixtures" / "helm_output" / "runs" / "birbal-open"


def _rows(summary):
    return {row["label"]: row for row in summary["rows"]}


def test_summary_rows_match_hand_computed_means():
    summary = summarise_runs(FIXTURE)
    rows = _rows(summary)
    # two MMLU subject runs merged as HELM merges stats: the mean of the runs' means
    assert rows["MMLU - EM"]["value"] == pytest.approx(0.5)
    assert rows["MMLU - EM"]["runs"] == 2
    # worst-case robustness / fairness, not the per-perturbation (mild_mix) rows nor the sub split
    assert rows["MMLU - EM (Robustness)"]["value"] == pytest.approx(0.375)
    assert rows["MMLU - EM (Fairness)"]["value"] == pytest.approx(0.25)
    # TruthfulQA has only a valid split in HELM
    assert rows["TruthfulQA - EM"]["value"] == pytest.approx(0.6)
    assert rows["TruthfulQA - EM (Robustness)"]["value"] == pytest.approx(0.4)
    assert rows["TruthfulQA - EM (Fairness)"]["value"] == pytest.approx(0.3)
    # the unfinished winowhy run (no stats.json) is not counted
    assert rows["BIG-bench - EM"]["value"] == pytest.approx(0.5)
    assert rows["BIG-bench - EM"]["runs"] == 2
    assert rows["GSM8K - EM"]["value"] == pytest.approx(0.2)
    assert rows["GSM8K - EM"]["metric"] == "exact_match_indicator"
    assert rows["BBQ - EM"]["value"] == pytest.approx(0.7)
    assert rows["CNN/DailyMail - ROUGE-2"]["value"] == pytest.approx(0.1)
    assert rows["CNN/DailyMail - Stereotypes (race)"]["value"] == pytest.approx(0.6)
    assert "CNN/DailyMail - Representation (gender)" in summary["missing"]
    assert rows["CNN/DailyMail - Representation (gender)"]["value"] is None
    assert summary["runs"] == 8
    assert set(summary["scenarios"]) == {"mmlu", "truthful_qa", "gsm", "bbq", "big_bench", "summarization_cnndm"}


def test_winners_figures_are_set_beside_ours():
    rows = _rows(summarise_runs(FIXTURE))
    assert rows["MMLU - EM"]["winners"] == pytest.approx(0.629, abs=5e-4)  # the seed README's table
    assert rows["BBQ - EM"]["winners"] == pytest.approx(0.738, abs=5e-4)
    assert rows["CNN/DailyMail - ROUGE-2"]["winners_label"] == "sam_sum - ROUGE-2"
    assert "sam_sum" in rows["CNN/DailyMail - ROUGE-2"]["note"]


def test_missing_suite_and_corrupt_stats_are_clear_errors(tmp_path):
    with pytest.raises(EvaluateError, match="no HELM runs"):
        summarise_runs(tmp_path / "absent")
    broken = tmp_path / "suite"
    shutil.copytree(FIXTURE, broken)
    (broken / "gsm:model=neurips_local" / "stats.json").write_text("{not json")
    with pytest.raises(EvaluateError, match="stats.json cannot be read"):
        summarise_runs(broken)


def test_published_scenario_win_rates_reproduce_score_open_and_full():
    for name, published in published_ranks():
        open_rates = {s: published[f"{s} Mean Win Rate"] for s in OPEN_SCENARIOS}
        hidden_rates = {s: published[f"{s} Mean Win Rate"] for s in ("sam_sum", "corr2cause", "MATH", "ethics")}
        assert geometric_score(open_rates) == pytest.approx(published["Score_open"], rel=1e-9), name
        full = (geometric_score(open_rates) + 2 * geometric_score(hidden_rates)) / 3
        assert full == pytest.approx(published["Score_full"], rel=1e-9), name
    assert winner_figures()["Score_full"] == pytest.approx(0.579, abs=5e-4)
    assert published_ranks()[0][0] == WINNER_ID


def test_mean_win_rate_on_a_hand_example():
    pool = {"a": {"MMLU - EM": 0.9, "GSM8K - EM": 0.1}, "b": {"MMLU - EM": 0.5, "GSM8K - EM": 0.3},
            "c": {"MMLU - EM": 0.1}}  # c has no GSM8K figure: counted as 0.0, as the organisers did
    rates = mean_win_rates(pool)
    assert rates["a"]["scenarios"] == {"MMLU": 1.0, "GSM8K": 0.5}
    assert rates["b"]["scenarios"] == {"MMLU": 0.5, "GSM8K": 1.0}
    assert rates["c"]["scenarios"] == {"MMLU": 0.0, "GSM8K": 0.0}
    assert rates["a"]["score"] == pytest.approx(0.5 ** 0.5)
    assert rates["c"]["score"] < 1e-300  # floored, not zero


def test_score_against_published_places_our_figures_in_the_pool():
    ours = figures(summarise_runs(FIXTURE))
    score = score_against_published(ours)
    assert score is not None and score["pool_size"] == 9
    assert set(score["ours"]["scenarios"]) == set(OPEN_SCENARIOS)
    assert 1 <= score["rank"] <= 9
    # beating every published MMLU figure gives an MMLU win rate of 1
    better = dict(ours, **{m: 0.99 for m in OPEN_SCENARIOS["MMLU"]})
    assert score_against_published(better)["ours"]["scenarios"]["MMLU"] == 1.0
    assert score_against_published({"quick: short answers - EM": 1.0}) is None
    json.dumps(score)  # it goes into summary.json


def test_a_partial_evaluation_is_scored_on_the_scenarios_it_ran():
    """An open run of GSM8K alone (the container contract's offline run specs): scored on GSM8K in every entry of the
    pool, not as a loss to all eight published entries on the four scenarios it did not run."""
    best = max(figures["GSM8K - EM"] for _, figures in published_ranks())
    score = score_against_published({"GSM8K - EM": best + 0.01})
    assert score["scenarios_scored"] == ["GSM8K"]
    assert score["ours"]["scenarios"] == {"GSM8K": 1.0} and score["ours"]["score"] == 1.0
    assert set(score["winner_in_pool"]["scenarios"]) == {"GSM8K"}
    assert score["rank"] == 1
