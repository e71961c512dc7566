"""The Natural Instructions predictions step at scale: batched greedy generation with the recipe's base model.

- `BaseModelPredictor` (backend `hf`): a task's prompts sorted by length, cut into batches of at most
  `batch_size` sequences and `max_batch_tokens` padded tokens, each batch left-padded and run through the
  settings' engine, then put back in the task's order: `static` (default, `birbal.data.static_engine`: prefill
  into a static KV cache, one-token steps replayed as CUDA graphs on a GPU) or `generate` (transformers'
  `generate`, one eager forward per step for the whole batch, its KV cache grown in place). Sorting keeps padding small; the token budget keeps long prompts from running out of memory. The batches
  depend only on the task's prompts and the settings, never on how many processes share the work, so the
  predictions of 1 and N processes are the same (tests/test_data_inference.py).
- `VllmPredictor` (backend `vllm`): vLLM's offline engine (paged KV cache, continuous batching) on the same token
  ids, when vllm is installed. Its kernels are not transformers', so a changed backend is a new prediction cache.
- `run_tasks` / `launch_workers`: the unit of work is one task, written atomically to `<folder>/<task>.jsonl`;
  N processes (accelerate's launcher, one per GPU; torch.distributed.run on CPU, where accelerate's multi-CPU
  launch needs MPI) split the missing tasks by a deterministic longest-first assignment, and a re-run does only the
  tasks whose file is missing. `birbal.data.ni_worker` is the per-process entry point.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from birbal.config import Recipe
from birbal.config.data import NaturalInstructionsSource, NIPredictions
from birbal.errors import DataError


def model_key(recipe: Recipe, settings: NIPredictions | None = None) -> dict[str, Any]:
    """What identifies the predicting model in the prediction cache's name."""
    model = recipe.model
    four_bit = settings.load_in_4bit if settings is not None else recipe.quantization.load_in_4bit
    return {"source": model.source, "name_or_path": model.name_or_path, "revision": model.revision,
            "init_seed": model.init_seed if model.source == "random" else None, "load_in_4bit": four_bit,
            "dtype": settings.dtype if settings is not None else None}


def length_batches(lengths: list[int], max_new_tokens: int, batch_size: int, max_batch_tokens: int,
                   cost: Callable[[int, int], int] | None = None) -> list[list[int]]:
    """Indices grouped into batches, longest prompts first (stable on ties), each at most `batch_size` rows and
    `rows x (longest prompt + max_new_tokens)` padded tokens (a single row always fits). `cost(rows, width)`:
    the tokens a batch takes instead (the static engine's: its bucketed cache shape)."""
    cost = cost or (lambda rows, width: rows * width)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = (lengths[current[0]] if current else lengths[index]) + max_new_tokens
        if current and (len(current) >= batch_size or cost(len(current) + 1, width) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class BaseModelPredictor:
    """prompts -> greedy continuations of at most `max_new_tokens` (no stop sequence; the end-of-sequence token
    ends a row early, as `generate` does by default), decoded with special tokens dropped and not stripped: the
    README's prediction starts with the answer and keeps what follows (`"yes\\n\\n### Input:..."`).

    Prompts are cut from the left to `max_prompt_tokens` so the instance (at the end) is never lost.
    `on_batch(n)` (optional) is called after each batch with its row count, for a progress bar.
    """

    def __init__(self, recipe: Recipe, cache_dir: Path, tokenizer, settings: NIPredictions,
                 device: torch.device | None = None):
        from birbal.models import DTYPES, load_base_model, resolve_device

        self.device = device or resolve_device(recipe.train.device)
        # bf16 matmuls on a CPU are slow and not what a GPU computes either: CPU runs use float32
        dtype = DTYPES[settings.dtype] if self.device.type == "cuda" else torch.float32
        quantization = recipe.quantization if settings.load_in_4bit else None
        # SDPA whatever model.attn_implementation says: that is training's choice (birbal-4090: flex_attention,
        # for packed documents); these forwards are plain causal ones over padded batches, the same maths, and
        # the static engine's graphs and grouped decode attention are built and checked on SDPA's path
        model_cfg = recipe.model.model_copy(update={"attn_implementation": "sdpa"})
        self.model = load_base_model(model_cfg, cache_dir, self.device, dtype, quantization)
        self.model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.on_batch: Callable[[int], Any] | None = None
        self._engine = None

    @classmethod
    def from_model(cls, model, tokenizer, settings: NIPredictions, graphs: bool | None = None) -> BaseModelPredictor:
        """A predictor over a model already built (the benchmark's random-weight Mistral-7B). `graphs`: the static
        engine's CUDA graphs (None: on CUDA for an unquantized model; False: the same steps eagerly)."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.settings, self.on_batch = model.eval(), tokenizer, settings, None
        self.device = next(model.parameters()).device
        self._engine = None
        self._graphs = graphs
        return self

    @property
    def engine(self):
        """The static engine (built on first use, kept: its caches and graphs serve every later batch)."""
        if self._engine is None:
            from birbal.data.static_engine import StaticEngine

            graphs = getattr(self, "_graphs", None)
            if graphs is None:  # a 4-bit base stays eager: bitsandbytes' kernels are not checked under capture
                graphs = self.device.type == "cuda" and getattr(self.model, "hf_quantizer", None) is None
            self._engine = StaticEngine(self.model, self.tokenizer.eos_token_id, self.tokenizer.eos_token_id,
                                        self.settings.max_new_tokens, graphs=graphs,
                                        attention=self.settings.decode_attention,
                                        reserve_slots=self.settings.max_batch_tokens,
                                        prefill_tokens=self.settings.max_prefill_tokens)
        return self._engine

    def encode(self, prompts: list[str]) -> list[list[int]]:
        limit = self.settings.max_prompt_tokens
        return [ids[-limit:] for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    def generate_batch(self, encoded: list[list[int]]) -> list[str]:
        """One batch's continuations through the settings' engine (`static` or `generate`)."""
        if self.settings.engine == "generate":
            return self.generate_batch_hf(encoded)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in self.engine.generate(encoded)]

    def batch_cost(self, rows: int, width: int) -> int:
        """Padded tokens a batch takes: the static engine's bucketed cache, or `generate`'s rows x width."""
        if self.settings.engine == "generate":
            return rows * width
        from birbal.data.static_engine import bucket_length, bucket_rows

        return bucket_rows(rows) * bucket_length(width)

    @torch.inference_mode()
    def generate_batch_hf(self, encoded: list[list[int]]) -> list[str]:
        """transformers' `generate` on one left-padded batch (`engine: generate`)."""
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=self.settings.max_new_tokens, pad_token_id=pad,
                                  eos_token_id=self.tokenizer.eos_token_id)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.tolist()]

    def __call__(self, prompts: list[str]) -> list[str]:
        encoded = self.encode(prompts)
        outputs: list[str | None] = [None] * len(prompts)
        s = self.settings
        for batch in length_batches([len(e) for e in encoded], s.max_new_tokens, s.batch_size, s.max_batch_tokens,
                                    self.batch_cost):
            for index, text in zip(batch, self.generate_batch([encoded[i] for i in batch]), strict=True):
                outputs[index] = text
            if self.on_batch is not None:
                self.on_batch(len(batch))
        return outputs  # type: ignore[return-value]


class VllmPredictor(BaseModelPredictor):
    """The same prompts and token ids through vLLM's offline `LLM.generate` (greedy, `max_tokens`, no stop)."""

    def __init__(self, recipe: Recipe, cache_dir: Path, tokenizer, settings: NIPredictions,
                 device: torch.device | None = None):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise DataError("natural_instructions.predictions.backend=vllm needs vllm installed "
                            "(pip install vllm); or use backend: hf") from None
        from birbal.models import base_model_location, hub_token

        if settings.load_in_4bit:
            raise DataError("predictions.backend=vllm runs the unquantized base; set load_in_4bit: false")
        if hub_token():
            os.environ.setdefault("HF_TOKEN", hub_token() or "")
        name, revision = base_model_location(recipe.model, cache_dir)
        self.tokenizer = tokenizer
        self.settings = settings
        self.on_batch = None
        self.llm = LLM(model=name, revision=revision, tokenizer=name, tokenizer_revision=revision,
                       dtype=settings.dtype, seed=0, enable_prefix_caching=True,
                       max_model_len=settings.max_prompt_tokens + settings.max_new_tokens)
        self.params = SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens, skip_special_tokens=True)

    def __call__(self, prompts: list[str]) -> list[str]:
        encoded = self.encode(prompts)
        results = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], self.params, use_tqdm=False)
        if self.on_batch is not None:
            self.on_batch(len(prompts))
        return [result.outputs[0].text for result in results]


def make_predictor(recipe: Recipe, cache_dir: Path, tokenizer, settings: NIPredictions,
                   device: torch.device | None = None) -> BaseModelPredictor:
    cls = VllmPredictor if settings.backend == "vllm" else BaseModelPredictor
    return cls(recipe, cache_dir, tokenizer, settings, device)


# --- the work split across processes ------------------------------------------------------------------------------

def assign(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Tasks to processes, largest first, each to the least-loaded process (ties: the lowest rank): the same
    answer in every process, with no communication."""
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def run_tasks(sizes: dict[str, int], prompts_of: Callable[[str], list[dict]], folder: Path,
              predictor_factory: Callable[[], Any], rank: int = 0, world: int = 1) -> list[str]:
    """This process's share of the tasks in `sizes` (name -> instances) that have no file yet, one atomic file
    per finished task. Every process computes the same assignment from the same files, with no communication."""
    from birbal.fsutil import atomic_write_text

    pending = {n: k for n, k in sizes.items() if not (folder / f"{n}.jsonl").is_file()}
    share = assign(pending, world)[rank] if pending else []
    if not share:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    for name in share:  # a killed worker's half-written file (atomic_write's temporary): never read, dropped here
        for stale in folder.glob(f"{glob.escape('.' + name)}.jsonl.*.tmp"):
            stale.unlink(missing_ok=True)
    predictor = predictor_factory()
    with tqdm(total=sum(pending[n] for n in share), desc=f"NI predictions [{rank + 1}/{world}]", unit="inst",
              position=rank, mininterval=5.0, dynamic_ncols=True) as bar:  # instances/s and the time left
        if hasattr(predictor, "on_batch"):
            predictor.on_batch = bar.update
        for name in share:
            rows = prompts_of(name)
            outputs = predictor([r["few_shot_prompt"] for r in rows])
            if len(outputs) != len(rows):
                raise DataError(f"predictor returned {len(outputs)} outputs for {len(rows)} prompts (task {name})")
            for row, output in zip(rows, outputs, strict=True):
                row["prediction"] = output
            atomic_write_text(folder / f"{name}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
            if not hasattr(predictor, "on_batch"):
                bar.update(len(rows))
    return share


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_processes(settings: NIPredictions) -> int:
    return settings.processes or max(1, visible_gpus())


def launch_command(processes: int, job: Path) -> list[str]:
    """accelerate's launcher on GPUs (one process per GPU); on CPU torch.distributed.run (accelerate's own
    multi-CPU launch goes through mpirun). Both hand each process RANK, WORLD_SIZE and LOCAL_RANK."""
    module = ["-m", "birbal.data.ni_worker", str(job)]
    if visible_gpus():
        return [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
                "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", *module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *module]


def launch_workers(recipe: Recipe, source: NaturalInstructionsSource, seed: int, cache_dir: Path, folder: Path,
                   names: list[str], processes: int) -> None:
    """Run `processes` workers over the missing tasks and wait; a failed worker stops the stage (finished tasks
    stay cached for the next run)."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {"recipe": recipe.model_dump(mode="json"), "source": source.name, "seed": seed,
           "cache_dir": str(cache_dir), "folder": str(folder), "tasks": names}
    fd, job_path = tempfile.mkstemp(dir=folder.parent, prefix=".ni-job.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(job, handle)
        done = subprocess.run(launch_command(processes, Path(job_path)), check=False)
    finally:
        os.unlink(job_path)
    missing = [n for n in names if not (folder / f"{n}.jsonl").is_file()]
    if done.returncode != 0 or missing:
        raise DataError(f"source {source.name!r}: NI prediction workers exited with {done.returncode}; "
                        f"{len(missing)} of {len(names)} tasks unfinished (finished ones are kept: re-run to resume)")
