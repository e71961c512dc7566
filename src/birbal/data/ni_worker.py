"""One worker of the NI predictions step: `python -m birbal.data.ni_worker <job.json>` under a launcher that sets
RANK, WORLD_SIZE and LOCAL_RANK (accelerate launch on GPUs, torch.distributed.run on CPU; see inference.py).

The job file names the recipe, the NI source, the seed, the cache and prediction folders and the tasks to do;
each worker takes its share (`inference.assign`), loads the base model on GPU LOCAL_RANK and writes each finished
task's file atomically. The workers share nothing but the folder, so no process group is set up.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m birbal.data.ni_worker <job.json>", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    from birbal.config import Recipe

    recipe = Recipe.model_validate(job["recipe"])
    assert recipe.data.rebuild is not None
    source = next(s for s in recipe.data.rebuild.sources if s.name == job["source"])
    if source.predictions.backend == "vllm" and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local)  # vLLM takes the first visible GPU: give it this one
        local = 0
    import torch

    from birbal.data.inference import make_predictor, run_tasks
    from birbal.data.ni import load_task, task_prompts, task_sizes
    from birbal.data.sources import resolve_path
    from birbal.models import load_tokenizer

    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cache_dir, folder, seed = Path(job["cache_dir"]), Path(job["folder"]), int(job["seed"])
    tasks_dir = resolve_path(source.tasks_dir)
    tasks = {name: load_task(tasks_dir, name, source.name) for name in job["tasks"]}
    tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir)
    run_tasks(task_sizes(tasks, source, seed), lambda name: task_prompts(tasks[name], name, source, seed), folder,
              lambda: make_predictor(recipe, cache_dir, tokenizer, source.predictions, device), rank, world)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
