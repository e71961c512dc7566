from pathlib import Path

import pytest
import yaml

from birbal.config import CONFIG_DIR, load_recipe, parse_override
from birbal.errors import ConfigError


def test_4090_profile_is_the_winning_recipe():
    r = load_recipe("birbal-4090")
    assert r.model.source == "hub" and r.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert len(r.model.revision) == 40
    q = r.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (128, 256, 0.05)
    assert set(r.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    t = r.train
    assert (t.sequence_len, t.sample_packing, t.pad_to_sequence_len) == (8192, True, True)
    assert (t.micro_batch_size, t.gradient_accumulation_steps) == (2, 4)
    assert t.optimizer == "paged_adamw_32bit"
    assert (t.learning_rate, t.lr_scheduler, t.warmup_steps) == (2e-5, "cosine", 100)
    assert (t.weight_decay, t.max_grad_norm, t.num_epochs, t.max_steps) == (0.01, 0.3, 3, None)
    assert t.neftune_noise_alpha == 5 and t.gradient_checkpointing and t.bf16 and not t.tf32
    assert not t.train_on_inputs
    assert (t.eval_steps, t.save_steps, t.save_total_limit, t.eval_max_rows) == (64, 64, 10, 2000)
    assert t.metric_for_best_model == "eval_loss" and t.load_best_model_at_end
    assert (t.budget_hours, t.max_gpu_memory_gib) == (24, 24)
    assert isinstance(t.seed, int)
    assert r.data.mode == "published" and r.data.published.name_or_path == "upaya07/NeurIPS-LLM-data"
    assert len(r.data.published.revision) == 40
    assert r.serve.max_context == 4096 and r.serve.postprocess == "birbal"
    # inference/submission_2/main.py: bf16 base + the adapter unmerged, their request policy
    s = r.serve
    assert (s.model, s.dtype, s.quantize, s.adapter_dtype, s.request_policy) == ("adapter", "bfloat16", "none",
                                                                                 "base", "upstream")
    assert s.published_adapter is None
    # a replayed CUDA graph per step, its layers compiled one region for all (the whole-step compile was too slow at 7B)
    assert s.decode == "compiled_layers" and s.decode_compile_lengths == "each" and s.decode_attention == "triton"
    assert s.decode_fuse == "lora"  # one product per shared-input group, each LoRA B inside its base's product
    assert s.decode_gemv == "triton"  # LoRA A as Triton reductions, the other products birbal.serve.gemv's kernel


def test_plus_profile_switches_the_serving_improvements_on():
    plus, full = load_recipe("birbal-4090-plus"), load_recipe("birbal-4090")
    switched = {"model", "request_policy", "decode"}
    assert tuple(getattr(plus.serve, k) for k in sorted(switched)) == ("auto", "merged", "kit")
    assert plus.serve.model_dump(exclude=switched) == full.serve.model_dump(exclude=switched)


def test_birbal_4090_serves_the_kernel_saving_forms():
    """The four forms of the compiled step that change no maths, GPU-tested in birbal-4090's own served step
    (tests/test_serve_fused.py::test_each_profiles_served_step_equals_eager_on_cuda[birbal-4090] with the first
    three, [birbal-4090+rest] with decode_compile_rest, and the same at Mistral-7B's layer shape)."""
    s = load_recipe("birbal-4090").serve
    assert (s.decode_gemv_glu, s.decode_combo_kernels, s.decode_length_update, s.decode_compile_rest) == (
        True, True, "step", True)


def test_smoke_is_the_same_recipe_shrunk():
    smoke, full = load_recipe("smoke"), load_recipe("birbal-4090")
    assert smoke.model.source == "random" and smoke.model.architecture.vocab_size == 32000
    assert smoke.model.tokenizer.source == "mistral-common"
    assert smoke.quantization.load_in_4bit and smoke.quantization.quant_type == "nf4"
    assert smoke.lora.target_modules == full.lora.target_modules
    # what smoke does not override is inherited verbatim
    for key in ("optimizer", "lr_scheduler", "weight_decay", "max_grad_norm", "neftune_noise_alpha", "seed"):
        assert getattr(smoke.train, key) == getattr(full.train, key)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_profile_validates(path: Path):
    load_recipe(path)


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=-1", "train.learning_rate"),
    ("lora.r=0", "lora.r"),
    ("train.budget_hours=0", "train.budget_hours"),
    ("train.lerning_rate=1e-5", "train.lerning_rate"),
    ("train.micro_batch_size=two", "train.micro_batch_size"),
    ("lora.target_modules=[lm_head]", "lora.target_modules"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe("smoke", [override])
    assert key in str(err.value)


def test_overrides_apply_with_yaml_types():
    r = load_recipe("smoke", ["train.learning_rate=1e-5", "train.max_steps=7", "serve.port=9000"])
    assert (r.train.learning_rate, r.train.max_steps, r.serve.port) == (1e-5, 7, 9000)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no-equals-sign")


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="smoke"):
        load_recipe("no-such-profile")


def test_hub_model_needs_a_pinned_revision(tmp_path):
    data = yaml.safe_load((CONFIG_DIR / "birbal-4090.yaml").read_text())
    data["model"]["revision"] = "main"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="40-hex"):
        load_recipe(bad)


def test_a_profile_name_means_the_packaged_profile_whatever_the_cwd_holds(tmp_path, monkeypatch):
    # The containers' WORKDIR is /runs and the run dir is mounted at /runs/<profile name> (issue 13 item 1): a folder
    # or file named like a profile in the working directory must not be read as the recipe.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "birbal-4090").mkdir()
    (tmp_path / "smoke").write_text("not: a recipe\n")
    assert load_recipe("birbal-4090").name == "birbal-4090"
    assert load_recipe("smoke").name == "smoke"
    # A file path is still a file path: a suffix, a separator, or a Path (what --config passes).
    mine = tmp_path / "mine"
    mine.write_text((CONFIG_DIR / "smoke.yaml").read_text())
    assert load_recipe(mine).name == "smoke" and load_recipe("./mine").name == "smoke"
    with pytest.raises(ConfigError, match="config file not found"):
        load_recipe("./birbal-4090")
