"""Natural Instructions: task files, prompts, both samplers, the prediction cache, real inference (tiny model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from birbal.config.data import NaturalInstructionsSource, NIPredictions
from birbal.data.ni import (
    ALPACA_PREAMBLE,
    band_of,
    cached_predictions,
    few_shot_prompt,
    instance_prompt,
    is_exact_match_task,
    load_natural_instructions,
    load_task,
    precomputed_predictions,
    prediction_cache_dir,
    quota_for,
    rouge_l,
    sample_exact_match,
    sample_generation,
    task_prompts,
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


README_TASK = "task241_tweetqa_classification"


def readme_example() -> dict:
    return json.loads(resolve_path(f"{NI}/readme_example.json").read_text())


def test_prompt_is_the_readmes_printed_example_exactly():
    """The winners' README prints one record of their inference input: the same task (task241, Positive
    Examples as in the natural-instructions file) in the order it shows gives its `few_shot_prompt` exactly."""
    task = load_task(resolve_path(f"{NI}/tasks"), README_TASK, "ni")
    example = readme_example()
    shown = [task["Positive Examples"][i] for i in (3, 1, 2, 0)]  # the README's (shuffled) order
    prompt = few_shot_prompt(task["Definition"][0], shown, example["orig_input"])
    assert prompt == example["few_shot_prompt"]
    assert prompt.startswith(ALPACA_PREAMBLE + "### Instruction:\nIn this task, you are given a context tweet")


def test_prompt_uses_every_example_shuffled_per_instance():
    task = load_task(resolve_path(f"{NI}/tasks"), README_TASK, "ni")
    settings = NIPredictions()
    assert settings.num_shots is None and settings.shuffle_examples and settings.max_new_tokens == 32
    prompts = {instance_prompt(task, "x", settings, random.Random(i)) for i in range(30)}
    assert len(prompts) > 5  # the order changes with the seed
    blocks = [f"### Input:\n{e['input']}\n\n### Response:\n{e['output']}\n\n" for e in task["Positive Examples"]]
    for prompt in prompts:
        assert all(prompt.count(b) == 1 for b in blocks) and prompt.endswith("### Input:\nx\n\n### Response:\n")
    assert instance_prompt(task, "x", settings, random.Random(3)) == instance_prompt(task, "x", settings,
                                                                                     random.Random(3))
    records = task_prompts(task, README_TASK, source(), 0)
    assert [r["few_shot_prompt"] for r in records] == [r["few_shot_prompt"] for r in task_prompts(task, README_TASK,
                                                                                                  source(), 0)]
    one = instance_prompt(task, "x", NIPredictions(num_shots=1, shuffle_examples=False), random.Random(0))
    assert one.count("### Input:") == 2 and blocks[0] in one


def test_readme_prediction_is_32_tokens_of_the_real_tokenizer(tmp_path):
    """The README's prediction runs 32 tokens past its prompt and stops mid-word: 32 new tokens, no stop
    sequence, and decoding those tokens gives the printed text, not stripped."""
    from birbal.config import load_recipe
    from birbal.models import load_tokenizer

    tokenizer = load_tokenizer(load_recipe("smoke").model.tokenizer, tmp_path)  # Mistral-7B-v0.1's SentencePiece
    example = readme_example()
    prompt = tokenizer(example["few_shot_prompt"], add_special_tokens=True)["input_ids"]
    full = tokenizer(example["few_shot_prompt"] + example["prediction"], add_special_tokens=True)["input_ids"]
    assert full[:len(prompt)] == prompt and len(full) - len(prompt) == 32 == NIPredictions().max_new_tokens
    assert tokenizer.decode(full[len(prompt):], skip_special_tokens=True) == example["prediction"]


def test_task_kind():
    loaded = tasks()
    assert is_exact_match_task(loaded[EM_TASK], 1) and not is_exact_match_task(loaded[GEN_TASK], 1)


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
    src = source()
    folder = prediction_cache_dir(tmp_path, src, 0, "model")
    # the larger task (GEN, 12 instances) runs first; the crash comes in the EM task's call
    crashing = CountingPredictor(fail_on="In this task, you are given the beginning of a story")
    with pytest.raises(RuntimeError):
        cached_predictions(tasks(), src, 0, folder, lambda: crashing)
    assert (folder / f"{GEN_TASK}.jsonl").is_file() and not (folder / f"{EM_TASK}.jsonl").exists()
    assert not list(folder.glob(".*"))  # no half-written file left
    resumed = CountingPredictor()
    result = cached_predictions(tasks(), src, 0, folder, lambda: resumed)
    assert resumed.calls == 1  # only the exact-match task: one call with its 10 prompts
    assert len(result[EM_TASK]) == 10 and len(result[GEN_TASK]) == 12
    again = CountingPredictor()
    cached_predictions(tasks(), src, 0, folder, lambda: again)
    assert again.calls == 0


def test_cache_key_follows_settings(tmp_path):
    a = prediction_cache_dir(tmp_path, source(), 0, "model")
    assert a != prediction_cache_dir(tmp_path, source(predictions=NIPredictions(num_shots=1)), 0, "model")
    assert a != prediction_cache_dir(tmp_path, source(), 0, "other-model")
    # how many processes share the work does not change a prediction, so not the cache either
    assert a == prediction_cache_dir(tmp_path, source(predictions=NIPredictions(processes=4)), 0, "model")


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
