"""Natural Instructions: few-shot predictions of the base model per task, then keep examples it got wrong.

Two steps, as upstream (`process_one_word_response_file.py`, `prepare_generation_tasks_dataset.py`):
1. predictions: for every selected task, the base model answers each instance greedily after the few-shot prompt
   the winners' README prints (`few_shot_prompt`), 32 new tokens, no stop. Each finished task is written atomically
   to `<cache>/ni-predictions/<key>/<task>.jsonl`, so a re-run after a crash does only the unfinished tasks, and
   N processes split the tasks (`inference.py`); `predictions.precomputed` skips inference altogether.
2. sampling, per task: exact-match tasks keep wrong answers up to a quota set by the task's accuracy; generation
   tasks keep a share of each ROUGE-L band (most of the worst, a little of the middling, none of the good).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from birbal.config.data import NaturalInstructionsSource, NIPredictions
from birbal.data.filters import words
from birbal.data.loaders import SourceReport, keep_length, source_rng
from birbal.data.sources import read_json, read_rows, resolve_path, shown_path
from birbal.errors import DataError
from birbal.fsutil import digest_of

Predictor = Callable[[list[str]], list[str]]

# Upstream quota by accuracy decile (`bucket = floor(int(accuracy*100/10))`); deciles 9 and 10 get the last value.
QUOTA_BY_DECILE = (350, 350, 300, 300, 250, 250, 200, 150, 100)
QUOTA_TOP = 50
ROUGE_BANDS = tuple(round(0.2 + 0.1 * i, 1) for i in range(7))  # band edges 0.2 .. 0.8


# --- tasks -------------------------------------------------------------------------------------------------------

def read_task_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"source natural_instructions: task list not found: {path}")
    names = [line.strip().removesuffix(".json") for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(set(names)):
        raise DataError(f"source natural_instructions: {path} names a task twice")
    return names


def load_task(tasks_dir: Path, name: str, source: str) -> dict[str, Any]:
    """A task JSON file, checked for the fields sampling needs."""
    task = read_json(tasks_dir / f"{name}.json", source)
    where = f"source {source!r}: task {name}"
    definition = task.get("Definition") if isinstance(task, dict) else None
    if not (isinstance(definition, list) and definition and isinstance(definition[0], str)):
        raise DataError(f"{where}: expected 'Definition' as a non-empty list of strings")
    examples = task.get("Positive Examples", [])
    if not isinstance(examples, list) or not all(isinstance(e, dict) and isinstance(e.get("input"), str)
                                                 and isinstance(e.get("output"), str) for e in examples):
        raise DataError(f"{where}: expected 'Positive Examples' as a list of {{input: str, output: str}}")
    instances = task.get("Instances")
    if not isinstance(instances, list) or not all(
            isinstance(i, dict) and isinstance(i.get("input"), str) and isinstance(i.get("output"), list)
            and all(isinstance(o, str) for o in i["output"]) for i in instances):
        raise DataError(f"{where}: expected 'Instances' as a list of {{id, input: str, output: [str]}}")
    return task


def is_exact_match_task(task: dict[str, Any], max_words: int) -> bool:
    """A '1_word' task: every reference answer is at most `max_words` words."""
    return all(words(o.strip()) <= max_words for inst in task["Instances"] for o in inst["output"])


# The Alpaca preamble the winners' README prints at the head of every base-model prompt (the with-input variant).
ALPACA_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                   "Write a response that appropriately completes the request.\n\n")


def few_shot_prompt(definition: str, examples: list[dict], instance_input: str) -> str:
    """The base-model prompt of the winners' README ("Input and Output Schema for Mistral Inference"): the Alpaca
    preamble, `### Instruction:` + the definition, each example as `### Input:` / `### Response:` blocks, then the
    instance with an open `### Response:`. `examples` are used in the order given."""
    parts = [ALPACA_PREAMBLE, f"### Instruction:\n{definition}\n\n"]
    for example in examples:
        parts.append(f"### Input:\n{example['input']}\n\n### Response:\n{example['output']}\n\n")
    parts.append(f"### Input:\n{instance_input}\n\n### Response:\n")
    return "".join(parts)


def instance_prompt(task: dict[str, Any], instance_input: str, settings: NIPredictions,
                    rng: random.Random) -> str:
    """All the task's Positive Examples (or the first `num_shots`), shuffled by `rng` when `shuffle_examples`, as the
    README's prompt shows them ("all of its Positive Examples in a shuffled order"; its generator is unpublished,
    so ours is seeded per instance from the recipe seed)."""
    examples = list(task.get("Positive Examples", []))
    if settings.num_shots is not None:
        examples = examples[:settings.num_shots]
    if settings.shuffle_examples:
        rng.shuffle(examples)
    return few_shot_prompt(task["Definition"][0], examples, instance_input)


# --- step 1: predictions ------------------------------------------------------------------------------------------

def _task_instances(task: dict, name: str, source: NaturalInstructionsSource, seed: int) -> list[dict]:
    instances = task["Instances"]
    limit = source.predictions.max_instances_per_task
    if limit is not None and len(instances) > limit:
        picked = sorted(source_rng(seed, f"{source.name}:{name}").sample(range(len(instances)), limit))
        instances = [instances[i] for i in picked]
    return instances


def task_prompts(task: dict, name: str, source: NaturalInstructionsSource, seed: int) -> list[dict]:
    """The records of one task before prediction: its (sampled) instances, each with its prompt."""
    settings = source.predictions
    records = []
    for index, inst in enumerate(_task_instances(task, name, source, seed)):
        rng = source_rng(seed, f"{source.name}:{name}:{inst.get('id', index)}:shots")
        records.append({"task_file": f"{name}.json", "id": inst.get("id"), "orig_input": inst["input"],
                        "ground_truth": inst["output"],
                        "few_shot_prompt": instance_prompt(task, inst["input"], settings, rng)})
    return records


def prediction_cache_dir(cache_dir: Path, source: NaturalInstructionsSource, seed: int, model_key: Any) -> Path:
    """Predictions depend on the model and the prompt settings: both go into the folder name."""
    settings = source.predictions.model_dump(mode="json", exclude={"precomputed", "processes"})
    key = digest_of({"model": model_key, "predictions": settings, "seed": seed, "prompt": "readme-v1"})[:16]
    return cache_dir / "ni-predictions" / key


def task_sizes(tasks: dict[str, dict], source: NaturalInstructionsSource, seed: int) -> dict[str, int]:
    return {name: len(_task_instances(task, name, source, seed)) for name, task in tasks.items()}


def cached_predictions(tasks: dict[str, dict], source: NaturalInstructionsSource, seed: int, folder: Path,
                       predictor_factory: Callable[[], Predictor],
                       launch: Callable[[list[str]], None] | None = None) -> dict[str, list[dict]]:
    """Predictions per task: read where cached, else computed and cached (one atomic file per finished task),
    in this process or, with `launch`, by worker processes that split the missing tasks."""
    from birbal.data.inference import run_tasks

    folder.mkdir(parents=True, exist_ok=True)
    missing = [name for name in tasks if not (folder / f"{name}.jsonl").is_file()]
    if missing and launch is not None:
        launch(missing)
    elif missing:
        run_tasks(task_sizes({n: tasks[n] for n in missing}, source, seed),
                  lambda name: task_prompts(tasks[name], name, source, seed), folder, predictor_factory)
    return {name: list(read_rows(folder / f"{name}.jsonl", source.name)) for name in tasks}


PREDICTION_FIELDS = ("task_file", "orig_input", "ground_truth", "prediction")


def precomputed_predictions(path: Path, source: str) -> dict[str, list[dict]]:
    """A JSON-lines file of prediction rows, or a folder of per-task JSON arrays (upstream's layout)."""
    files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise DataError(f"source {source!r}: precomputed predictions not found: {path}")
    grouped: dict[str, list[dict]] = defaultdict(list)
    for file in files:
        for number, row in enumerate(read_rows(file, source), 1):
            if not isinstance(row, dict) or any(name not in row for name in PREDICTION_FIELDS) \
                    or not isinstance(row["ground_truth"], list) or not isinstance(row["prediction"], str):
                raise DataError(f"source {source!r}: {file}: prediction row {number} needs "
                                f"{{task_file: str, orig_input: str, ground_truth: [str], prediction: str}}")
            grouped[str(row["task_file"]).removesuffix(".json")].append(row)
    return dict(grouped)


# --- step 2: sampling ---------------------------------------------------------------------------------------------

def first_paragraph(prediction: str) -> str:
    return prediction.split("\n\n")[0]


def quota_for(accuracy: float, multiplier: float = 1.0) -> int:
    decile = math.floor(int((accuracy * 100) / 10))  # upstream's expression, float rounding included
    base = QUOTA_BY_DECILE[decile] if decile < len(QUOTA_BY_DECILE) else QUOTA_TOP
    return int(base * multiplier)


def sample_exact_match(records: list[dict], instruction: str, source: NaturalInstructionsSource,
                       rng: random.Random) -> tuple[list[dict], dict[str, Any]]:
    """Wrong answers only (exact string match against any reference), at most the accuracy's quota."""
    wrong = [{"instruction": instruction, "input": r["orig_input"], "output": r["ground_truth"][0],
              "source": source.name}
             for r in records if r["ground_truth"] and first_paragraph(r["prediction"]) not in r["ground_truth"]]
    accuracy = (len(records) - len(wrong)) / len(records) if records else 0.0
    rng.shuffle(wrong)
    short = [r for r in wrong if keep_length(source.length_rule, source.max_words, r)]
    rng.shuffle(short)
    quota = quota_for(accuracy, source.quota_multiplier)
    kept = short[:quota]
    return kept, {"kind": "exact_match", "instances": len(records), "accuracy": round(accuracy, 6),
                  "wrong": len(wrong), "wrong_short": len(short), "quota": quota, "kept": len(kept)}


_SCORER = None


def rouge_l(prediction: str, references: list[str]) -> float:
    """Upstream's scoring: first paragraph, dots removed, lower-cased, best F over the references.

    Upstream used the `rouge` package; this uses Google's `rouge-score` (same LCS F-measure, its own tokeniser:
    lower-cased alphanumeric words), so a few scores near a band edge may land in the neighbouring band.
    """
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"])
    pred = first_paragraph(prediction).strip().replace(".", "")
    best = 0.0
    for reference in references:
        ref, hyp = reference.replace(".", ""), pred
        if not ref and not hyp:
            ref = hyp = "DUMMY"
        ref = ref or hyp
        hyp = hyp or ref
        best = max(best, _SCORER.score(ref.lower(), hyp.lower())["rougeL"].fmeasure)
    return best


def band_of(score: float) -> str | None:
    if score < ROUGE_BANDS[0]:
        return "<0.2"
    for low, high in zip(ROUGE_BANDS, ROUGE_BANDS[1:], strict=False):
        if low <= score < high:
            return f"{low:.1f}-{high:.1f}"
    return None  # >= 0.8: the model already does this well


def sample_generation(records: list[dict], instruction: str, source: NaturalInstructionsSource,
                      rng: random.Random) -> tuple[list[dict], dict[str, Any]]:
    bands: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record["ground_truth"]:
            band = band_of(rouge_l(record["prediction"], record["ground_truth"]))
            if band is not None:
                bands[band].append(record)
    picked = []
    counts = {}
    for band in ["<0.2", *(f"{lo:.1f}-{hi:.1f}" for lo, hi in zip(ROUGE_BANDS, ROUGE_BANDS[1:], strict=False))]:
        members = bands.get(band, [])
        rng.shuffle(members)
        share = source.rouge_low_keep if band == "<0.2" else source.rouge_band_keep
        take = int(math.floor(share * len(members)))
        picked.extend(members[:take])
        counts[band] = {"scored": len(members), "taken": take}
    single = [r for r in picked if len(r["ground_truth"]) == 1
              and words(r["orig_input"]) <= source.generation_max_input_words]
    rows = [{"instruction": instruction, "input": r["orig_input"], "output": r["ground_truth"][0],
             "source": source.name} for r in single]
    kept = [r for r in rows if keep_length(source.length_rule, source.max_words, r)]
    return kept, {"kind": "generation", "instances": len(records), "bands": counts, "single_reference": len(single),
                  "kept": len(kept)}


# --- the source --------------------------------------------------------------------------------------------------

def load_natural_instructions(source: NaturalInstructionsSource, seed: int, cache_dir: Path,
                              predictor_factory: Callable[[], Predictor], model_key: Any,
                              launch: Callable[[Path, list[str]], None] | None = None,
                              ) -> tuple[list[dict], SourceReport]:
    tasks_dir = resolve_path(source.tasks_dir)
    if not tasks_dir.is_dir():
        raise DataError(f"source {source.name!r}: tasks folder not found: {tasks_dir} (expected a checkout of "
                        f"allenai/natural-instructions' tasks/)")
    names = read_task_list(resolve_path(source.task_list))
    tasks = {name: load_task(tasks_dir, name, source.name) for name in tqdm(names, desc="NI tasks", unit="task",
                                                                           leave=False)}
    exact = set(read_task_list(resolve_path(source.exact_match_tasks))) if source.exact_match_tasks else {
        n for n, t in tasks.items() if is_exact_match_task(t, source.exact_match_max_words)}
    report = SourceReport(name=source.name, kind=source.kind, origin=shown_path(tasks_dir),
                          revision=source.tasks_dir_revision)
    if source.predictions.precomputed:
        pred_path = resolve_path(source.predictions.precomputed)
        predictions = precomputed_predictions(pred_path, source.name)
        report.extra["predictions"] = {"precomputed": shown_path(pred_path)}
        missing = sorted(set(names) - set(predictions))
        if missing:
            raise DataError(f"source {source.name!r}: precomputed predictions lack {len(missing)} task(s), e.g. "
                            f"{', '.join(missing[:3])}")
    else:
        folder = prediction_cache_dir(cache_dir, source, seed, model_key)
        predictions = cached_predictions(tasks, source, seed, folder, predictor_factory,
                                         None if launch is None else lambda names: launch(folder, names))
        report.extra["predictions"] = {"cache_key": folder.name, "model": model_key}
    rows: list[dict] = []
    per_task = {}
    steps = {"tasks": len(names), "exact_match_tasks": 0, "generation_tasks": 0, "predictions": 0,
             "exact_match_kept": 0, "generation_kept": 0}
    for name in names:
        instruction = tasks[name]["Definition"][0]
        rng = source_rng(seed, f"{source.name}:{name}:sample")
        records = predictions.get(name, [])
        steps["predictions"] += len(records)
        if name in exact:
            kept, stats = sample_exact_match(records, instruction, source, rng)
            steps["exact_match_tasks"] += 1
            steps["exact_match_kept"] += len(kept)
        else:
            kept, stats = sample_generation(records, instruction, source, rng)
            steps["generation_tasks"] += 1
            steps["generation_kept"] += len(kept)
        per_task[name] = stats
        rows.extend(kept)
    report.steps.update(steps)
    report.extra["per_task"] = per_task
    return rows, report
