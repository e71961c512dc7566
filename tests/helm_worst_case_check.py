"""Run under the HELM venv (BIRBAL_HELM_PYTHON), not the project's: HELM's own `compute_worst_case_metrics` on
per-instance stats read from stdin (entries of HELM's per_instance_stats.json schema). Prints one JSON object:
{"robustness" | "fairness": mean of the worst-case stat} for each metric name; tests/test_compare.py checks the
kit's per-instance worst cases against it.
"""

import json
import sys

from helm.benchmark.augmentations.perturbation_description import PerturbationDescription
from helm.benchmark.metrics.metric import compute_worst_case_metrics
from helm.benchmark.metrics.metric_name import MetricName
from helm.benchmark.metrics.statistic import Stat
from helm.benchmark.scenarios.scenario import Input, Instance


def perturbation(raw):
    return None if raw is None else PerturbationDescription(**raw)


per_instance = {}
for entry in json.load(sys.stdin):
    p = perturbation(entry.get("perturbation"))
    instance = Instance(input=Input(text=entry["instance_id"]), references=[], split="test",
                        id=entry["instance_id"], perturbation=p)
    stats = []
    for raw in entry["stats"]:
        name = raw["name"]
        stat = Stat(MetricName(name["name"], split=name["split"], perturbation=perturbation(name.get("perturbation"))))
        stats.append(stat.add(raw["sum"] / raw["count"]))
    per_instance[instance] = stats
out = {}
for stat in compute_worst_case_metrics(per_instance):
    p = stat.name.perturbation
    if p is not None and p.computed_on == "worst" and p.name in ("robustness", "fairness"):
        out[p.name] = stat.mean
print(json.dumps(out))
