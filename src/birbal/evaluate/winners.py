"""The published scores: the RTX 4090 track's final table and the challenge's mean-win-rate score.

`data/4090_full_ranks.json` is the winners' own copy of the organisers' ranking (8 of the track's submissions,
each with 43 figures). The seed README's results table is the first entry rounded to three places.

The challenge scored each scenario by the mean, over its metrics, of a submission's win rate against every
other submission (wins / (n - 1)), then took the geometric mean over scenarios: Score_open over the five open
scenarios below, Score_hidden over four hidden ones, Score_full = (open + 2 x hidden) / 3. That is the
organisers' `rank_results` (Lightning-AI/llm-efficiency-challenge-eval, agents/helm_postprocessing.py);
`mean_win_rates` below re-implements it and the test checks it against the published Score_open figures.
"""

from __future__ import annotations

import json
import math
import statistics
from functools import cache
from importlib import resources
from typing import Any

WINNER_ID = "akjindal53244_neurips_submission_submission_2"
RANKS_FILE = "4090_full_ranks.json"

# Scenario -> its metrics, as the organisers' open dataset-centric config lists them. None is lower-is-better.
OPEN_SCENARIOS: dict[str, tuple[str, ...]] = {
    "MMLU": ("MMLU - EM", "MMLU - EM (Robustness)", "MMLU - EM (Fairness)"),
    "TruthfulQA": ("TruthfulQA - EM", "TruthfulQA - EM (Robustness)", "TruthfulQA - EM (Fairness)"),
    "BIG-bench": ("BIG-bench - EM",),
    "GSM8K": ("GSM8K - EM",),
    "BBQ": ("BBQ - EM",),
}
HIDDEN_SCENARIOS = ("sam_sum", "corr2cause", "MATH", "ethics")
LOWER_IS_BETTER = ("Stereotypes", "Representation")


@cache
def published_ranks() -> list[tuple[str, dict[str, float]]]:
    """The 4090 track's published table: [(submission id, {figure: value})], best Score_full first."""
    text = resources.files("birbal.evaluate").joinpath("data", RANKS_FILE).read_text()
    return [(name, dict(figures)) for name, figures in json.loads(text)]


def winner_figures() -> dict[str, float]:
    return dict(published_ranks())[WINNER_ID]


def _win_rates(values: list[float], lower_is_better: bool) -> list[float]:
    """Win rate of each entry: the share of the others it beats, as the organisers sorted them (ties by order)."""
    order = sorted(range(len(values)), key=lambda j: values[j], reverse=lower_is_better)
    rates = [0.0] * len(values)
    for wins, j in enumerate(order):
        rates[j] = wins / (len(values) - 1) if len(values) > 1 else 1.0
    return rates


def mean_win_rates(pool: dict[str, dict[str, float]],
                   scenarios: dict[str, tuple[str, ...]] = OPEN_SCENARIOS) -> dict[str, dict[str, Any]]:
    """Per entry: each scenario's mean win rate over its metrics, and their geometric mean ("score").

    A metric an entry lacks counts as 0.0, as the organisers did; scenarios where no entry has any metric are
    left out so a partial evaluation is scored only on what it ran.
    """
    names = list(pool)
    per_entry: dict[str, dict[str, float]] = {name: {} for name in names}
    for scenario, metrics in scenarios.items():
        present = [m for m in metrics if any(m in pool[n] for n in names)]
        if not present:
            continue
        rows: dict[str, list[float]] = {name: [] for name in names}
        for metric in present:
            lower = any(word in metric for word in LOWER_IS_BETTER)
            values = [pool[n].get(metric, 1000.0 if lower else 0.0) for n in names]
            for name, rate in zip(names, _win_rates(values, lower), strict=True):
                rows[name].append(rate)
        for name in names:
            per_entry[name][scenario] = statistics.mean(rows[name])
    return {name: {"scenarios": per_entry[name], "score": geometric_score(per_entry[name])} for name in names}


def geometric_score(rates: dict[str, float]) -> float | None:
    """The geometric mean of scenario win rates, zeros floored at the smallest float as the organisers did."""
    if not rates:
        return None
    eps = math.nextafter(0.0, math.inf)
    return statistics.geometric_mean([r if r > 0 else eps for r in rates.values()])


def score_against_published(ours: dict[str, float], label: str = "this run") -> dict[str, Any] | None:
    """Our open-scenario mean win rates and score in a pool of us plus the 8 published 4090 submissions.

    Not the challenge's number: its pool held all the track's submissions (33, by the win-rate denominators)
    and Score_full also weighs the hidden scenarios twice. It says where our figures fall among the published
    ones, on the same arithmetic. Only the open scenarios we have a figure for are scored, for every entry of the
    pool (`scenarios_scored`): the published entries have them all, so a scenario we did not run would otherwise
    count as our loss to every one of them and floor our geometric mean at ~1e-195. None when we have no
    open-scenario figure at all.
    """
    scored = {name: metrics for name, metrics in OPEN_SCENARIOS.items() if any(m in ours for m in metrics)}
    if not scored:
        return None
    pool = {name: figures for name, figures in published_ranks()}
    pool[label] = ours
    rates = mean_win_rates(pool, scored)
    ranked = sorted(pool, key=lambda n: rates[n]["score"] or 0.0, reverse=True)
    return {"pool_size": len(pool), "ours": rates[label], "winner_in_pool": rates[WINNER_ID],
            "rank": ranked.index(label) + 1, "scenarios_scored": list(scored),
            "note": "pool = this run + the 8 submissions in 4090_full_ranks.json; open scenarios only"}
