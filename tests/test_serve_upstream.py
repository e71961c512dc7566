"""birbal-4090's server: the winners' request policy and their unmerged-adapter path, against references written
from their code (inference/submission_2/api.py and main.py at 6b2bb5d), not from ours."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from serve_model import engine, merged_folder, serve_cfg

from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest

# ---- the reference: their api.py and main.py, transcribed (cuda -> the model's device, nothing else changed) ----


@dataclass
class UpstreamProcessRequest:
    """api.py:6-13. pydantic 1's BaseModel ignores fields it does not declare."""

    prompt: str
    num_samples: int = 1
    max_new_tokens: int = 50
    top_k: int = 200
    temperature: float = 1e-7
    seed: int | None = None
    echo_prompt: bool | None = None

    @classmethod
    def parse(cls, body: dict) -> UpstreamProcessRequest:
        return cls(**{k: v for k, v in body.items() if k in cls.__dataclass_fields__})


def upstream_process(model, tokenizer, body: dict) -> dict:
    """main.py:52-126, process_request."""
    input_data = UpstreamProcessRequest.parse(body)
    if input_data.seed is not None:
        torch.manual_seed(input_data.seed)
    prompt = input_data.prompt.strip()
    two_consecutive_new_line_count = prompt.count("\n\n")
    if two_consecutive_new_line_count < 2:
        prompt = "### Input:\n" + input_data.prompt + "\n\n### Response:\n"
    encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    prompt_length = encoded["input_ids"][0].size(0)
    assert prompt_length + input_data.max_new_tokens <= 4096
    encoded = {k: v.to(model.device) for k, v in encoded.items()}
    with torch.no_grad():
        outputs = model.generate(**encoded, max_new_tokens=input_data.max_new_tokens, do_sample=True,
                                 temperature=input_data.temperature, top_k=input_data.top_k,
                                 return_dict_in_generate=True, output_scores=True, pad_token_id=2)
    if not input_data.echo_prompt:
        output = tokenizer.decode(outputs.sequences[0][prompt_length:], skip_special_tokens=True)
        output = output.split("\n\n")[0]
        if output.lower().strip().startswith("the answer is"):
            output = output.strip()[13:].strip()
            output = output[:1]
    else:
        output = tokenizer.decode(outputs.sequences[0], skip_special_tokens=True)
    generated_tokens = []
    log_probs = torch.log(torch.stack(outputs.scores, dim=1).softmax(-1))
    gen_sequences = outputs.sequences[:, encoded["input_ids"].shape[-1]:]
    gen_logprobs = torch.gather(log_probs, 2, gen_sequences[:, :, None]).squeeze(-1)
    top_indices = torch.argmax(log_probs, dim=-1)
    top_logprobs = torch.gather(log_probs, 2, top_indices[:, :, None]).squeeze(-1)
    top_indices = top_indices.tolist()[0]
    top_logprobs = top_logprobs.tolist()[0]
    for t, lp, tlp in zip(gen_sequences.tolist()[0], gen_logprobs.tolist()[0], zip(top_indices, top_logprobs)):  # noqa: B905
        idx, val = tlp
        tok_str = tokenizer.decode(idx)
        token_tlp = {tok_str: val}
        generated_tokens.append({"text": tokenizer.decode(t), "logprob": lp, "top_logprob": token_tlp})
    logprob_sum = gen_logprobs.sum().item()
    return {"text": output, "tokens": generated_tokens, "logprob": logprob_sum}


# ---- helpers -------------------------------------------------------------------------------------------------

FEW_SHOT = "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"


def helm_body(prompt: str, **changes) -> dict:
    """What HELM's HTTPModelClient posts (crfm-helm 0.5; birbal.evaluate.client.helm_raw_request)."""
    body = {"prompt": prompt, "temperature": 1e-7, "num_return_sequences": 1, "max_new_tokens": 6, "top_p": 1,
            "echo_prompt": False, "top_k_per_token": 1, "stop_sequences": ["\n"]}
    body.update(changes)
    return body


def upstream_engine(model=None, tokenizer=None, **cfg) -> Engine:
    base = engine()
    cfg = {"request_policy": "upstream", "postprocess": "birbal", **cfg}
    return Engine(model if model is not None else base.model, tokenizer or base.tokenizer, serve_cfg(**cfg))


def ours(eng: Engine, body: dict) -> dict:
    response = eng.process(ProcessRequest.model_validate(body))
    return {"text": response.text, "tokens": [t.model_dump() for t in response.tokens], "logprob": response.logprob}


def assert_same_response(a: dict, b: dict) -> None:
    assert a["text"] == b["text"]
    assert [t["text"] for t in a["tokens"]] == [t["text"] for t in b["tokens"]]
    assert [t["logprob"] for t in a["tokens"]] == pytest.approx([t["logprob"] for t in b["tokens"]], abs=1e-4)
    assert [list(t["top_logprob"]) for t in a["tokens"]] == [list(t["top_logprob"]) for t in b["tokens"]]
    assert [v for t in a["tokens"] for v in t["top_logprob"].values()] == pytest.approx(
        [v for t in b["tokens"] for v in t["top_logprob"].values()], abs=1e-4)
    assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


# ---- which fields reach the engine ---------------------------------------------------------------------------

CASES = [
    ("greedy-like, HELM's stop sequence dropped", helm_body("The capital of France is", seed=1)),
    ("few-shot prompt, sent stripped", helm_body(FEW_SHOT + "  ", seed=2, stop_sequences=["\n", "Q:"])),
    ("sampled at 0.9 with top_k 5 and a seed", helm_body("Tell me a story", temperature=0.9, top_k=5, seed=3,
                                                          max_new_tokens=8, top_p=0.5, top_k_per_token=4)),
    ("echo: the wrapped prompt plus the output, no prompt tokens", helm_body("Score this", echo_prompt=True,
                                                                              seed=4, max_new_tokens=3)),
    ("the challenge's defaults (no HELM fields)", {"prompt": "Hello there", "seed": 5}),
]


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_upstream_policy_answers_as_their_main_py(decode):
    eng = upstream_engine(decode=decode)
    for _, body in CASES:
        reference = upstream_process(eng.model, eng.tokenizer, body)
        assert_same_response(ours(eng, body), reference)


def test_only_their_fields_reach_the_engine():
    """The fields their ProcessRequest lacked change nothing; the ones it had do."""
    eng = upstream_engine()
    body = helm_body("The capital of France is", seed=11, max_new_tokens=8)
    first = ours(eng, body)
    for ignored in ({"stop_sequences": ["\n", " ", "e"]}, {"top_p": 0.01}, {"top_k_per_token": 7},
                    {"num_return_sequences": 3}, {"num_samples": 2}):
        assert ours(eng, {**body, **ignored}) == first, ignored
    assert all(len(t["top_logprob"]) == 1 for t in first["tokens"])  # one entry, whatever top_k_per_token says
    assert len(first["tokens"]) == 8  # generation does not stop at a stop sequence (only at EOS or the limit)
    for honoured in ({"max_new_tokens": 3}, {"temperature": 5.0, "top_k": 0}, {"echo_prompt": True}):
        assert ours(eng, {**body, **honoured}) != first, honoured
    hot = {**body, "temperature": 5.0, "top_k": 0}
    assert ours(eng, {**hot, "seed": 12}) != ours(eng, {**hot, "seed": 13})  # the seed reaches the sampler


def test_temperature_1e7_samples_among_tied_logits_where_greedy_takes_the_first():
    """main.py samples (do_sample=True) at HELM's 1e-7: an exact tie for the largest logit is a draw, as
    transformers' own warpers and multinomial make it; the kit's greedy takes the lowest id."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    from birbal.serve import upstream

    logits = torch.full((32000,), -3.0)
    logits[[7, 9]] = 2.0  # a tie, as bf16 logits have
    logits[11] = 2.0 - 2**-6  # just below: never drawn at 1e-7
    drawn = set()
    for seed in range(24):
        torch.manual_seed(seed)
        packed, token = upstream.choose(logits, 1e-7, 200)
        torch.manual_seed(seed)
        scores = TopKLogitsWarper(200)(None, TemperatureLogitsWarper(1e-7)(None, logits.view(1, -1)))
        expected = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).item()
        assert int(token) == expected == int(packed[0])
        assert packed[1].item() == pytest.approx(torch.log(torch.tensor(0.5)).item())  # log p of either tied one
        assert int(packed[2]) == 7  # top_logprob's key: argmax, the first of the tied
        drawn.add(expected)
    assert drawn == {7, 9}
    assert torch.argmax(logits).item() == 7  # the kit's greedy


def test_upstream_refuses_temperature_zero_with_a_422():
    from birbal.serve.errors import ValidationError

    with pytest.raises(ValidationError, match="temperature must be > 0") as caught:
        upstream_engine().process(ProcessRequest(prompt="x", temperature=0.0))
    assert caught.value.field == "temperature"


# ---- the unmerged adapter (birbal-4090 serves base + adapter, as main.py did) -----------------------------------


def adapter_folder(shape: str = "tiny") -> Path:
    """A random LoRA (all seven projections, lora_B non-zero so it changes the output) on the tiny base; `shape`
    "7b-layers": on serve_model's Mistral-7B-layer base, with birbal-4090's r=128 and alpha 256. Built once per
    shape."""
    return _adapter_folder(shape)


@functools.cache
def _adapter_folder(shape: str) -> Path:
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="birbal-upstream-tests-")) / "adapter"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(merged_folder(shape), dtype=torch.float32)
    r, alpha = (128, 256) if shape == "7b-layers" else (8, 16)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(folder)
    return folder


def peft_reference(dtype=torch.float32):
    """main.py:32-46: the base from disk plus PeftModel.from_pretrained, unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(merged_folder(), dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_folder())).eval()


def test_unmerged_static_and_compiled_paths_equal_peft_generate_greedy():
    """Eager steps, the whole step compiled (compiled_graph's) and each decoder layer compiled (compiled_layers'):
    each gives peft's greedy text. The per-layer compile makes one graph for all the layers of the unmerged model
    (peft's LoRA projections included), however many requests reuse the cache."""
    from peft import PeftModel

    from birbal.serve.decode import StaticDecoder
    from birbal.serve.regional import compiled_graph_count

    reference = peft_reference()
    tokenizer = engine().tokenizer
    cfg = serve_cfg(request_policy="kit", postprocess="none", decode="static", decode_cache_lengths=[64])
    served = Engine.from_adapter(str(merged_folder()), adapter_folder(), tokenizer, cfg)
    assert isinstance(served.model, PeftModel) and served.decode_mode == "static"
    compiled = Engine(served.model, tokenizer, cfg)
    compiled.decoder = StaticDecoder(served.model, cfg.max_context, (64,), compile_step=True)
    layers = Engine(served.model, tokenizer, cfg)
    layers.decoder = StaticDecoder(served.model, cfg.max_context, (64,), compile_step="layers")
    assert len(served.model.get_base_model().model.layers) >= 2
    torch._dynamo.reset()
    layer_graphs = 0
    for prompt, n in (("The capital of France is", 10), ("Once upon a time", 12)):
        ids = served.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), do_sample=False,
                                     max_new_tokens=n, pad_token_id=2)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(2)] if 2 in new else new
        expected = tokenizer.decode(new, skip_special_tokens=True)
        for eng in (served, compiled, layers):
            before = compiled_graph_count()
            response = eng.process(ProcessRequest(prompt=prompt, temperature=1e-7, max_new_tokens=n))
            if eng is layers:
                layer_graphs += compiled_graph_count() - before
            assert response.text == expected
    assert layer_graphs == 1  # one cache length (64), one graph for every layer and every step
    assert engine().process(ProcessRequest(prompt="Once upon a time", temperature=1e-7, max_new_tokens=12)).text \
        != expected  # the adapter changes the output: the test can tell merged-away from applied


def test_unmerged_upstream_policy_equals_their_server_on_the_same_weights():
    """birbal-4090's whole serving path (base + adapter unmerged, static cache, their policy) against main.py."""
    reference = peft_reference()
    tokenizer = engine().tokenizer
    cfg = serve_cfg(request_policy="upstream", postprocess="birbal", decode="static")
    served = Engine.from_adapter(str(merged_folder()), adapter_folder(), tokenizer, cfg)
    for _, body in CASES[:3]:
        assert_same_response(ours(served, body), upstream_process(reference, tokenizer, body))


def test_adapter_weights_stay_in_the_base_dtype_unless_upcast():
    tokenizer = engine().tokenizer
    kept = Engine.from_adapter(str(merged_folder()), adapter_folder(), tokenizer,
                               serve_cfg(dtype="bfloat16", adapter_dtype="base", postprocess="none"))
    upcast = Engine.from_adapter(str(merged_folder()), adapter_folder(), tokenizer,
                                 serve_cfg(dtype="bfloat16", adapter_dtype="float32", postprocess="none"))

    def lora_dtypes(eng):
        return {p.dtype for n, p in eng.model.named_parameters() if "lora_" in n}

    assert lora_dtypes(kept) == {torch.bfloat16} and lora_dtypes(upcast) == {torch.float32}
    base_dtypes = {p.dtype for n, p in kept.model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16}
    saved = json.loads((adapter_folder() / "adapter_config.json").read_text())
    assert saved["r"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["cuda_graph", "compiled_layers", "compiled_graph"])
def test_unmerged_graph_decode_equals_static_and_their_server_on_cuda(mode):
    """birbal-4090's server on a GPU: the base plus the unmerged adapter, each step a replayed (compiled) graph;
    the same answers as the static cache with the same kernels un-replayed, and as main.py's generate."""
    tokenizer = engine().tokenizer
    cfg = serve_cfg(request_policy="upstream", postprocess="birbal", device="cuda")
    graph = Engine.from_adapter(str(merged_folder()), adapter_folder(), tokenizer, cfg.model_copy(update={"decode": mode}))
    assert graph.decode_mode == mode
    static = Engine(graph.model, tokenizer, cfg.model_copy(update={"decode": "static"}))
    graph.warm_up()
    if mode == "compiled_layers":  # the unmerged layers (peft's LoRA projections): one graph for every cache length
        assert len(graph.decoder.cache_lengths) >= 2 and graph.warmup_compiled_graphs == 1
    reference = peft_reference().to("cuda")
    for _, body in CASES:
        replayed = ours(graph, body)
        assert_same_response(ours(static, body), replayed)
        assert_same_response(upstream_process(reference, tokenizer, body), replayed)
    # the kit policy with no prompt wrapping, so its greedy text compares with generate on the bare prompt
    kit = Engine(graph.model, tokenizer, cfg.model_copy(update={"decode": mode, "request_policy": "kit",
                                                                "postprocess": "none"}))
    kit.warm_up()
    for prompt, n in (("The capital of France is", 10), ("Once upon a time", 12)):
        ids = kit.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids], device="cuda"), attention_mask=torch.ones(1, len(ids),
                                     device="cuda"), do_sample=False, max_new_tokens=n, pad_token_id=2)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert kit.process(ProcessRequest(prompt=prompt, temperature=1e-7, max_new_tokens=n)).text == \
            tokenizer.decode(new, skip_special_tokens=True)


def test_the_serve_stage_loads_the_exported_adapter_unmerged_and_checks_its_bytes(tmp_path):
    """birbal-4090's serve section on the tiny base: export/adapter (checked against the export record) applied
    unmerged, answering as main.py."""
    import shutil

    from birbal.config import load_recipe
    from birbal.errors import ServeError
    from birbal.fsutil import sha256_file
    from birbal.rundir import RunDir
    from birbal.serve.stage import engine_factory

    smoke = load_recipe("smoke")
    recipe = load_recipe("birbal-4090", [
        f"model.name_or_path={merged_folder()}", "model.attn_implementation=sdpa",
        "model.tokenizer.source=mistral-common", f"model.tokenizer.sha256={smoke.model.tokenizer.sha256}",
        "serve.dtype=float32", "serve.device=cpu", "serve.decode=static"])
    run_dir = RunDir(tmp_path / "run")
    adapter = run_dir.stage_dir("export") / "adapter"
    shutil.copytree(adapter_folder(), adapter)
    record = run_dir.begin("export", {"test": "serve"})
    run_dir.finish(record, outputs={f"adapter/{p.name}": sha256_file(p) for p in sorted(adapter.iterdir())})
    load, sources = engine_factory(recipe, run_dir, tmp_path / "cache")
    assert sources["adapter"] == str(adapter) and sources["upstream"] == run_dir.outputs_digest("export")
    served = load()
    reference = peft_reference()
    body = CASES[2][1]
    assert_same_response(ours(served, body), upstream_process(reference, served.tokenizer, body))
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + " ")
    with pytest.raises(ServeError, match="adapter_config.json is not the file the export stage recorded"):
        engine_factory(recipe, run_dir, tmp_path / "cache")
