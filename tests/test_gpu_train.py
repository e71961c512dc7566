"""GPU tests: the smoke recipe on real CUDA 4-bit kernels, resume after kill -9, and the memory cap.

Run on a CUDA machine with `invoke test --gpu` (or `pytest -m gpu tests/test_gpu_train.py`); skipped elsewhere.
The data is the smoke profile's learnable fixture alone, so the GPU machine needs no data-only dependencies.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = ["--set", "train.device=cuda", "--set", "quantization.compute_dtype=bfloat16", "--set", "train.bf16=true",
       "--set", "train.max_gpu_memory_gib=24",
       "--set", "data.rebuild.sources=[{name: fixture-mix, kind: instruction_rows, "
                "origin: {path: fixtures/raw_mix.jsonl}}]",
       "--set", "data.contamination.benchmarks=[]"]


def _prepare(run):
    run_cli("prepare-data", "--profile", "smoke", "--run-dir", str(run), *GPU)


def _train_metrics(run):
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def test_smoke_training_on_cuda_4bit(tmp_path):
    import bitsandbytes as bnb

    from birbal.config import load_recipe
    from birbal.train.model import build_qlora_model

    run = tmp_path / "run"
    _prepare(run)
    run_cli("train", "--profile", "smoke", "--run-dir", str(run), *GPU)
    details = json.loads((run / "train" / "stage.json").read_text())["details"]
    assert details["device"].startswith("cuda")
    assert details["final_train_loss"] < details["first_train_loss"] - 2.0
    assert 0 < details["peak_gpu_memory_gib"] < 24
    recipe = load_recipe("smoke", [a for a in GPU if a != "--set"])
    model = build_qlora_model(recipe, run / "cache", torch.device("cuda"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * recipe.model.architecture.num_hidden_layers
    assert all(m.weight.device.type == "cuda" and m.weight.quant_state.quant_type == "nf4" for m in layers)


def test_resume_after_kill_on_cuda(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    for folder in (reference, run):
        _prepare(folder)
    run_cli("train", "--profile", "smoke", "--run-dir", str(reference), *GPU)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "birbal", "train", "--profile", "smoke", "--run-dir", str(run),
                             *GPU], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "train" / "checkpoints" / "step-00000020"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_dir()
    run_cli("train", "--profile", "smoke", "--run-dir", str(run), *GPU)  # resumes from the paged optimizer state
    ours = [m for m in _train_metrics(run) if m["event"] == "train"]
    ref = [m for m in _train_metrics(reference) if m["event"] == "train"]
    assert ours[-1]["step"] == ref[-1]["step"]
    # CUDA kernels are not bit-deterministic; the resumed run must still follow the same trajectory closely
    assert abs(ours[-1]["loss"] - ref[-1]["loss"]) < 0.05 * abs(ref[-1]["loss"])


def test_memory_cap_is_enforced():
    from birbal.train.recipe import cap_gpu_memory

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    try:
        cap_gpu_memory(device, 1.0)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
        small = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # under the cap: fine
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_loss_equals_separate_losses_on_cuda(attention, tokenizer, tmp_path):
    """The packing isolation of tests/test_train_model.py, on the GPU attention paths the benchmark measures."""
    from birbal.config import load_recipe
    from birbal.train.model import build_qlora_model, response_loss_sum
    from birbal.train.packing import collate, pack_examples, tokenize_example

    recipe = load_recipe("smoke", ["train.device=cuda", "quantization.compute_dtype=float32",
                                   f"model.attn_implementation={attention}"])
    model = build_qlora_model(recipe, tmp_path, torch.device("cuda")).eval()
    pairs = [("### Input:\nWhat is 2 plus 3?\n\n### Response:\n", "5"),
             ("### Input:\nWords: apple river stone\n\n### Response:\n", "stone river apple"),
             ("### Input:\nWhich city is the capital of Peru?\n\n### Response:\n", "Lima")]
    examples = [tokenize_example(tokenizer, q, a) for q, a in pairs]
    rows, _ = pack_examples(examples, 128, tokenizer.eos_token_id)

    def on_gpu(batch):
        return {k: v.cuda() for k, v in batch.items()}

    with torch.no_grad():
        packed, n = response_loss_sum(model, on_gpu(collate(rows)))
        alone = [response_loss_sum(model, on_gpu(collate(pack_examples([e], len(e), 2)[0]))) for e in examples]
    assert n == sum(k for _, k in alone)
    torch.testing.assert_close(packed, sum(loss for loss, _ in alone), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_compiled_layers_match_eager_on_cuda(attention, tokenizer, tmp_path):
    """train.torch_compile on the GPU kernels (Inductor, bitsandbytes' CUDA 4-bit, flex_attention's block mask)."""
    from test_train_model import assert_compiled_matches_eager

    from birbal.config import load_recipe

    recipe = load_recipe("smoke", ["train.device=cuda", "quantization.compute_dtype=float32",
                                   f"model.attn_implementation={attention}"])
    assert_compiled_matches_eager(recipe, tmp_path, tokenizer, torch.device("cuda"))


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_the_down_projection_outside_the_checkpoint_on_cuda(attention, tokenizer, tmp_path):
    """train.down_proj_outside_checkpoint compiled on the GPU: the recompute skips the down projections' 4-bit
    products, keeps the same tensors, and gives the whole compiled layer's loss and gradients."""
    from test_train_model import assert_down_proj_outside_compiles_to_the_same_maths

    assert_down_proj_outside_compiles_to_the_same_maths(tmp_path, tokenizer, torch.device("cuda"), (
        "train.device=cuda", "quantization.compute_dtype=float32", f"model.attn_implementation={attention}"))


@pytest.mark.parametrize("down_outside", [True, False], ids=["as_trained", "down_proj_inside"])
def test_birbal_4090_training_maths_at_the_7b_shape(down_outside, tmp_path):
    """The real CLI with birbal-4090's own train settings (upstream tokenisation, one 16,384-token multipack bin
    per micro-batch, NEFTune by the row, mean of micro-batch means, flex_attention, compiled layers, 2 unchecked,
    the 24 GiB cap) on random weights of the Mistral-7B shape: it fits, learns nothing absurd, and the bins are
    upstream's 2 x 8192. As trained, train.down_proj_outside_checkpoint is on (its backward holds the down
    projection's input gradient during each recompute); `down_proj_inside` is the same run with it off."""
    import random

    sys.path.insert(0, str(REPO / "benchmarks"))
    from shapes import MISTRAL_7B
    from train_throughput import build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "mistral-7b-random-bf16", MISTRAL_7B, "cuda")["checkpoint"]
    torch.cuda.empty_cache()
    words = ["river", "stone", "apple", "paper", "silver", "table", "bread", "cloud", "seven", "green"]
    rng = random.Random(0)
    rows = tmp_path / "long_rows.jsonl"
    with open(rows, "w") as f:  # answers of ~2,000-3,000 tokens, so bins fill past 8,192 tokens
        for i in range(14):
            f.write(json.dumps({"instruction": "Repeat the words in the input, then continue the pattern.",
                                "input": f"Words number {i}: " + " ".join(rng.choices(words, k=12)),
                                "output": " ".join(rng.choices(words, k=rng.randint(1800, 2600)))}) + "\n")
    overrides = [
        f"model.name_or_path={checkpoint}",
        "model.tokenizer={source: mistral-common, name_or_path: null, revision: null, "
        "sha256: dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055}",
        "data.mode=rebuild", "data.eval_fraction=0.15", "data.contamination.benchmarks=[]",
        f"data.rebuild.sources=[{{name: long, kind: instruction_rows, origin: {{path: {rows}}}}}]",
        "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "train.budget_hours=1",
        f"train.down_proj_outside_checkpoint={str(down_outside).lower()}"]
    args = [a for o in overrides for a in ("--set", o)]
    run = tmp_path / "run"
    run_cli("prepare-data", "--profile", "birbal-4090", "--run-dir", str(run), *args)
    run_cli("train", "--profile", "birbal-4090", "--run-dir", str(run), *args, timeout=1200)
    details = json.loads((run / "train" / "stage.json").read_text())["details"]
    train = [m for m in _train_metrics(run) if m["event"] == "train"]
    assert details["global_step"] == 2 and len(train) == 2
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in train)
    # one micro-batch of more than 8,192 real tokens: a single 16,384-wide row, as axolotl's multipack made
    assert max(m["tokens"] for m in train) > 8192 and max(m["tokens"] for m in train) <= 4 * 16384
    assert details["packing_efficiency_estimate"] > 0.5
    assert [e["step"] for e in details["eval_history"]] == [2] and math.isfinite(details["eval_history"][0]["eval_loss"])
    assert 0 < details["peak_gpu_memory_gib"] < 24


# eager: both layers offloaded (the top one fetched by the final norm's hook); compiled: layer 0 offloaded, layer 1
# unchecked (the top one fetched by the hook of the layer above it)
@pytest.mark.parametrize("compiled,unchecked,count", [(False, 0, 2), (True, 1, 1)])
def test_offloaded_layers_match_checkpointing_on_cuda(compiled, unchecked, count, tokenizer, tmp_path, monkeypatch):
    """train.offload_layers with its copy streams and pinned memory (and compiled layers, flex_attention): the
    loss and LoRA gradients of full checkpointing, over two micro-batches, and every tensor brought back."""
    from test_train_offload import offload_matches_checkpointing

    from birbal.train import offload

    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)  # the smoke model's tensors are all small
    done = offload_matches_checkpointing(tmp_path, tokenizer, torch.device("cuda"), overrides=(
        "quantization.compute_dtype=float32", "model.attn_implementation=flex_attention",
        f"train.torch_compile={str(compiled).lower()}"), unchecked=unchecked, count=count)
    assert done.cuda and done.peak_host_bytes > 0
    # every block it fetched back was allocated on the compute stream: the caching allocator reuses a block only on
    # its allocating stream, so blocks made on a copy stream would be a second pool the compute stream cannot use
    # (with 15 layers offloaded at the 7B shape, that pool reached the 24 GiB cap)
    copy_streams = {done.h2d.cuda_stream, done.d2h.cuda_stream}
    segments = torch.cuda.memory_snapshot()
    assert segments and not [s for s in segments if s["stream"] in copy_streams], [
        (s["stream"], s["total_size"]) for s in segments if s["stream"] in copy_streams]


def test_the_training_attention_compiles_for_an_rtx_4090(tmp_path):
    """birbal-4090's flex attention kernels, forward and backward, as Inductor makes them for a 4090's capability
    (8, 9), compile for sm_89 within its 99 KiB of shared memory a block (tests/flex_aot.py says how, and why:
    pytorch/pytorch#133254). A 4090 is what a judge trains on; this GPU is not one."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "flex_aot.json"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "flex_aot.py"), str(out)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    print(json.dumps(report["kernels"], indent=1))  # the figures, for the results README
    kernels = report["kernels"]
    assert report["capability_asked"]["as_a_4090"] > 0, report["capability_asked"]  # the heuristics saw a 4090
    assert {row["kind"] for row in kernels.values()} == {"forward", "backward"}, kernels
    for name, row in kernels.items():
        assert "error" not in row["sm_90"], (name, row)  # the same source compiles for the GPU it ran on
        assert "error" not in row["sm_89"], (name, row)
        assert row["sm_89"]["shared"] <= 99 * 1024, (name, row)
