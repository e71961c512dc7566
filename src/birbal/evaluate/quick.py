"""The quick suite: small local scenarios, adapted and scored the way HELM adapts and scores its own.

Four scenarios from three files under `scenarios/` (rows marked `train` are the in-context examples):
- multiple choice, HELM's `multiple_choice_joint` (as for MMLU): few-shot, lettered choices, one token generated
  at temperature 0, exact match on the letter;
- the same questions, HELM's `multiple_choice_separate_original`: one request per choice with `echo_prompt` and
  no new tokens, the choice scored by the summed log-probability of its own tokens, the best choice must be right;
- short answers, generation with a newline stop, exact match (HELM's `exact_match`: stripped strings equal);
- summaries, generation scored by ROUGE-2 F1 with stemming (HELM's `rouge_2`, through the `rouge-score` package).
No network, no HELM datasets: it checks the server answers HELM's requests correctly, and gives a rough signal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from birbal.errors import EvaluateError
from birbal.evaluate.client import Transport
from birbal.fsutil import atomic_write_json, atomic_write_text

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTIONS = "The following are multiple choice questions (with answers) about general knowledge.\n\n"
SUMMARY_INSTRUCTION = "Summarize the above article in 1 sentence.\n"


def load_scenario(name: str) -> list[dict[str, Any]]:
    text = resources.files("birbal.evaluate").joinpath("scenarios", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def scenario_files() -> dict[str, str]:
    """sha256 of each scenario file: part of the evaluate stage's inputs."""
    import hashlib

    folder = resources.files("birbal.evaluate").joinpath("scenarios")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".jsonl")}


def _split(rows: list[dict], limit: int | None) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    return train, test[:limit] if limit else test


def process_item(prompt: str, *, max_tokens: int, temperature: float = 0.0, stop: list[str] | None = None,
                 echo_prompt: bool = False) -> dict[str, Any]:
    """A HELM `Request` as the adapters build it (fields of helm.common.request.Request)."""
    return {"kind": "process", "prompt": prompt, "temperature": temperature, "num_completions": 1,
            "max_tokens": max_tokens, "top_p": 1, "echo_prompt": echo_prompt, "top_k_per_token": 1,
            "stop_sequences": stop or []}


def _mc_block(row: dict, with_answer: bool) -> str:
    lines = [f"Question: {row['question']}"]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"])]
    lines.append(f"Answer: {LETTERS[row['answer']]}" if with_answer else "Answer:")
    return "\n".join(lines)


def continuation_logprob(tokens: list[dict[str, Any]], continuation: str) -> float:
    """Summed log-probability of the echoed tokens that spell `continuation` at the end of the prompt.

    HELM counts the prefix's tokens with the tokenizer; walking back over the echoed token texts until they cover
    the continuation gives the same tokens without assuming how the server writes BOS or leading spaces.
    """
    target = continuation.strip()
    covered, total = "", 0.0
    for token in reversed(tokens):
        covered = token["text"] + covered
        total += token["logprob"] or 0.0
        if len(covered.strip()) >= len(target):
            return total
    raise EvaluateError(f"the server echoed {len(tokens)} tokens that do not cover the choice {continuation!r}: "
                        f"does /process honour echo_prompt?")


@dataclass
class Scenario:
    name: str
    adapter: str
    metric: str
    items: list[dict[str, Any]] = field(default_factory=list)  # requests
    score: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None  # results -> per-instance


def mc_joint(limit: int | None) -> Scenario:
    train, test = _split(load_scenario("multiple_choice.jsonl"), limit)
    shots = "".join(_mc_block(r, True) + "\n\n" for r in train)
    items = [process_item(MC_INSTRUCTIONS + shots + _mc_block(r, False), max_tokens=1, stop=["\n"]) for r in test]

    def score(results: list[dict]) -> list[dict]:
        return [{"id": i, "prediction": res["text"].strip(), "reference": LETTERS[row["answer"]],
                 "value": float(res["text"].strip() == LETTERS[row["answer"]])}
                for i, (row, res) in enumerate(zip(test, results, strict=True))]

    return Scenario("multiple_choice_joint", "multiple_choice_joint", "exact_match", items, score)


def mc_separate(limit: int | None) -> Scenario:
    _, test = _split(load_scenario("multiple_choice.jsonl"), limit)
    items = [process_item(f"Question: {r['question']}\nAnswer: {choice}", max_tokens=0, echo_prompt=True)
             for r in test for choice in r["choices"]]

    def score(results: list[dict]) -> list[dict]:
        scored, cursor = [], 0
        for i, row in enumerate(test):
            n = len(row["choices"])
            logprobs = [continuation_logprob(res["tokens"], choice)
                        for res, choice in zip(results[cursor:cursor + n], row["choices"], strict=True)]
            cursor += n
            best = max(range(n), key=lambda k: logprobs[k])
            scored.append({"id": i, "prediction": LETTERS[best], "reference": LETTERS[row["answer"]],
                           "choice_logprobs": logprobs, "value": float(best == row["answer"])})
        return scored

    return Scenario("multiple_choice_separate", "multiple_choice_separate_original", "exact_match", items, score)


def exact_match(limit: int | None) -> Scenario:
    train, test = _split(load_scenario("exact_match.jsonl"), limit)
    shots = "".join(f"Q: {r['input']}\nA: {r['output']}\n\n" for r in train)
    items = [process_item(shots + f"Q: {r['input']}\nA:", max_tokens=8, stop=["\n"]) for r in test]

    def score(results: list[dict]) -> list[dict]:
        return [{"id": i, "prediction": res["text"], "reference": row["output"],
                 "value": float(res["text"].strip() == row["output"].strip())}
                for i, (row, res) in enumerate(zip(test, results, strict=True))]

    return Scenario("exact_match", "generation", "exact_match", items, score)


def summarization(limit: int | None) -> Scenario:
    from rouge_score import rouge_scorer

    train, test = _split(load_scenario("summarization.jsonl"), limit)
    shots = "".join(f"###\nArticle: {r['document']}\n\n{SUMMARY_INSTRUCTION}{r['summary']}\n\n" for r in train)
    items = [process_item(shots + f"###\nArticle: {r['document']}\n\n{SUMMARY_INSTRUCTION}", max_tokens=48,
                          stop=["###"]) for r in test]
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)

    def score(results: list[dict]) -> list[dict]:
        return [{"id": i, "prediction": res["text"], "reference": row["summary"],
                 "value": scorer.score(row["summary"], res["text"].strip())["rouge2"].fmeasure}
                for i, (row, res) in enumerate(zip(test, results, strict=True))]

    return Scenario("summarization", "generation", "rouge_2", items, score)


SCENARIOS: dict[str, Callable[[int | None], Scenario]] = {
    "multiple_choice_joint": mc_joint, "multiple_choice_separate": mc_separate,
    "exact_match": exact_match, "summarization": summarization,
}
ROW_LABELS = {
    "multiple_choice_joint": "quick: multiple choice, joint (MMLU-style) - EM",
    "multiple_choice_separate": "quick: multiple choice, separate by logprob - EM",
    "exact_match": "quick: short answers - EM",
    "summarization": "quick: summaries - ROUGE-2",
}


def run_quick(transport: Transport, out_dir: Path, max_eval_instances: int | None) -> dict[str, Any]:
    """Run every quick scenario through `transport`; write predictions and results under `out_dir`."""
    results: dict[str, Any] = {}
    predictions: list[str] = []
    for name, build in SCENARIOS.items():
        scenario = build(max_eval_instances)
        answers = transport.run(scenario.items)
        failed = [(item, res) for item, res in zip(scenario.items, answers, strict=True) if not res.get("success")]
        if failed:
            item, res = failed[0]
            raise EvaluateError(
                f"quick scenario {name}: {len(failed)} of {len(answers)} requests failed through "
                f"{transport.description}; first: {res.get('error')} (request: max_new_tokens={item['max_tokens']}, "
                f"echo_prompt={item['echo_prompt']}, prompt of {len(item['prompt'])} chars)")
        assert scenario.score is not None
        instances = scenario.score(answers)
        mean = sum(i["value"] for i in instances) / len(instances)
        results[name] = {"adapter": scenario.adapter, "metric": scenario.metric, "value": mean,
                         "instances": len(instances), "requests": len(scenario.items)}
        predictions += [json.dumps({"scenario": name, **inst}, ensure_ascii=False) for inst in instances]
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(predictions) + "\n")
    summary = {"source": "quick", "client": transport.description, "scenarios": results,
               "rows": [{"label": ROW_LABELS[name], "value": res["value"], "metric": res["metric"],
                         "runs": 1, "instances": res["instances"], "winners": None, "winners_label": None,
                         "note": "local check, not a challenge figure"} for name, res in results.items()],
               "missing": []}
    atomic_write_json(out_dir / "results.json", summary)
    return summary
