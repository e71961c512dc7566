"""Natural Instructions: task files, prompts, both samplers, the prediction cache, real inference (tiny model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from birbal.config.data import NaturalInstructionsSource, NIPredictions
from birbal.data.ni import (
    band_of,
    cached_predictions,
    few_shot_prompt,
    is_exact_match_task,
    load_natural_instructions,
    load_task,
    precomputed_predictions,
    prediction_cache_dir,
    quota_for,
    rouge_l,
    sample_exact_match,
    sample_generation,
)
from birbal.data.sources import resolve_path
from birbal.errors import DataError

NI = "fixtures/sources/natural-instructions"
EM_TASK = "task065_timetravel_consistent_sentence_classification"
GEN_TASK = "task024_cosmosqa_answer_generation"


def source(**kw) -> NaturalInstructionsSource:
    return NaturalInstructionsSource(name="ni", kind="natural_instructions", tasks_dir=f"{NI}/tasks",
                                     task_list=f"{NI}/task_list.txt", **kw)


def tasks() -> dict[str, dict]:
    folder = resolve_path(f"{NI}/tasks")
    return {name: load_task(folder, name, "ni") for name in (EM_TASK, GEN_TASK)}


@pytest.mark.parametrize(("accuracy", "quota"), [
    (0.0, 350), (0.19, 350), (0.2, 300), (0.39, 300), (0.4, 250), (0.59, 250), (0.6, 200), (0.69, 200),
    (0.7, 150), (0.79, 150), (0.8, 100), (0.89, 100), (0.9, 50), (1.0, 50)])
def test_quota_table(accuracy, quota):
    assert quota_for(accuracy) == quota


def test_quota_multiplier():
    assert quota_for(0.1, 2.0) == 700


def test_task_kind_and_prompt():
    loaded = tasks()
    assert is_exact_match_task(loaded[EM_TASK], 1) and not is_exact_match_task(loaded[GEN_TASK], 1)
    prompt = few_shot_prompt(loaded[GEN_TASK], "Context: x Question: y", num_shots=1)
    assert prompt.startswith("### Instruction:\nCraft one correct answer")
    assert prompt.count("### Input:") == 2 and prompt.endswith("### Input:\nContext: x Question: y\n\n### Response:\n")
    assert "Ravi" not in prompt  # only one shot


def test_task_schema_errors(tmp_path):
    (tmp_path / "task1_bad.json").write_text(json.dumps({"Definition": "not a list", "Instances": []}))
    with pytest.raises(DataError, match="task task1_bad: expected 'Definition'"):
        load_task(tmp_path, "task1_bad", "ni")
    (tmp_path / "task2_bad.json").write_text(json.dumps({"Definition": ["d"], "Instances": [{"input": "x",
                                                                                             "output": "y"}]}))
    with pytest.raises(DataError, match="expected 'Instances'"):
        load_task(tmp_path, "task2_bad", "ni")


def em_records(right: int, wrong: int) -> list[dict]:
    return ([{"orig_input": f"right {i} a b c d", "ground_truth": ["1"], "prediction": "1\n\nmore"}
             for i in range(right)]
            + [{"orig_input": f"wrong {i} a b c d", "ground_truth": ["1"], "prediction": " 1"} for i in range(wrong)])


def test_exact_match_keeps_wrong_answers_up_to_quota():
    kept, stats = sample_exact_match(em_records(right=90, wrong=10), "Define.", source(), random.Random(0))
    assert stats["accuracy"] == 0.9 and stats["quota"] == 50 and len(kept) == 10  # " 1" != "1": upstream compares raw
    assert all(r["input"].startswith("wrong") and r["instruction"] == "Define." and r["output"] == "1" for r in kept)
    kept, stats = sample_exact_match(em_records(right=0, wrong=400), "D", source(), random.Random(0))
    assert stats["quota"] == 350 and len(kept) == 350


def test_rouge_bands():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat."]) == pytest.approx(1.0)
    assert rouge_l("completely different words", ["the cat sat"]) == 0.0
    assert rouge_l("", [""]) == 1.0  # both empty: upstream's DUMMY rule
    assert band_of(0.1) == "<0.2" and band_of(0.2) == "0.2-0.3" and band_of(0.79) == "0.7-0.8"
    assert band_of(0.8) is None


def test_generation_sampling_by_band():
    low = [{"orig_input": f"in {i}", "ground_truth": ["alpha beta"], "prediction": "gamma"} for i in range(10)]
    mid = [{"orig_input": f"mid {i}", "ground_truth": ["a b c d e f g h i j"], "prediction": "a b c"}
           for i in range(10)]  # ROUGE-L 0.46
    good = [{"orig_input": f"ok {i}", "ground_truth": ["same words"], "prediction": "same words"} for i in range(5)]
    multi = [{"orig_input": "multi", "ground_truth": ["x", "y"], "prediction": "z"}]
    kept, stats = sample_generation(low + mid + good + multi, "D", source(), random.Random(0))
    assert stats["bands"]["<0.2"] == {"scored": 11, "taken": 8}
    assert stats["bands"]["0.4-0.5"] == {"scored": 10, "taken": 2}
    assert all(not r["input"].startswith("ok") for r in kept) and len(kept) <= 10
    assert all(r["input"] != "multi" for r in kept)  # single reference only


def test_precomputed_predictions_and_missing_task(tmp_path):
    preds = precomputed_predictions(resolve_path(f"{NI}/predictions.jsonl"), "ni")
    assert set(preds) == {EM_TASK, GEN_TASK} and len(preds[EM_TASK]) == 10
    rows, report = load_natural_instructions(
        source(predictions=NIPredictions(precomputed=f"{NI}/predictions.jsonl")), 0, tmp_path,
        predictor_factory=lambda: pytest.fail("no inference with precomputed predictions"), model_key="m")
    assert report.steps["exact_match_tasks"] == 1 and report.steps["generation_tasks"] == 1
    assert report.extra["per_task"][EM_TASK]["accuracy"] == 0.4 and report.steps["exact_match_kept"] == 6
    assert {r["instruction"][:20] for r in rows} == {"In this task, you ar", "Craft one correct an"}
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(line + "\n" for line in resolve_path(f"{NI}/predictions.jsonl").read_text()
                               .splitlines() if EM_TASK in line))
    with pytest.raises(DataError, match=f"lack 1 task.*{GEN_TASK}"):
        load_natural_instructions(source(predictions=NIPredictions(precomputed=str(partial))), 0, tmp_path,
                                  predictor_factory=lambda: None, model_key="m")


class CountingPredictor:
    def __init__(self, fail_on: str | None = None):
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, prompts: list[str]) -> list[str]:
        self.calls += 1
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise RuntimeError("killed")
        return ["1" for _ in prompts]


def test_prediction_cache_resumes_after_a_crash(tmp_path):
    src = source(predictions=NIPredictions(batch_size=4))
    folder = prediction_cache_dir(tmp_path, src, 0, "model")
    crashing = CountingPredictor(fail_on="Craft one correct answer")
    with pytest.raises(RuntimeError):
        cached_predictions(tasks(), src, 0, folder, lambda: crashing)
    assert (folder / f"{EM_TASK}.jsonl").is_file() and not (folder / f"{GEN_TASK}.jsonl").exists()
    assert not list(folder.glob(".*"))  # no half-written file left
    resumed = CountingPredictor()
    result = cached_predictions(tasks(), src, 0, folder, lambda: resumed)
    assert resumed.calls == 3  # only the generation task's 12 instances, 4 per batch
    assert len(result[EM_TASK]) == 10 and len(result[GEN_TASK]) == 12
    again = CountingPredictor()
    cached_predictions(tasks(), src, 0, folder, lambda: again)
    assert again.calls == 0


def test_cache_key_follows_settings(tmp_path):
    a = prediction_cache_dir(tmp_path, source(), 0, "model")
    assert a != prediction_cache_dir(tmp_path, source(predictions=NIPredictions(num_shots=1)), 0, "model")
    assert a != prediction_cache_dir(tmp_path, source(), 0, "other-model")


def test_base_model_inference_on_tiny_random_model(tmp_path):
    from birbal.config import load_recipe
    from birbal.data.inference import BaseModelPredictor
    from birbal.models import load_tokenizer

    recipe = load_recipe("smoke")
    tokenizer = load_tokenizer(recipe.model.tokenizer, tmp_path)
    settings = NIPredictions(batch_size=2, max_new_tokens=4, max_prompt_tokens=64)
    predictor = BaseModelPredictor(recipe, tmp_path, tokenizer, settings)
    prompts = ["### Input:\nshort\n\n### Response:\n", "### Input:\n" + "a much longer prompt " * 40]
    first = predictor(prompts)
    assert len(first) == 2 and all(isinstance(text, str) for text in first)
    assert predictor(prompts) == first  # greedy
    # left padding: a row's continuation does not depend on its batch neighbour
    assert predictor(prompts[:1]) == first[:1]
    rows, report = load_natural_instructions(
        source(predictions=NIPredictions(batch_size=4, max_new_tokens=3, max_instances_per_task=4)), 0,
        tmp_path, predictor_factory=lambda: predictor, model_key="tiny")
    assert report.steps["predictions"] == 8
    cached = next(Path(report.extra["predictions"]["cache_key"]).name for _ in [0])
    assert (tmp_path / "ni-predictions" / cached / f"{EM_TASK}.jsonl").is_file()
