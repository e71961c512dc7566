"""HELM's output files -> the rows of the winners' table.

HELM writes one folder per run: `<output>/runs/<suite>/<run name>/` with `run_spec.json` and `stats.json`, a list
of `Stat`s: `{"name": {"name": metric, "split": ..., "sub_split"?: ..., "perturbation"?: {"name", "robustness",
"fairness", "computed_on"}}, "count", "sum", "sum_squared", "min", "max", "mean", "variance", "stddev"}`.
A row of the table gathers one metric over all runs of a scenario the way HELM's summariser does
(`MetricNameMatcher`): same metric name and split, no sub split, and for "(Robustness)" / "(Fairness)" the
perturbation of that name computed on the worst case; the runs' stats are merged (sums and counts added), so the
row is the mean of the runs' means, as in HELM's group tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birbal.errors import EvaluateError
from birbal.evaluate.winners import winner_figures

SPLITS = ("test", "valid")  # HELM reports test where a scenario has one (TruthfulQA has only valid)


@dataclass(frozen=True)
class TableRow:
    label: str  # as in the winners' table
    scenario: str  # run name prefix before ':' (the run spec function)
    metrics: tuple[str, ...]  # HELM metric names, first found wins (HELM versions renamed some)
    perturbation: str | None = None  # robustness | fairness
    winners_key: str | None = None  # the published figure to set beside it
    winners_note: str = ""


def _bias(kind: str, category: str) -> str:
    if kind == "stereotypes":
        return f"bias_metric:mode=associations,demographic_category={category},target_category=adjective"
    return f"bias_metric:mode=representation,demographic_category={category}"


_SAMSUM = "the winners' figure is sam_sum (a hidden set), not CNN/DM: compare with care"

# The open run specs' rows: the organisers' open metric list (MMLU, TruthfulQA with robustness and fairness,
# BIG-bench, GSM8K, BBQ, CNN/DM ROUGE-2 and bias).
TABLE_ROWS: tuple[TableRow, ...] = (
    TableRow("MMLU - EM", "mmlu", ("exact_match",), None, "MMLU - EM"),
    TableRow("MMLU - EM (Robustness)", "mmlu", ("exact_match",), "robustness", "MMLU - EM (Robustness)"),
    TableRow("MMLU - EM (Fairness)", "mmlu", ("exact_match",), "fairness", "MMLU - EM (Fairness)"),
    TableRow("TruthfulQA - EM", "truthful_qa", ("exact_match",), None, "TruthfulQA - EM"),
    TableRow("TruthfulQA - EM (Robustness)", "truthful_qa", ("exact_match",), "robustness",
             "TruthfulQA - EM (Robustness)"),
    TableRow("TruthfulQA - EM (Fairness)", "truthful_qa", ("exact_match",), "fairness", "TruthfulQA - EM (Fairness)"),
    TableRow("BIG-bench - EM", "big_bench", ("exact_match",), None, "BIG-bench - EM"),
    # HELM classic's GSM8K column is exact_match_indicator; HELM lite's is final_number_exact_match.
    TableRow("GSM8K - EM", "gsm", ("exact_match_indicator", "final_number_exact_match", "exact_match"), None,
             "GSM8K - EM"),
    TableRow("BBQ - EM", "bbq", ("exact_match",), None, "BBQ - EM"),
    TableRow("CNN/DailyMail - ROUGE-2", "summarization_cnndm", ("rouge_2",), None, "sam_sum - ROUGE-2", _SAMSUM),
    TableRow("CNN/DailyMail - Stereotypes (race)", "summarization_cnndm", (_bias("stereotypes", "race"),), None,
             "sam_sum - Stereotypes (race)", _SAMSUM),
    TableRow("CNN/DailyMail - Stereotypes (gender)", "summarization_cnndm", (_bias("stereotypes", "gender"),), None,
             "sam_sum - Stereotypes (gender)", _SAMSUM),
    TableRow("CNN/DailyMail - Representation (race)", "summarization_cnndm", (_bias("representation", "race"),),
             None, "sam_sum - Representation (race)", _SAMSUM),
    TableRow("CNN/DailyMail - Representation (gender)", "summarization_cnndm",
             (_bias("representation", "gender"),), None, "sam_sum - Representation (gender)", _SAMSUM),
)


@dataclass
class RunStats:
    name: str
    scenario: str
    stats: list[dict[str, Any]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvaluateError(f"HELM output {path} cannot be read: {err}") from None


def read_runs(suite_dir: Path) -> list[RunStats]:
    """Every finished run of a suite (`<output>/runs/<suite>`): those with a stats.json."""
    if not suite_dir.is_dir():
        raise EvaluateError(f"no HELM runs at {suite_dir}: expected <output>/runs/<suite>/<run>/stats.json")
    runs = []
    for folder in sorted(p for p in suite_dir.iterdir() if p.is_dir()):
        stats_path = folder / "stats.json"
        if not stats_path.is_file():
            continue
        spec_path = folder / "run_spec.json"
        name = _read_json(spec_path).get("name", folder.name) if spec_path.is_file() else folder.name
        stats = _read_json(stats_path)
        if not isinstance(stats, list):
            raise EvaluateError(f"{stats_path}: expected a list of stats, got {type(stats).__name__}")
        runs.append(RunStats(name=name, scenario=name.split(":", 1)[0], stats=stats))
    return runs


def _matches(stat: dict[str, Any], metric: str, split: str, perturbation: str | None) -> bool:
    name = stat.get("name") or {}
    if name.get("name") != metric or name.get("split") != split or name.get("sub_split") is not None:
        return False
    found = name.get("perturbation")
    if perturbation is None:
        return found is None
    return bool(found) and found.get("name") == perturbation and found.get("computed_on") == "worst"


def _row_value(row: TableRow, runs: list[RunStats]) -> dict[str, Any] | None:
    for metric in row.metrics:
        total, count, used = 0.0, 0, 0
        for run in runs:
            for split in SPLITS:
                hits = [s for s in run.stats if _matches(s, metric, split, row.perturbation)]
                hits = [s for s in hits if s.get("count", 0) > 0]
                if hits:
                    total += sum(s["sum"] for s in hits)
                    count += sum(s["count"] for s in hits)
                    used += 1
                    break
        if count:
            return {"value": total / count, "metric": metric, "runs": used}
    return None


def summarise_runs(suite_dir: Path) -> dict[str, Any]:
    """The winners' table rows from a HELM suite folder; rows HELM did not give are listed as missing."""
    runs = read_runs(suite_dir)
    winners = winner_figures()
    rows, missing = [], []
    for row in TABLE_ROWS:
        scenario_runs = [r for r in runs if r.scenario == row.scenario]
        found = _row_value(row, scenario_runs) if scenario_runs else None
        entry = {"label": row.label, "value": None, "metric": None, "runs": len(scenario_runs),
                 "winners": winners.get(row.winners_key) if row.winners_key else None,
                 "winners_label": row.winners_key, "note": row.winners_note}
        if found is None:
            missing.append(row.label)
        else:
            entry.update(found)
        rows.append(entry)
    scenarios = sorted({r.scenario for r in runs})
    return {"source": "helm", "suite_dir": str(suite_dir), "runs": len(runs), "scenarios": scenarios,
            "rows": rows, "missing": missing}


def figures(summary: dict[str, Any]) -> dict[str, float]:
    """{row label: value} for the rows that have a value: what the win-rate scoring takes."""
    return {row["label"]: row["value"] for row in summary.get("rows", []) if row.get("value") is not None}
