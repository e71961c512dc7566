"""Compare two runs: "did we get their model back?" (`python -m birbal compare --run-dir REPRO --against OTHER`).

Two parts, written to `REPRO/compare/` (compare.json, compare.md, deltas.png, stage.json) and summarised in the
report; the other run directory is only read (it may be read-only):

1. Scores side by side, per HELM (or quick-suite) figure: the published figure, the other run's (e.g. the
   submission re-run here with the `birbal-submission` profile) and this run's, with a bootstrap interval on the
   difference from the two runs' per-instance scores (HELM's `per_instance_stats.json`, the quick suite's
   `predictions.jsonl`), so "within noise" is a number.
2. Model to model, needing no HELM and no server: both runs' models teacher-forced on the same probe tokens
   (the eval split's first rows, and HELM-shaped prompts built by the quick suite and wrapped by the serving
   policy as the server wraps them): each model's eval loss, the greedy (arg-max) agreement rate, and the
   mean and worst per-token KL(other || this) between their next-token distributions.

Which model a run has is read from its records, never guessed: what its serve stage loaded (serve/stage.json:
the merged folder, or a base at a revision plus an adapter), else its export's merged folder, else its trained
adapter on the recipe's base. Local files are loaded only when their bytes match the record that made them.

The models are loaded one at a time (a 7B pair then fits a 24 GB card): the other run's model first, whose full
next-token log-probabilities on the probe set are kept on the CPU in float32 (the KL is exact, not top-k), then
this run's, compared position by position as it goes. Thresholds and their reasoning: docs/COMPARE.md.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birbal.errors import EvaluateError, ServeError
from birbal.fsutil import atomic_directory, atomic_write_json, digest_of, hash_tree, sha256_file

FOLDER = "compare"
RESULT = "compare.json"
MARKDOWN = "compare.md"
PLOT = "deltas.png"
RECORD = "stage.json"
BOOTSTRAP_SEED = 20231215  # fixed: the same two runs always give the same intervals
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
HUB_SPEC = re.compile(r"^(?P<repo>[^@\s]+)@(?P<revision>[0-9a-f]{40})$")
STAGE_FOLDERS = {"prepare-data": "data", "train": "train", "export": "export", "serve": "serve",
                 "evaluate": "evaluate"}


def log(message: str) -> None:
    print(f"[birbal] compare: {message}", file=sys.stderr, flush=True)


# ---- verdict thresholds (docs/COMPARE.md says why these values) ------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    # The levels are judged on the KL and the eval loss; the greedy agreement is reported beside them but gates
    # only "identical": where next-token distributions are flat, near-ties flip the arg-max under mere rounding.
    identical_max_kl: float = 1e-6  # nats, worst position: one set of weights, float noise of how it is computed
    rounding_mean_kl: float = 1e-3  # nats/token: the same weights up to bf16 rounding (merged vs unmerged)
    close_mean_kl: float = 0.05  # nats/token: a model trained the same way, not the same weights
    close_eval_loss: float = 0.05  # nats: |eval loss difference| (a 5% perplexity ratio)


THRESHOLDS = Thresholds()


# ---- reading a run directory (never writing to it) ---------------------------------------------------------


class RunView:
    """A run directory read as it is: its stage records and files; nothing is created or written."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path).expanduser().resolve()
        self.what = what
        if not self.path.is_dir():
            raise EvaluateError(f"{what} {self.path} is not a directory")
        if not (self.path / "manifest.json").is_file():
            raise EvaluateError(f"{what} {self.path} is not a run directory (no manifest.json)")

    @property
    def run_id(self) -> str:
        return self.path.name

    def folder(self, stage: str) -> Path:
        return self.path / STAGE_FOLDERS[stage]

    def record(self, stage: str) -> dict[str, Any] | None:
        path = self.folder(stage) / "stage.json"
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def complete(self, stage: str) -> dict[str, Any] | None:
        record = self.record(stage)
        return record if record is not None and record.get("status") == "complete" else None

    def recipe(self):
        from birbal.config import load_recipe

        path = self.path / "recipe.yaml"
        if not path.is_file():
            raise EvaluateError(f"{self.what} {self.path} has no recipe.yaml: cannot tell its base model or tokenizer")
        return load_recipe(path)

    def identity(self) -> dict[str, Any]:
        """What names this run in the comparison's record: its manifest's sha256 and each stage's outputs digest."""
        manifest = self.path / "manifest.json"
        stages = {stage: (r.get("status"), r.get("outputs_digest"))
                  for stage in STAGE_FOLDERS if (r := self.record(stage)) is not None}
        return {"path": str(self.path), "run_id": self.run_id, "manifest_sha256": sha256_file(manifest),
                "stages": {s: {"status": st, "outputs_digest": d} for s, (st, d) in stages.items()}}

    def local(self, text: str | None) -> Path | None:
        """A path a record names, found in this run directory: the same path below it when the record's path
        runs through one of its stage folders (recorded inside a container, or before the run directory was
        moved or copied: this run's own files, whose bytes its records check), else the path as written."""
        if not text or HUB_SPEC.match(text):
            return None
        path = Path(text)
        parts = path.parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in (*STAGE_FOLDERS.values(), "cache") and i > 0:
                candidate = self.path.joinpath(*parts[i:])
                if candidate.exists():
                    return candidate
        return path if path.exists() else None

    def stage_of(self, path: Path) -> str | None:
        """The stage whose folder holds `path`, if it is inside this run directory's stage folders."""
        for stage in STAGE_FOLDERS:
            if path.resolve().is_relative_to(self.folder(stage).resolve()):
                return stage
        return None

    def check_bytes(self, stage: str, folder: Path) -> None:
        """Every file of `folder` (below the stage's folder) has the sha256 the stage's record gives it."""
        record = self.complete(stage)
        if record is None:
            raise EvaluateError(f"{self.what} {self.path}: {folder} is not covered by a complete {stage} record")
        root = self.folder(stage)
        try:
            prefix = folder.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise EvaluateError(f"{folder} is not below {root}") from None
        expected = {rel: h for rel, h in (record.get("outputs") or {}).items()
                    if prefix in ("", ".") or rel.startswith(prefix + "/")}
        if not expected:
            raise EvaluateError(f"{self.what} {self.path}: the {stage} record lists no files under {prefix}/")
        for rel, digest in sorted(expected.items()):
            path = root / rel
            if not path.is_file():
                raise EvaluateError(f"{self.what}: {path} is missing (its {stage} record lists it)")
            if sha256_file(path) != digest:
                raise EvaluateError(f"{self.what}: {path} differs from its {stage} record (sha256): it changed "
                                    "after the stage ran, so it is not the model the run made")


# ---- which model a run names ----------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """A run's model as its records name it."""

    kind: str  # merged | adapter
    origin: str  # the record that named it
    merged: str | None = None  # local folder
    base: str | None = None  # local folder or hub id
    base_revision: str | None = None
    adapter: str | None = None  # local folder or hub id
    adapter_revision: str | None = None
    adapter_files: dict[str, str] | None = None  # sha256 by file name, as the serve record gives them
    dtype: str = "float32"
    adapter_dtype: str | None = None  # the serve recipe's serve.adapter_dtype, where it has one
    served_quantized: bool = False

    def describe(self) -> str:
        if self.kind == "merged":
            return f"merged {self.merged}"
        base = f"{self.base}@{self.base_revision}" if self.base_revision else str(self.base)
        adapter = f"{self.adapter}@{self.adapter_revision}" if self.adapter_revision else str(self.adapter)
        return f"{base} + adapter {adapter}"


def _split_hub(text: str) -> tuple[str, str | None]:
    match = HUB_SPEC.match(text)
    return (match["repo"], match["revision"]) if match else (text, None)


def _checked_local(run: RunView, path: Path) -> Path:
    """A local model folder named by a record: when it is this run's own output, its bytes must match."""
    stage = run.stage_of(path)
    if stage is not None:
        run.check_bytes(stage, path)
    return path


def _from_serve(run: RunView, record: dict[str, Any], dtype: str, adapter_dtype: str | None) -> ModelSource | None:
    """What serve/stage.json says the server loaded: `model` (a merged folder, or the base) and `adapter`."""
    inputs = record.get("inputs") or {}
    model = inputs.get("model")
    if not model:
        return None
    adapter = inputs.get("adapter")
    origin = "serve/stage.json"
    if adapter is None:
        folder = run.local(model)
        if folder is None or not (folder / "config.json").is_file():
            raise EvaluateError(f"{run.what} {run.path}: serve/stage.json says it served {model}, which is not here")
        return ModelSource("merged", origin, merged=str(_checked_local(run, folder)), dtype=dtype)
    base_local = run.local(model)
    base, base_revision = (str(base_local), None) if base_local else _split_hub(model)
    if base_local is None and base_revision is None:
        raise EvaluateError(f"{run.what} {run.path}: serve/stage.json names base {model!r}, neither here nor a "
                            "hub id at a 40-hex revision")
    adapter_local = run.local(adapter)
    if adapter_local is not None:
        adapter_name, adapter_revision = str(_checked_local(run, adapter_local)), None
    else:
        adapter_name, adapter_revision = _split_hub(adapter)
        if adapter_revision is None:
            raise EvaluateError(f"{run.what} {run.path}: serve/stage.json names adapter {adapter!r}, neither here "
                                "nor a hub id at a 40-hex revision")
    return ModelSource("adapter", origin, base=base, base_revision=base_revision, adapter=adapter_name,
                       adapter_revision=adapter_revision, adapter_files=inputs.get("adapter_files"), dtype=dtype,
                       adapter_dtype=adapter_dtype, served_quantized=record.get("inputs", {}).get("quantize") == "4bit")


def model_source(run: RunView, cache_dir: Path, dtype: str | None = None) -> ModelSource:
    """The model `run` names through its records (serve, then export, then train); EvaluateError when none."""
    from birbal.models import base_model_location

    recipe = run.recipe()
    dtype = dtype or recipe.serve.dtype
    adapter_dtype = getattr(recipe.serve, "adapter_dtype", None)
    serve = run.complete("serve")
    if serve is not None:
        found = _from_serve(run, serve, dtype, adapter_dtype)
        if found is not None:
            found.served_quantized = recipe.serve.quantize == "4bit"
            return found
    if run.complete("export") is not None and (run.folder("export") / "merged" / "config.json").is_file():
        folder = run.folder("export") / "merged"
        run.check_bytes("export", folder)
        return ModelSource("merged", "export/stage.json", merged=str(folder), dtype=dtype)
    adapter = run.folder("train") / "adapter"
    if run.complete("train") is not None and adapter.is_dir():
        run.check_bytes("train", adapter)
        base, revision = base_model_location(recipe.model, cache_dir)
        return ModelSource("adapter", "train/stage.json", base=base, base_revision=revision, adapter=str(adapter),
                           dtype=dtype, adapter_dtype=adapter_dtype)
    raise EvaluateError(f"{run.what} {run.path} names no model: no complete serve record naming one, no exported "
                        "export/merged/, no trained train/adapter/")


def _hub_adapter(source: ModelSource) -> Path:
    """A hub adapter at its pinned revision (HF_TOKEN from the environment), its files checked against the
    sha256s the serve record gives, fetched as the serve stage fetches it (into HF_HOME's hub cache, shared with
    the serve stage)."""
    from birbal.serve import loading

    repo, revision = source.adapter or "", source.adapter_revision or ""
    try:  # the serve stage's own fetch: the hub cache first, then the hub with HF_TOKEN; one line on failure
        folder = Path(loading.fetch_published_adapter(repo, revision))  # HF_HOME's cache, as the serve stage
    except ServeError as err:
        raise EvaluateError(str(err)) from None
    for name, digest in sorted((source.adapter_files or {}).items()):
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise EvaluateError(f"adapter {repo}@{revision}: {name} differs from the serve record's sha256")
    return folder


def load_model(source: ModelSource, run: RunView, cache_dir: Path, device):
    """(model, tokenizer) through the project's loaders (birbal.serve.loading), in `source.dtype` on `device`."""
    import inspect

    from birbal.serve.loading import load_base_with_adapter, load_merged, load_tokenizer_folder

    if source.kind == "merged":
        folder = Path(source.merged or "")
        return load_merged(folder, source.dtype, device), load_tokenizer_folder(folder)
    from birbal.models import load_tokenizer

    adapter = Path(source.adapter or "") if source.adapter_revision is None else _hub_adapter(source)
    options = inspect.signature(load_base_with_adapter).parameters
    kwargs: dict[str, Any] = {}
    if "adapter_dtype" in options and source.adapter_dtype is not None:
        kwargs["adapter_dtype"] = source.adapter_dtype  # as the serve stage loaded it
    if "allow_pickle_adapter" in options and source.adapter_revision is not None:
        kwargs["allow_pickle_adapter"] = True  # a published adapter, as the serve stage accepts it
    model = load_base_with_adapter(source.base or "", adapter, source.dtype, device, revision=source.base_revision,
                                   **kwargs)
    return model, load_tokenizer(run.recipe().model.tokenizer, cache_dir)


# ---- the probe set ---------------------------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    eval_rows: int = 16
    helm_per_scenario: int = 4
    max_tokens: int = 512  # per probe; longer ones are cut (eval rows keep their start, prompts their end)


@dataclass
class Probe:
    name: str
    kind: str  # eval | helm
    text: str
    question: str = ""  # eval rows: the row's two fields, tokenised as training tokenises them
    answer: str = ""
    loss_from: int | None = None  # eval rows: first target position of the answer (the training loss's tokens)
    ids: list[int] = field(default_factory=list)


def eval_split(repro: RunView, against: RunView) -> tuple[RunView, Path] | None:
    """The eval split the comparison probes: this run's data/eval.jsonl, else the other run's (bytes checked)."""
    for run in (repro, against):
        path = run.folder("prepare-data") / "eval.jsonl"
        if run.complete("prepare-data") is not None and path.is_file():
            record = run.complete("prepare-data") or {}
            if (record.get("outputs") or {}).get("eval.jsonl") != sha256_file(path):
                raise EvaluateError(f"{path} differs from its prepare-data record (sha256)")
            return run, path
    return None


def build_probes(split: Path | None, policy: str, cfg: ProbeConfig) -> list[Probe]:
    """The eval split's first rows (question + answer, as training saw them) and the quick suite's HELM-shaped
    prompts (first `helm_per_scenario` of each scenario) as the serving policy hands them to the model."""
    from birbal.evaluate.quick import SCENARIOS
    from birbal.serve.postprocess import get_policy

    probes: list[Probe] = []
    if split is not None and cfg.eval_rows > 0:
        for i, line in enumerate(split.read_text().splitlines()[:cfg.eval_rows]):
            row = json.loads(line)
            probes.append(Probe(f"eval:{i}", "eval", row["question"] + row["answer"], row["question"], row["answer"]))
    wrap = get_policy(policy)
    for name, build in SCENARIOS.items():
        for i, item in enumerate(build(None).items[:cfg.helm_per_scenario]):
            prompt = item["prompt"] if item["echo_prompt"] else wrap.prompt(item["prompt"])
            probes.append(Probe(f"helm:{name}:{i}", "helm", prompt))
    return probes


def tokenize_probes(probes: list[Probe], tokenizer, max_tokens: int) -> list[Probe]:
    """Token ids of each probe: eval rows as `tokenize_example` makes them (BOS, prompt, answer, EOS; the loss
    over the answer), prompts as the engine encodes them (BOS, no EOS)."""
    from birbal.train.packing import IGNORE_INDEX, tokenize_example

    out = []
    for probe in probes:
        if probe.kind == "eval":
            example = tokenize_example(tokenizer, probe.question, probe.answer)
            ids = [int(x) for x in example.input_ids[:max_tokens]]
            labelled = [i for i, label in enumerate(example.labels[:max_tokens]) if label != IGNORE_INDEX]
            loss_from = labelled[0] if labelled else None
        else:
            ids = list(tokenizer(probe.text, add_special_tokens=True)["input_ids"])
            if len(ids) > max_tokens:
                ids = ids[:1] + ids[-(max_tokens - 1):]  # BOS, then the end (HELM truncates from the left too)
            loss_from = None
        copy = Probe(probe.name, probe.kind, probe.text, probe.question, probe.answer, loss_from, ids)
        if len(ids) >= 2:
            out.append(copy)
    return out


# ---- scoring ------------------------------------------------------------------------------------------------


def _positions(probe: Probe) -> int:
    """Next-token predictions compared: every position of a prompt (the last is the first generated token's),
    every position but the last of an eval row (whose last token is EOS)."""
    return len(probe.ids) - 1 if probe.kind == "eval" else len(probe.ids)


def _log_probs(model, ids: list[int], device) -> Any:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, unit="probe", mininterval=2.0, leave=False)


def score_reference(model, probes: list[Probe], device) -> list[Any]:
    """The reference model's full next-token log-probabilities per probe, on the CPU (float32)."""
    kept = []
    for probe in _progress(probes, "compare: reference model"):
        kept.append(_log_probs(model, probe.ids, device)[:_positions(probe)].cpu())
    return kept


def _nll(log_probs, probe: Probe) -> tuple[float, int]:
    """Summed negative log-likelihood of the eval row's answer tokens (the training eval loss's terms)."""
    import torch

    if probe.loss_from is None:
        return 0.0, 0
    targets = torch.tensor(probe.ids[probe.loss_from:], device=log_probs.device)
    rows = log_probs[probe.loss_from - 1: len(probe.ids) - 1]
    return float(-rows.gather(1, targets[:, None]).sum()), int(targets.numel())


def score_against_reference(model, probes: list[Probe], reference: list[Any], device,
                            tokenizer) -> dict[str, Any]:
    """Teacher-force this model on the same tokens and compare it with the kept reference position by position."""

    per_probe = []
    worst = {"kl": -1.0}
    totals = {"kl": 0.0, "positions": 0, "agree": 0, "nll_this": 0.0, "nll_ref": 0.0, "loss_tokens": 0}
    kinds: dict[str, dict[str, float]] = {}
    first_token = {"agree": 0, "prompts": 0}
    for probe, ref_cpu in zip(_progress(probes, "compare: this run's model"), reference, strict=True):
        this = _log_probs(model, probe.ids, device)[:_positions(probe)]
        ref = ref_cpu.to(this.device)
        # KL(reference || this) per position, exactly over the whole vocabulary; clamped at 0 (a sum of float
        # terms can come out at -1e-9 where the two distributions are equal)
        kl = (ref.exp() * (ref - this)).sum(-1).clamp_min(0.0)
        agree = ref.argmax(-1) == this.argmax(-1)
        nll_this, n = _nll(this, probe)
        nll_ref, _ = _nll(ref, probe)
        k = int(kl.argmax())
        if float(kl[k]) > worst["kl"]:
            worst = {"kl": float(kl[k]), "probe": probe.name, "position": k,
                     "context_token": tokenizer.convert_ids_to_tokens(probe.ids[k]),
                     "reference_top": tokenizer.convert_ids_to_tokens(int(ref[k].argmax())),
                     "this_top": tokenizer.convert_ids_to_tokens(int(this[k].argmax()))}
        totals["kl"] += float(kl.sum())
        totals["positions"] += int(kl.numel())
        totals["agree"] += int(agree.sum())
        totals["nll_this"] += nll_this
        totals["nll_ref"] += nll_ref
        totals["loss_tokens"] += n
        kind = kinds.setdefault(probe.kind, {"kl": 0.0, "positions": 0, "agree": 0, "probes": 0})
        kind["kl"] += float(kl.sum())
        kind["positions"] += int(kl.numel())
        kind["agree"] += int(agree.sum())
        kind["probes"] += 1
        if probe.kind == "helm":
            first_token["prompts"] += 1
            first_token["agree"] += int(agree[-1])
        per_probe.append({"probe": probe.name, "tokens": len(probe.ids), "positions": int(kl.numel()),
                          "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                          "agreement": float(agree.float().mean()),
                          "loss_this": nll_this / n if n else None, "loss_reference": nll_ref / n if n else None})
        del this, ref
    positions = max(totals["positions"], 1)
    loss_tokens = totals["loss_tokens"]
    return {
        "positions": totals["positions"], "mean_kl": totals["kl"] / positions, "worst": worst,
        "agreement": totals["agree"] / positions,
        "first_token_agreement": (first_token["agree"] / first_token["prompts"]) if first_token["prompts"] else None,
        "helm_prompts": first_token["prompts"],
        "eval_loss": {"this": totals["nll_this"] / loss_tokens if loss_tokens else None,
                      "reference": totals["nll_ref"] / loss_tokens if loss_tokens else None,
                      "tokens": loss_tokens},
        "by_kind": {name: {"probes": v["probes"], "positions": v["positions"],
                           "mean_kl": v["kl"] / max(v["positions"], 1), "agreement": v["agree"] / max(v["positions"], 1)}
                    for name, v in kinds.items()},
        "per_probe": per_probe,
    }


def _check_memory(needed: int) -> None:
    """The kept log-probabilities must fit in half the memory available now (Linux), or the run stops here."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return  # not Linux: no figure to check against
    if needed > available // 2:
        raise EvaluateError(f"the probe set needs {needed / 2**30:.1f} GiB of CPU memory for the reference's "
                            f"log-probabilities, more than half of the {available / 2**30:.1f} GiB available: "
                            "lower --rows, --helm-prompts or --max-tokens")


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_check(repro: RunView, against: RunView, cache_dir: Path, device_name: str, cfg: ProbeConfig,
                dtype: str | None = None, against_dtype: str | None = None) -> dict[str, Any]:
    """The model-to-model part: load the other run's model, keep its log-probs, free it, load this run's."""
    from birbal.models import resolve_device

    device = resolve_device(device_name, key="--device", error=EvaluateError)
    ref_source = model_source(against, cache_dir, against_dtype or dtype)
    this_source = model_source(repro, cache_dir, dtype)
    found = eval_split(repro, against)
    split_run, split = found if found else (None, None)
    policy = repro.recipe().serve.postprocess
    probes = build_probes(split, policy, cfg)

    log(f"reference (--against): {ref_source.describe()} [{ref_source.dtype}, named by {ref_source.origin}]")
    t0 = time.perf_counter()
    model, tokenizer = load_model(ref_source, against, cache_dir, device)
    ref_probes = tokenize_probes(probes, tokenizer, cfg.max_tokens)
    _check_memory(sum(_positions(p) for p in ref_probes) * len(tokenizer) * 4)
    reference = score_reference(model, ref_probes, device)
    _free(model)
    log(f"reference scored on {len(ref_probes)} probes, {sum(len(r) for r in reference)} positions "
        f"({time.perf_counter() - t0:.1f} s); loading this run's model: {this_source.describe()} "
        f"[{this_source.dtype}, named by {this_source.origin}]")
    model, tokenizer = load_model(this_source, repro, cache_dir, device)
    this_probes = tokenize_probes(probes, tokenizer, cfg.max_tokens)
    if [p.ids for p in this_probes] != [p.ids for p in ref_probes]:
        raise EvaluateError("the two runs' tokenizers give different tokens for the probe set: a per-token KL "
                            "between them is not defined")
    result = score_against_reference(model, this_probes, reference, device, tokenizer)
    _free(model)
    result.update({
        "reference": {"run": against.run_id, **asdict(ref_source)},
        "this": {"run": repro.run_id, **asdict(this_source)},
        "probes": {**asdict(cfg), "count": len(this_probes), "eval": sum(p.kind == "eval" for p in this_probes),
                   "helm": sum(p.kind == "helm" for p in this_probes), "policy": policy,
                   "eval_split": str(split) if split else None,
                   "eval_split_sha256": sha256_file(split) if split else None,
                   "eval_split_run": split_run.run_id if split_run else None,
                   "helm_source": "birbal.evaluate.quick scenarios (prompt shapes of HELM's adapters)"},
        "device": str(device), "seconds": round(time.perf_counter() - t0, 1),
    })
    result["verdict"] = model_verdict(result)
    return result


def model_verdict(check: dict[str, Any], t: Thresholds = THRESHOLDS) -> dict[str, str]:
    """One line, the level it reached and the thresholds it was judged by."""
    kl, worst, agree = check["mean_kl"], check["worst"]["kl"], check["agreement"]
    losses = check["eval_loss"]
    dloss = (abs(losses["this"] - losses["reference"])
             if losses["this"] is not None and losses["reference"] is not None else None)
    facts = (f"mean KL {kl:.3g} nats/token (worst {worst:.3g}), greedy agreement {agree:.1%} over "
             f"{check['positions']} positions" + (f", eval loss difference {dloss:.3g} nats" if dloss is not None else ""))
    if worst <= t.identical_max_kl and agree == 1.0:
        level, rule = "identical", f"worst KL <= {t.identical_max_kl:g} and 100% agreement"
    elif kl <= t.rounding_mean_kl:
        level, rule = "same weights up to rounding", f"mean KL <= {t.rounding_mean_kl:g}"
    elif kl <= t.close_mean_kl and (dloss is None or dloss <= t.close_eval_loss):
        level, rule = "close", f"mean KL <= {t.close_mean_kl:g}, |eval loss difference| <= {t.close_eval_loss:g}"
    else:
        level, rule = "different", (f"fails 'close': mean KL <= {t.close_mean_kl:g}, |eval loss difference| <= "
                                    f"{t.close_eval_loss:g}")
    return {"level": level, "line": f"{level}: {facts} ({rule})", "rule": rule}


# ---- scores side by side --------------------------------------------------------------------------------------


def _summary(run: RunView) -> dict[str, Any] | None:
    if run.complete("evaluate") is None:
        return None
    try:
        return json.loads((run.folder("evaluate") / "summary.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def quick_instances(run: RunView) -> dict[str, dict[tuple, float]]:
    """{row label: {(instance id,): score}} from the quick suite's predictions.jsonl."""
    from birbal.evaluate.quick import ROW_LABELS

    path = run.folder("evaluate") / "quick" / "predictions.jsonl"
    out: dict[str, dict[tuple, float]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            label = ROW_LABELS.get(row.get("scenario"))
            if label is not None and row.get("value") is not None:
                out.setdefault(label, {})[(row["id"],)] = float(row["value"])
    return out


def _stat_value(stat: dict[str, Any]) -> float | None:
    count = stat.get("count") or 0
    return stat["sum"] / count if count else None


def _per_instance_row(row, metric: str, entries: list[dict[str, Any]], run_name: str) -> dict[tuple, float]:
    """One run's per-instance scores for a table row, keyed (run, trial, instance). For "(Robustness)" and
    "(Fairness)" each instance's worst over its original and its perturbations of that kind, as HELM's
    `compute_worst_case_metrics` takes it (crfm-helm 0.5.16, helm/benchmark/metrics/metric.py)."""
    from birbal.evaluate.helm_output import SPLITS

    for split in SPLITS:
        groups: dict[tuple, list[float]] = {}
        for entry in entries:
            perturbation = entry.get("perturbation")
            if row.perturbation is None and perturbation is not None:
                continue
            if row.perturbation is not None and perturbation is not None and not perturbation.get(row.perturbation):
                continue
            for stat in entry.get("stats", []):
                name = stat.get("name") or {}
                if name.get("name") != metric or name.get("split") != split or name.get("sub_split") is not None:
                    continue
                value = _stat_value(stat)
                if value is not None:
                    key = (run_name, entry.get("train_trial_index", 0), str(entry.get("instance_id")))
                    groups.setdefault(key, []).append(value)
        if groups:
            return {key: min(values) for key, values in groups.items()}
    return {}


def helm_instances(run: RunView, summary: dict[str, Any]) -> dict[str, dict[tuple, float]]:
    """{row label: {(run, trial, instance): score}} from every per_instance_stats.json under evaluate/helm/."""
    from birbal.evaluate.helm_output import TABLE_ROWS

    metric_of = {r["label"]: r.get("metric") for r in summary.get("rows", [])}
    out: dict[str, dict[tuple, float]] = {}
    for path in sorted((run.folder("evaluate") / "helm").rglob("per_instance_stats.json")):
        spec = path.parent / "run_spec.json"
        try:
            name = json.loads(spec.read_text()).get("name", path.parent.name) if spec.is_file() else path.parent.name
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EvaluateError(f"{path} cannot be read: {err}") from None
        for row in TABLE_ROWS:
            metric = metric_of.get(row.label)
            if metric and name.split(":", 1)[0] == row.scenario:
                out.setdefault(row.label, {}).update(_per_instance_row(row, metric, entries, name))
    return out


def instances(run: RunView, summary: dict[str, Any] | None) -> dict[str, dict[tuple, float]]:
    if summary is None:
        return {}
    return helm_instances(run, summary) if summary.get("source") == "helm" else quick_instances(run)


def _percentile_interval(stats: np.ndarray) -> tuple[float, float]:
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    # Hand-written rather than scipy.stats.bootstrap: scipy is not a dependency of the kit, and a percentile
    # bootstrap of a mean is these few lines of numpy (chunked, so B x n indices never sit in memory at once).
    out = np.empty(resamples)
    chunk = max(1, min(resamples, 20_000_000 // max(len(values), 1)))
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        out[start:start + n] = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return out


def bootstrap_delta(this: dict[tuple, float], other: dict[tuple, float], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Any] | None:
    """95% percentile bootstrap interval of mean(this) - mean(other).

    Paired (the differences of the same instances resampled) when both runs scored the same instances, which
    removes the instances' own difficulty from the noise; otherwise each run's instances resampled on their own.
    """
    if not this or not other:
        return None
    rng = np.random.default_rng(seed)
    if set(this) == set(other):
        keys = sorted(this)
        diff = np.array([this[k] - other[k] for k in keys])
        deltas, paired = _resampled_means(diff, resamples, rng), True
        delta, n_this, n_other = float(diff.mean()), len(keys), len(keys)
    else:
        a, b = np.array(list(this.values())), np.array(list(other.values()))
        deltas = _resampled_means(a, resamples, rng) - _resampled_means(b, resamples, rng)
        paired, delta, n_this, n_other = False, float(a.mean() - b.mean()), len(a), len(b)
    low, high = _percentile_interval(deltas)
    return {"delta": delta, "low": low, "high": high, "paired": paired, "instances_this": n_this,
            "instances_other": n_other, "within_noise": low <= 0.0 <= high}


def bootstrap_mean(values: dict[tuple, float], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> dict[str, float] | None:
    if not values:
        return None
    array = np.array(list(values.values()))
    low, high = _percentile_interval(_resampled_means(array, resamples, np.random.default_rng(seed)))
    return {"mean": float(array.mean()), "low": low, "high": high, "instances": len(array)}


def score_table(repro: RunView, against: RunView, resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Per figure: published, the other run's, this run's; the difference with its bootstrap interval, and
    whether the published figure lies within each run's own interval."""
    ours, theirs = _summary(repro), _summary(against)
    our_inst, their_inst = instances(repro, ours), instances(against, theirs)
    our_rows = {r["label"]: r for r in (ours or {}).get("rows", [])}
    their_rows = {r["label"]: r for r in (theirs or {}).get("rows", [])}
    labels = list(our_rows) + [label for label in their_rows if label not in our_rows]
    rows = []
    for label in labels:
        mine, other = our_rows.get(label, {}), their_rows.get(label, {})
        published = mine.get("winners") if mine.get("winners_label") else other.get("winners")
        published_label = mine.get("winners_label") or other.get("winners_label")
        this_v, other_v = mine.get("value"), other.get("value")
        interval = bootstrap_delta(our_inst.get(label, {}), their_inst.get(label, {}), resamples, seed)
        this_ci = bootstrap_mean(our_inst.get(label, {}), resamples, seed)
        other_ci = bootstrap_mean(their_inst.get(label, {}), resamples, seed)
        rows.append({
            "label": label, "metric": mine.get("metric") or other.get("metric"),
            "published": published, "published_label": published_label,
            "other": other_v, "this": this_v,
            "delta": this_v - other_v if this_v is not None and other_v is not None else None,
            "interval": interval, "this_interval": this_ci, "other_interval": other_ci,
            "published_within_this": (this_ci["low"] <= published <= this_ci["high"])
            if this_ci and published is not None else None,
            "published_within_other": (other_ci["low"] <= published <= other_ci["high"])
            if other_ci and published is not None else None,
        })
    scored = [r for r in rows if r["interval"]]
    return {"this_suite": (ours or {}).get("suite"), "other_suite": (theirs or {}).get("suite"),
            "this_evaluated": ours is not None, "other_evaluated": theirs is not None,
            "this_score": (ours or {}).get("score"), "other_score": (theirs or {}).get("score"),
            "rows": rows, "bootstrap": {"seed": seed, "resamples": resamples, "confidence": CONFIDENCE,
                                        "method": "percentile; paired when both runs scored the same instances"},
            "within_noise": sum(r["interval"]["within_noise"] for r in scored), "with_interval": len(scored)}


# ---- writing ------------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def _interval(ci: dict[str, Any] | None) -> str:
    if not ci:
        return "—"
    return f"[{ci['low']:+.3f}, {ci['high']:+.3f}]{'' if ci['within_noise'] else ' *'}"


def markdown(result: dict[str, Any], heading: str = "#") -> list[str]:
    """The comparison as markdown lines (compare.md, and the report's section with `heading` one level down)."""
    this, other = result["this"], result["against"]
    out = [f"{heading} Comparison: {this['run_id']} against {other['run_id']}\n",
           f"**Verdict:** {result['verdict']}\n",
           f"This run `{this['path']}` (manifest sha256 `{this['manifest_sha256'][:16]}…`), the other run "
           f"`{other['path']}` (manifest sha256 `{other['manifest_sha256'][:16]}…`).\n"]
    scores = result["scores"]
    out.append(f"{heading}# Scores, per figure\n")
    if not scores["rows"]:
        out.append("Neither run has a complete evaluation: no scores to set side by side.\n")
    else:
        boot = scores["bootstrap"]
        out.append(f"Δ = this run − {other['run_id']}; its {boot['confidence']:.0%} bootstrap interval "
                   f"({boot['resamples']} resamples, seed {boot['seed']}, {boot['method']}); * marks an interval "
                   "that excludes 0 (a difference beyond noise). Published: the winners' figure in the organisers' "
                   "table.\n")
        out.append(f"| Figure | Published | {other['run_id']} | {this['run_id']} | Δ | 95% interval of Δ | n |\n"
                   "|---|---|---|---|---|---|---|")
        for row in scores["rows"]:
            n = row["interval"]["instances_this"] if row["interval"] else "—"
            published = _f(row["published"])
            if row["published_label"] and row["published_label"] != row["label"]:
                published += f" ({row['published_label']})"
            out.append(f"| {row['label']} | {published} | {_f(row['other'])} | {_f(row['this'])} | "
                       f"{_f(row['delta'])} | {_interval(row['interval'])} | {n} |")
        out.append("")
        if scores["with_interval"]:
            out.append(f"{scores['within_noise']} of {scores['with_interval']} figures with per-instance scores "
                       "differ by less than their noise (the interval holds 0).\n")
        else:
            out.append("No figure has per-instance scores in both runs, so no interval is claimed.\n")
        if result.get("plot"):
            out.append(f"![score differences]({result['plot']})\n")
    check = result.get("model_check")
    out.append(f"{heading}# Model to model on a fixed probe set\n")
    if check is None:
        out.append(f"Not run: {result.get('model_check_skipped') or 'no model check'}.\n")
        return out
    probes, losses = check["probes"], check["eval_loss"]
    out.append(f"{probes['count']} probes ({probes['eval']} rows of the eval split "
               f"`{probes['eval_split'] or 'none'}`, {probes['helm']} HELM-shaped prompts from the quick suite, "
               f"wrapped by the `{probes['policy']}` policy), at most {probes['max_tokens']} tokens each, "
               f"teacher-forced through both models on {check['device']}: {check['positions']} next-token "
               "positions.\n")
    out.append(f"| | {other['run_id']} (reference) | {this['run_id']} |\n|---|---|---|")
    out.append(f"| model | {check['reference']['kind']}: `{_describe(check['reference'])}` | "
               f"{check['this']['kind']}: `{_describe(check['this'])}` |")
    out.append(f"| named by | {check['reference']['origin']} | {check['this']['origin']} |")
    out.append(f"| dtype | {check['reference']['dtype']} | {check['this']['dtype']} |")
    out.append(f"| eval loss ({losses['tokens']} answer tokens) | {_f(losses['reference'], 4)} | "
               f"{_f(losses['this'], 4)} |\n")
    worst = check["worst"]
    out.append("| Measure | Value |\n|---|---|")
    out.append(f"| mean KL(reference ‖ this), nats/token | {_f(check['mean_kl'], 6)} |")
    out.append(f"| worst per-token KL | {_f(worst['kl'], 6)} (probe {worst.get('probe')}, position "
               f"{worst.get('position')}: reference top {worst.get('reference_top')!r}, this "
               f"{worst.get('this_top')!r}) |")
    out.append(f"| greedy (arg-max) agreement | {check['agreement']:.2%} |")
    if check["first_token_agreement"] is not None:
        out.append(f"| first generated token agrees (HELM prompts) | {check['first_token_agreement']:.2%} of "
                   f"{check['helm_prompts']} |")
    for kind, v in check["by_kind"].items():
        out.append(f"| {kind} probes: mean KL / agreement | {_f(v['mean_kl'], 6)} / {v['agreement']:.2%} |")
    out.append("")
    out.append(f"Model check: {check['verdict']['line']}. Thresholds and why: docs/COMPARE.md.\n")
    return out


def _describe(source: dict[str, Any]) -> str:
    return ModelSource(**{k: v for k, v in source.items() if k in ModelSource.__dataclass_fields__}).describe()


def plot_deltas(rows: list[dict[str, Any]], path: Path, other: str) -> bool:
    shown = [r for r in rows if r["interval"]]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5))
    ys = list(range(len(shown)))
    deltas = [r["interval"]["delta"] for r in shown]
    lows = [r["interval"]["delta"] - r["interval"]["low"] for r in shown]
    highs = [r["interval"]["high"] - r["interval"]["delta"] for r in shown]
    colours = ["tab:blue" if r["interval"]["within_noise"] else "tab:red" for r in shown]
    for y, delta, low, high, colour in zip(ys, deltas, lows, highs, colours, strict=True):
        ax.errorbar([delta], [y], xerr=[[low], [high]], fmt="o", color=colour, capsize=3)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(ys, [r["label"] for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"this run − {other} (95% bootstrap interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def overall_verdict(scores: dict[str, Any], check: dict[str, Any] | None) -> str:
    parts = []
    if check is not None:
        parts.append(f"models {check['verdict']['level']} (mean KL {check['mean_kl']:.3g} nats/token, "
                     f"{check['agreement']:.1%} greedy agreement)")
    if scores["with_interval"]:
        parts.append(f"{scores['within_noise']} of {scores['with_interval']} figures within noise")
    elif scores["rows"]:
        parts.append("scores side by side without per-instance data (no intervals)")
    else:
        parts.append("no scores to compare")
    return "; ".join(parts)


def compare_runs(run_dir: str | Path, against: str | Path, *, device: str = "auto", dtype: str | None = None,
                 against_dtype: str | None = None, probes: ProbeConfig | None = None,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, models: bool = True) -> Path:
    """Compare `run_dir` (this run) with `against`; write run_dir/compare/ atomically; return compare.md.

    A failure leaves an earlier complete comparison as it was (the folder is replaced in one rename at the end).
    """
    if resamples < 100:
        raise EvaluateError(f"--resamples must be at least 100, got {resamples}")
    repro = RunView(run_dir, "--run-dir")
    other = RunView(against, "--against")
    if not os.access(repro.path, os.W_OK | os.X_OK):
        raise EvaluateError(f"--run-dir {repro.path} is not writable: the comparison is written below it")
    cfg = probes or ProbeConfig()
    if cfg.max_tokens < 2 or cfg.eval_rows < 0 or cfg.helm_per_scenario < 0:
        raise EvaluateError("--max-tokens must be at least 2, --rows and --helm-prompts at least 0")
    t0 = time.perf_counter()
    inputs = {"this": repro.identity(), "against": other.identity(), "probes": asdict(cfg), "device": device,
              "dtype": dtype, "against_dtype": against_dtype, "resamples": resamples, "seed": seed,
              "thresholds": asdict(THRESHOLDS), "models": models}
    scores = score_table(repro, other, resamples, seed)
    log(f"scores: {len(scores['rows'])} figures side by side, {scores['with_interval']} with bootstrap intervals")
    check = None
    skipped = None
    if models:
        check = model_check(repro, other, repro.path / "cache", device, cfg, dtype, against_dtype)
        log(check["verdict"]["line"])
    else:
        skipped = "--no-models"
    result = {"this": inputs["this"], "against": inputs["against"], "scores": scores, "model_check": check,
              "model_check_skipped": skipped, "thresholds": asdict(THRESHOLDS),
              "verdict": overall_verdict(scores, check)}
    final = repro.path / FOLDER
    with atomic_directory(final) as tmp:
        if plot_deltas(scores["rows"], tmp / PLOT, other.run_id):
            result["plot"] = PLOT
        atomic_write_json(tmp / RESULT, result)
        (tmp / MARKDOWN).write_text("\n".join(markdown(result)) + "\n")
        outputs = hash_tree(tmp)
        atomic_write_json(tmp / RECORD, {
            "stage": "compare", "status": "complete", "inputs": inputs, "inputs_digest": digest_of(inputs),
            "outputs": outputs, "outputs_digest": digest_of(outputs), "duration_s": round(time.perf_counter() - t0, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())})
    log(f"{result['verdict']} -> {final / MARKDOWN}")
    return final / MARKDOWN


def report_section(root: Path) -> list[str]:
    """The report's comparison section: compare/compare.json's tables one heading level down, or nothing when
    this run has not been compared."""
    path = root / FOLDER / RESULT
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    if result.get("plot"):
        result = {**result, "plot": f"{FOLDER}/{result['plot']}"}
    return markdown(result, heading="##")
