"""Checks before a long run: GPU and its memory, driver against the image's CUDA, disk space, hub token.

Every check is a pure function of what it is given (nvidia-smi's text, free bytes, the environment), so tests pass
in real-format samples instead of mocking. `run_preflight` gathers them; each failure is one line a user can act on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from birbal.config import Recipe

# The images' CUDA (docs/PINS.md) and the minimum Linux x86_64 driver per CUDA release, from NVIDIA's CUDA Toolkit
# release notes, table "CUDA Toolkit and Corresponding Driver Versions".
IMAGE_CUDA = "12.8.1"
MIN_DRIVER = {
    "12.4": "550.54.14",    # CUDA 12.4 GA
    "12.4.1": "550.54.15",  # CUDA 12.4 Update 1
    "12.6": "560.28.03",    # CUDA 12.6 GA
    "12.6.3": "560.35.05",  # CUDA 12.6 Update 3
    "12.8": "570.26",       # CUDA 12.8 GA
    "12.8.1": "570.124.06", # CUDA 12.8 Update 1
}
NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
DEFAULT_MIN_GPU_GIB = 22.0
# A card sold as "24 GB" reports 24,564 MiB (23.99 GiB): compare with this much slack so it meets a 24 GiB cap.
NOMINAL_SLACK_GIB = 0.5
# Models whose hub repository needs an accepted licence and a token to download.
GATED_MODELS = frozenset({"mistralai/Mistral-7B-v0.1"})
# Mistral-7B-v0.1's shape (its config.json), for hub recipes, which carry no `architecture`.
MISTRAL_7B_SHAPE = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8}
GIB = 2**30


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str | None
    driver_version: str
    memory_total_gib: float


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `--query-gpu=[name,]driver_version,memory.total --format=csv,noheader[,nounits]`."""
    gpus = []
    for index, row in enumerate(line for line in text.splitlines() if line.strip()):
        cells = [cell.strip() for cell in row.split(",")]
        if len(cells) not in (2, 3):
            raise ValueError(f"nvidia-smi row {row!r}: expected [name,] driver_version, memory.total")
        name = cells[0] if len(cells) == 3 else None
        driver, memory = cells[-2], cells[-1]
        number = memory.removesuffix("MiB").strip()
        if not number.replace(".", "", 1).isdigit():
            raise ValueError(f"nvidia-smi row {row!r}: memory.total {memory!r} is not a number of MiB")
        gpus.append(Gpu(index=index, name=name, driver_version=driver, memory_total_gib=float(number) / 1024))
    return gpus


def query_nvidia_smi(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str | None:
    """nvidia-smi's answer, or None when there is no nvidia-smi or it fails (no driver, no GPU)."""
    if shutil.which(NVIDIA_SMI_QUERY[0]) is None:
        return None
    try:
        result = run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# What a serve-only recipe needs beyond its bf16 weights: the static KV caches, the prefill's activations and the
# CUDA context (about 0.5 GiB each for the 4096-slot cache and the context at the Mistral-7B shape, rounded up).
SERVE_HEADROOM_GIB = 2.0


def serve_only(recipe: Recipe) -> bool:
    """A recipe that trains nothing: it serves a published adapter (birbal-submission)."""
    return recipe.serve.published_adapter is not None


def required_gpu_gib(recipe: Recipe) -> float:
    if serve_only(recipe):  # bf16 base + the adapter in the base dtype, unmerged
        return round((2 * (base_parameters(recipe) + lora_parameters(recipe))) / GIB + SERVE_HEADROOM_GIB, 1)
    return recipe.train.max_gpu_memory_gib or DEFAULT_MIN_GPU_GIB


def check_gpu(nvidia_smi_output: str | None, min_memory_gib: float) -> Check:
    """GPU 0 (the one training uses) exists and has at least `min_memory_gib`."""
    if not nvidia_smi_output or not nvidia_smi_output.strip():
        return Check("gpu", False, "no NVIDIA GPU visible (nvidia-smi missing or failing): install the driver, "
                                   "or run a CPU profile such as smoke")
    try:
        gpus = parse_nvidia_smi(nvidia_smi_output)
    except ValueError as err:
        return Check("gpu", False, str(err))
    gpu = gpus[0]
    label = f"GPU 0 ({gpu.name})" if gpu.name else "GPU 0"
    if gpu.memory_total_gib + NOMINAL_SLACK_GIB < min_memory_gib:
        return Check("gpu", False, f"{label} has {gpu.memory_total_gib:.1f} GiB; the recipe needs {min_memory_gib:g} "
                                   "GiB (train.max_gpu_memory_gib, or the served model's weights)")
    return Check("gpu", True, f"{label}, {gpu.memory_total_gib:.1f} GiB (needs {min_memory_gib:g} GiB)")


def check_driver(nvidia_smi_output: str | None, cuda: str = IMAGE_CUDA) -> Check:
    """The driver is at least the minimum NVIDIA lists for the image's CUDA release."""
    if cuda not in MIN_DRIVER:
        return Check("driver", False, f"no minimum driver known for CUDA {cuda}; known: {', '.join(MIN_DRIVER)}")
    needed = MIN_DRIVER[cuda]
    if not nvidia_smi_output or not nvidia_smi_output.strip():
        return Check("driver", False, f"no NVIDIA driver found; CUDA {cuda} needs driver >= {needed}")
    try:
        driver = parse_nvidia_smi(nvidia_smi_output)[0].driver_version
        too_old = _version(driver) < _version(needed)
    except ValueError as err:
        return Check("driver", False, f"cannot read the driver version: {err}")
    if too_old:
        return Check("driver", False, f"driver {driver} is older than {needed}, the minimum for CUDA {cuda} "
                                      "(the images' CUDA): upgrade the NVIDIA driver")
    return Check("driver", True, f"driver {driver} >= {needed} (CUDA {cuda})")


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a full run needs, split by where they land (the hub cache and the run dir may be different disks)."""

    base_weights: int  # hub cache: the base model download
    checkpoints: int  # run dir: save_total_limit checkpoints of adapter + AdamW state, plus the final adapter
    export: int  # run dir: the merged model in the export dtype
    data: int  # run dir: prepared data, logs, plots (a fixed allowance)

    @property
    def run_dir(self) -> int:
        return self.checkpoints + self.export + self.data


def _shape(recipe: Recipe) -> dict[str, int]:
    arch = recipe.model.architecture
    return MISTRAL_7B_SHAPE if arch is None else {key: getattr(arch, key) for key in MISTRAL_7B_SHAPE}


def lora_parameters(recipe: Recipe) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer (335,544,320 for the 4090 recipe)."""
    shape = _shape(recipe)
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return layers * sum(recipe.lora.r * sum(shapes[name]) for name in recipe.lora.target_modules)


def base_parameters(recipe: Recipe) -> int:
    """Parameters of the base model: projections, norms, untied embeddings and lm_head (7,241,732,096 for Mistral-7B)."""
    shape = _shape(recipe)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return shape["num_hidden_layers"] * per_layer + 2 * shape["vocab_size"] * hidden + hidden


def disk_estimate(recipe: Recipe) -> DiskEstimate:
    params = base_parameters(recipe)
    # The hub checkpoint is bf16 safetensors; a random model is built locally, so nothing is downloaded.
    weights = 2 * params if recipe.model.source == "hub" else 0
    if serve_only(recipe):  # the base and the published adapter (at most fp32) in the hub cache; the run dir holds logs
        return DiskEstimate(base_weights=weights + 4 * lora_parameters(recipe), checkpoints=0, export=0, data=GIB)
    merged = params * (4 if recipe.export.dtype == "float32" else 2)
    # fp32 adapter (4 B) + AdamW first and second moments (8 B) per trainable parameter.
    checkpoint = lora_parameters(recipe) * 12
    return DiskEstimate(base_weights=weights, checkpoints=checkpoint * (recipe.train.save_total_limit + 1),
                        export=merged, data=2 * GIB)


def check_disk(label: str, path: Path, needed_bytes: int, free_bytes: int) -> Check:
    if free_bytes < needed_bytes:
        return Check(f"disk:{label}", False, f"{path} has {free_bytes / GIB:.1f} GiB free; about "
                                             f"{needed_bytes / GIB:.1f} GiB are needed")
    return Check(f"disk:{label}", True, f"{path}: {free_bytes / GIB:.1f} GiB free, about {needed_bytes / GIB:.1f} GiB needed")


def _existing(path: Path) -> Path:
    """The nearest existing ancestor: a run dir is checked before it is created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def model_cached(recipe: Recipe, hub_cache: Path) -> bool:
    """The pinned revision's snapshot folder exists in the hub cache (HF_HOME layout)."""
    model = recipe.model
    if model.source != "hub" or not model.revision:
        return False
    folder = "models--" + model.name_or_path.replace("/", "--")
    return (hub_cache / "hub" / folder / "snapshots" / model.revision).is_dir()


def check_token(recipe: Recipe, env: Mapping[str, str], hub_cache: Path) -> Check:
    model = recipe.model
    if model.source != "hub" or model.name_or_path not in GATED_MODELS:
        return Check("hf-token", True, "not needed (no gated model to download)")
    if env.get("HF_TOKEN", "").strip():
        return Check("hf-token", True, "HF_TOKEN is set")
    if (hub_cache / "token").is_file():
        return Check("hf-token", True, f"token stored in {hub_cache / 'token'}")
    if model_cached(recipe, hub_cache):
        return Check("hf-token", True, f"{model.name_or_path}@{model.revision[:12]} already in the hub cache")
    return Check("hf-token", False, f"{model.name_or_path} is gated: accept its licence on huggingface.co, then "
                                    "export HF_TOKEN=<a read token>")


# train.offload_layers: the bytes an offloaded layer moves to the host per token of a micro-batch, in units of
# hidden_size bf16 values. Measured on the H200 at the Mistral-7B shape (`offload_layer_saved_tensors` in
# benchmarks/results/train_throughput_h200_2026-12-04_ceiling_offload.json): 31 tensors, 3,332 MiB a layer at
# 16,384 tokens (48.81 GiB for 15 layers, all held at the forward's end), 26.0 x 4096 x 2 bytes a token. (Until
# 2026-12-05 this was 12.8, read from what 2 unchecked layers add to the GPU's peak: half of what offload moves,
# since the peak already holds part of those tensors.)
OFFLOAD_HIDDEN_UNITS_PER_TOKEN = 26.0
# torch's caching host allocator rounds a pinned block up to a power of two (448 MiB of MLP activations: 512 MiB):
# those 31 tensors take 3,556 MiB rounded, 1.067x
PINNED_ROUNDING = 1.07
# The training process besides the offload: Python, torch, the tokenised data, the loader's reads (not measured
# per se; the 7B training test's process stayed well under it).
HOST_RAM_BASE_GIB = 8.0


def host_ram_needed_gib(recipe: Recipe) -> float:
    """Host RAM the train stage pins for train.offload_layers (one micro-batch's offloaded activations) plus a base."""
    shape = _shape(recipe)
    train = recipe.train
    tokens = train.sequence_len * train.micro_batch_size
    per_layer = OFFLOAD_HIDDEN_UNITS_PER_TOKEN * shape["hidden_size"] * 2 * tokens
    return round(HOST_RAM_BASE_GIB + train.offload_layers * per_layer * PINNED_ROUNDING / GIB, 1)


def check_host_ram(recipe: Recipe, available_bytes: int | None) -> Check:
    if not recipe.train.offload_layers:
        return Check("host-ram", True, "no activation offload (train.offload_layers is 0)")
    needed = host_ram_needed_gib(recipe)
    if available_bytes is None:
        return Check("host-ram", True, f"about {needed:.0f} GiB needed; /proc/meminfo not readable, not checked")
    have = available_bytes / GIB
    if have < needed:
        return Check("host-ram", False, f"{have:.1f} GiB of host RAM available; train.offload_layers="
                                        f"{recipe.train.offload_layers} pins about {needed:.1f} GiB in all: lower it "
                                        f"(--set train.offload_layers=N) or free memory")
    return Check("host-ram", True, f"{have:.1f} GiB available, about {needed:.1f} GiB needed")


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_preflight(recipe: Recipe, *, nvidia_smi_output: str | None, run_dir: Path, hub_cache: Path,
                  env: Mapping[str, str] | None = None, cuda: str = IMAGE_CUDA,
                  free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
                  host_available: Callable[[], int | None] = mem_available_bytes) -> list[Check]:
    """All checks for one recipe; a CPU recipe skips the GPU and driver checks."""
    env = os.environ if env is None else env
    checks = []
    if recipe.train.device == "cpu":
        checks.append(Check("gpu", True, "not needed (train.device is cpu)"))
    else:
        checks.append(check_gpu(nvidia_smi_output, required_gpu_gib(recipe)))
        checks.append(check_driver(nvidia_smi_output, cuda))
    estimate = disk_estimate(recipe)
    needed_cache = 0 if model_cached(recipe, hub_cache) else estimate.base_weights
    cache_root, run_root = _existing(hub_cache), _existing(run_dir)
    if cache_root.stat().st_dev == run_root.stat().st_dev:  # one disk holds both
        checks.append(check_disk("run+cache", run_root, needed_cache + estimate.run_dir, free_bytes(run_root)))
    else:
        checks.append(check_disk("hub-cache", cache_root, needed_cache, free_bytes(cache_root)))
        checks.append(check_disk("run-dir", run_root, estimate.run_dir, free_bytes(run_root)))
    checks.append(check_token(recipe, env, hub_cache))
    if not serve_only(recipe):
        checks.append(check_host_ram(recipe, host_available()))
    return checks


def failures(checks: list[Check]) -> list[str]:
    return [check.line() for check in checks if not check.ok]
