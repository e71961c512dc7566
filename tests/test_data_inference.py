"""The NI predictions step at scale: length-sorted batches, the task split across processes, 1 and 2 processes
giving the same files (two real CPU worker processes through torch.distributed.run), resuming per task."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

from birbal.config import load_recipe
from birbal.data.inference import (
    BaseModelPredictor,
    assign,
    launch_command,
    launch_workers,
    length_batches,
    run_tasks,
)
from birbal.data.ni import load_task, task_prompts, task_sizes
from birbal.data.sources import resolve_path
from birbal.errors import DataError
from birbal.models import load_tokenizer

NI = "fixtures/sources/natural-instructions"
TASKS = ("task024_cosmosqa_answer_generation", "task065_timetravel_consistent_sentence_classification",
         "task241_tweetqa_classification")


def test_length_batches_sort_and_respect_both_limits():
    lengths = [5, 50, 7, 50, 20, 3]
    batches = length_batches(lengths, max_new_tokens=10, batch_size=2, max_batch_tokens=1000)
    assert batches == [[1, 3], [4, 2], [0, 5]]  # longest first, ties in input order, 2 rows each
    tight = length_batches(lengths, max_new_tokens=10, batch_size=64, max_batch_tokens=120)
    assert tight == [[1, 3], [4, 2, 0, 5]]  # 2 x 60 fits 120; 3 x 60 would not; 4 x 30 does
    assert sorted(i for b in tight for i in b) == list(range(6))
    assert length_batches([500], 10, 4, 100) == [[0]]  # a row longer than the budget still runs, alone


def test_static_batches_keep_their_bucketed_cache_within_the_budget():
    from birbal.data.static_engine import bucket_length, bucket_rows

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(6.4, 0.6)) + 20 for _ in range(2000)]
    cost = lambda rows, width: bucket_rows(rows) * bucket_length(width)  # noqa: E731 (BaseModelPredictor's)
    batches = length_batches(lengths, 32, 64, 131072, cost)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    widths = [max(lengths[i] for i in b) + 32 for b in batches]
    assert all(len(b) == 1 or cost(len(b), w) <= 131072 for b, w in zip(batches, widths, strict=True))
    # the rows of all but the last batch are whole buckets (few filler rows), and few shapes come out
    assert all(bucket_rows(len(b)) == len(b) for b in batches[:-1])
    assert len({(bucket_rows(len(b)), bucket_length(w)) for b, w in zip(batches, widths, strict=True)}) <= 20


def test_assign_is_deterministic_and_balanced():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 10}
    shares = assign(sizes, 2)
    assert shares == [["a", "d", "e"], ["b", "c"]]  # loads 120 and 110
    assert assign(sizes, 1) == [["a", "b", "c", "d", "e"]] and assign(sizes, 2) == shares
    assert sorted(n for s in assign(sizes, 3) for n in s) == sorted(sizes)


def test_launchers_are_accelerate_on_gpus_and_torchrun_on_cpu(tmp_path, monkeypatch):
    job = tmp_path / "job.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = launch_command(2, job)
    assert cpu[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    gpu = launch_command(8, job)
    assert gpu[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"] and gpu[5] == "8"
    assert gpu[-3:] == cpu[-3:] == ["-m", "birbal.data.ni_worker", str(job)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    recipe = load_recipe("smoke", [
        "data.rebuild.sources=[{name: natural_instructions, kind: natural_instructions, "
        f"tasks_dir: {NI}/tasks, task_list: {NI}/task_list.txt, "
        "predictions: {max_new_tokens: 6, batch_size: 4, max_batch_tokens: 4096}}]"])
    source = recipe.data.rebuild.sources[0]
    tasks = {name: load_task(resolve_path(source.tasks_dir), name, source.name) for name in TASKS}
    tokenizer = load_tokenizer(recipe.model.tokenizer, cache)
    return recipe, source, tasks, tokenizer, cache


def _inline(setup, folder):
    recipe, source, tasks, tokenizer, cache = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (torch.distributed.run sets OMP_NUM_THREADS=1)
    try:
        return run_tasks(task_sizes(tasks, source, recipe.data.seed),
                         lambda n: task_prompts(tasks[n], n, source, recipe.data.seed), folder,
                         lambda: BaseModelPredictor(recipe, cache, tokenizer, source.predictions))
    finally:
        torch.set_num_threads(threads)


def test_batched_predictions_equal_one_row_at_a_time(setup):
    """The length-sorted, left-padded batches of the static engine (the default) give what one-prompt `generate`
    gives (`engine: generate`, the path before), on CPU in fp32, and so do `generate`'s own batches."""
    recipe, source, tasks, tokenizer, cache = setup
    assert source.predictions.engine == "static"
    predictor = BaseModelPredictor(recipe, cache, tokenizer, source.predictions)
    prompts = [r["few_shot_prompt"] for r in task_prompts(tasks[TASKS[1]], TASKS[1], source, 0)][:5]
    batched = predictor(prompts)
    assert predictor._engine is not None and not predictor.engine.graphs  # CPU: the same steps, eagerly
    assert predictor.model.config._attn_implementation == "birbal_grouped_sdpa"  # decode_attention: grouped
    single = [predictor.generate_batch_hf(predictor.encode([p]))[0] for p in prompts]
    assert batched == single and len(set(batched)) > 1  # random weights: different prompts, different text
    generate = BaseModelPredictor(recipe, cache, tokenizer, source.predictions.model_copy(update={"engine": "generate"}))
    assert generate(prompts) == batched and generate._engine is None
    # training's attention choice (birbal-4090: flex_attention) does not reach the predictions: they load SDPA
    flex = recipe.model_copy(update={"model": recipe.model.model_copy(update={"attn_implementation": "flex_attention"})})
    sdpa = BaseModelPredictor(flex, cache, tokenizer, source.predictions.model_copy(update={"engine": "generate"}))
    assert sdpa.model.config._attn_implementation == "sdpa" and sdpa(prompts[:2]) == batched[:2]
    counted = []
    predictor.on_batch = counted.append
    predictor(prompts)
    assert sum(counted) == 5 and len(counted) == 2  # batch_size 4: two batches, reported to the progress bar


def test_the_static_engine_runs_a_4bit_base_as_generate_does(setup):
    """`load_in_4bit: true` (NF4 base, not upstream): the static engine's cache takes the hidden states' dtype, not
    the packed weights', and its eager steps give `generate`'s text."""
    recipe, source, tasks, tokenizer, cache = setup
    four_bit = source.predictions.model_copy(update={"load_in_4bit": True})
    static = BaseModelPredictor(recipe, cache, tokenizer, four_bit)
    assert getattr(static.model, "hf_quantizer", None) is not None
    prompts = [r["few_shot_prompt"] for r in task_prompts(tasks[TASKS[2]], TASKS[2], source, 0)][:3]
    texts = static(prompts)
    assert static.engine._dtype == torch.float32 and not static.engine.graphs
    generate = BaseModelPredictor(recipe, cache, tokenizer, four_bit.model_copy(update={"engine": "generate"}))
    assert generate(prompts) == texts and len(set(texts)) > 1


def test_one_and_two_processes_write_identical_files_and_resume(setup, tmp_path, capsys):
    recipe, source, tasks, _, cache = setup
    one = tmp_path / "one"
    done = _inline(setup, one)
    assert sorted(done) == sorted(TASKS)
    total = sum(len(t["Instances"]) for t in tasks.values())
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]  # the progress bar's last state
    assert re.search(rf"NI predictions \[1/1\]: 100%.* {total}/{total} \[[0-9:]+<00:00, +[0-9.]+inst/s\]", bar), bar
    two = tmp_path / "two"
    two.mkdir()
    # resumable: a finished task's file is the unit of work; the workers leave it alone
    kept = one / f"{TASKS[2]}.jsonl"
    (two / kept.name).write_bytes(kept.read_bytes())
    before = os.stat(two / kept.name).st_mtime_ns
    # a worker killed while writing leaves atomic_write's temporary, half the bytes: never taken for the task
    whole = (one / f"{TASKS[0]}.jsonl").read_bytes()
    (two / f".{TASKS[0]}.jsonl.k1ll3d.tmp").write_bytes(whole[:len(whole) // 2])
    launch_workers(recipe, source, recipe.data.seed, cache, two, list(TASKS), processes=2)
    assert os.stat(two / kept.name).st_mtime_ns == before
    for name in TASKS:
        assert (two / f"{name}.jsonl").read_bytes() == (one / f"{name}.jsonl").read_bytes(), name
    rows = [json.loads(line) for line in (two / f"{TASKS[0]}.jsonl").read_text().splitlines()]
    assert len(rows) == len(tasks[TASKS[0]]["Instances"]) and all(isinstance(r["prediction"], str) for r in rows)
    assert not list(two.glob(".*")) and not list(tmp_path.glob(".ni-job.*"))


def test_a_failed_worker_stops_with_the_unfinished_count(setup, tmp_path):
    recipe, source, _, _, cache = setup
    with pytest.raises(DataError, match=r"NI prediction workers exited with [1-9]\d*; 1 of 1 tasks unfinished"):
        launch_workers(recipe, source, recipe.data.seed, cache, tmp_path / "f", ["task999_not_a_task"], processes=2)


def test_a_bad_engine_is_a_one_line_recipe_error():
    from birbal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"predictions\.engine: Input should be 'static' or 'generate' "
                                          r"\(got 'vllm_fast'\)") as caught:
        load_recipe("smoke", ["data.rebuild.sources=[{name: natural_instructions, kind: natural_instructions, "
                              f"tasks_dir: {NI}/tasks, task_list: {NI}/task_list.txt, "
                              "predictions: {engine: vllm_fast}}]"])
    assert "\n" not in str(caught.value)
