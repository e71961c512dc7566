"""The engine on the smoke profile's tiny random Mistral: greedy text, logprobs, sampling, stops, echo, limits."""

from __future__ import annotations

import math

import pytest
import torch
from serve_model import engine, merged_folder, serve_cfg, smoke

from birbal.serve.engine import Engine
from birbal.serve.errors import ValidationError
from birbal.serve.schemas import DecodeRequest, ProcessRequest, Token, TokenizeRequest

PROMPT = "The capital of France is"
GREEDY = 1e-7  # what HELM sends for temperature 0


def _greedy(prompt: str = PROMPT, **kwargs) -> ProcessRequest:
    return ProcessRequest(prompt=prompt, temperature=GREEDY, **kwargs)


def _reference_logprobs(eng: Engine, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward pass over the whole sequence: row i scores ids[i + 1]."""
    with torch.inference_mode():
        logits = eng.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _generate_ids(eng: Engine, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    prompt_ids = eng.encode(prompt)
    with torch.inference_mode():
        out = eng.model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids)),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return prompt_ids, out[0, len(prompt_ids):].tolist()


def test_greedy_text_equals_model_generate_and_logprobs_equal_one_forward_pass():
    eng = engine()
    response = eng.process(_greedy(max_new_tokens=12, top_k_per_token=3))
    prompt_ids, new_ids = _generate_ids(eng, PROMPT, 12)
    new_ids = new_ids[: new_ids.index(2)] if 2 in new_ids else new_ids
    assert response.text == eng.tokenizer.decode(new_ids, skip_special_tokens=True)
    assert len(response.tokens) == len(new_ids)
    reference = _reference_logprobs(eng, prompt_ids + new_ids)
    for step, (token, token_id) in enumerate(zip(response.tokens, new_ids, strict=True)):
        row = reference[len(prompt_ids) - 1 + step]
        assert token.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        top_values = torch.topk(row, 3).values.tolist()
        assert sorted(token.top_logprob.values(), reverse=True) == pytest.approx(top_values, abs=1e-4)
        assert max(token.top_logprob.values()) == pytest.approx(token.logprob, abs=1e-6)  # greedy: the argmax
    assert response.logprob == pytest.approx(math.fsum(t.logprob for t in response.tokens), abs=1e-9)
    assert "".join(t.text for t in response.tokens) == response.text


def test_same_seed_same_sample_other_seed_other_sample():
    eng = engine()
    ask = dict(prompt=PROMPT, temperature=1.0, top_k=0, max_new_tokens=10)
    first = eng.process(ProcessRequest(seed=7, **ask))
    again = eng.process(ProcessRequest(seed=7, **ask))
    other = eng.process(ProcessRequest(seed=8, **ask))
    assert first.text == again.text and first.logprob == again.logprob
    assert first.text != other.text


def test_sampled_logprobs_are_under_the_distribution_drawn_from():
    eng = engine()
    k, temperature = 5, 0.7
    request = ProcessRequest(prompt=PROMPT, temperature=temperature, top_k=k, seed=3, max_new_tokens=6,
                             top_k_per_token=k)
    prompt_ids = eng.encode(PROMPT)
    tokens, new_ids = eng._run(prompt_ids, request, stops=[])
    with torch.inference_mode():
        logits = eng.model(input_ids=torch.tensor([prompt_ids + new_ids])).logits[0].float()
    for step, (token, token_id) in enumerate(zip(tokens, new_ids, strict=True)):
        kept = torch.topk(logits[len(prompt_ids) - 1 + step] / temperature, k)
        expected = torch.log_softmax(kept.values, dim=-1)
        # The distribution after temperature and top-k: its k tokens' probabilities add up to one.
        assert math.fsum(math.exp(v) for v in token.top_logprob.values()) == pytest.approx(1.0, abs=1e-4)
        assert sorted(token.top_logprob.values(), reverse=True) == pytest.approx(expected.tolist(), abs=1e-4)
        assert token_id in kept.indices.tolist()
        assert token.logprob == pytest.approx(expected[kept.indices.tolist().index(token_id)].item(), abs=1e-4)


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    eng = engine()
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampling = eng._sampling(ProcessRequest(prompt="x", temperature=1.0, top_k=0, top_p=0.7, seed=0))
    scores = eng._processed_scores(logits, sampling)
    assert torch.isfinite(scores).tolist() == [True, True, False, False]
    sampling = eng._sampling(ProcessRequest(prompt="x", temperature=1.0, top_k=0, top_p=0.1, seed=0))
    assert torch.isfinite(eng._processed_scores(logits, sampling)).tolist() == [True, False, False, False]


def test_stop_sequence_ends_generation_and_is_cut():
    eng = engine()
    full = eng.process(_greedy(max_new_tokens=16))
    starts, position = [], 0
    for token in full.tokens:
        starts.append(position)
        position += len(token.text)
    # A stop sequence: the text of a token that first occurs where that token starts.
    index = next(i for i in range(2, len(full.tokens))
                 if full.tokens[i].text.strip() and full.text.find(full.tokens[i].text) == starts[i])
    stop = full.tokens[index].text
    cut = eng.process(_greedy(max_new_tokens=16, stop_sequences=[stop, "never-generated-zzz"]))
    assert cut.text == full.text[: starts[index]]
    # Kept: the tokens that start before the cut (a held-back partial byte at the cut belongs to the stop).
    kept = [t for t, start in zip(full.tokens, starts, strict=True) if start < starts[index]]
    assert [t.text for t in cut.tokens] == [t.text for t in kept]
    assert cut.logprob == pytest.approx(sum(t.logprob for t in kept), abs=1e-6)


def test_stop_cut_keeps_the_part_of_a_straddling_token():
    tokens = [Token(text="ab", logprob=-1.0, top_logprob={}), Token(text="cXd", logprob=-2.0, top_logprob={})]
    assert Engine._cut_at_stop(tokens, 0, "abcXd", 0, ["Xd"])
    assert [t.text for t in tokens] == ["ab", "c"]
    assert not Engine._cut_at_stop(tokens, 0, "abc", 0, ["zz"])


def test_echo_returns_the_prompt_tokens_with_their_logprobs():
    eng = engine()
    response = eng.process(_greedy(max_new_tokens=3, echo_prompt=True))
    assert response.text.startswith(PROMPT)
    assert "".join(t.text for t in response.tokens) == response.text
    prompt_ids = eng.encode(PROMPT)
    assert prompt_ids[0] == eng.tokenizer.bos_token_id
    assert len(response.tokens) == len(prompt_ids) - 1 + 3  # BOS is not text, so it is not echoed
    reference = _reference_logprobs(eng, prompt_ids)
    for position in range(1, len(prompt_ids)):
        expected = reference[position - 1, prompt_ids[position]].item()
        assert response.tokens[position - 1].logprob == pytest.approx(expected, abs=1e-4)
    assert response.logprob == pytest.approx(sum(t.logprob for t in response.tokens), abs=1e-6)
    scored_only = eng.process(_greedy(max_new_tokens=0, echo_prompt=True))
    assert scored_only.text == PROMPT and len(scored_only.tokens) == len(prompt_ids) - 1


def test_birbal_policy_wraps_the_prompt_and_cuts_the_output():
    plain, birbal = engine("none"), engine("birbal")
    wrapped = "### Input:\n" + PROMPT + "\n\n### Response:\n"
    expected = plain.process(_greedy(prompt=wrapped, max_new_tokens=8)).text.split("\n\n")[0]
    assert birbal.process(_greedy(max_new_tokens=8)).text == expected


def test_tokenize_honours_truncation_and_max_length():
    eng = engine()
    text = "one two three four five six seven eight nine ten " * 5
    everything = eng.tokenize(TokenizeRequest(text=text, truncation=False, max_length=8)).tokens
    assert len(everything) > 8
    truncated = eng.tokenize(TokenizeRequest(text=text, truncation=True, max_length=8)).tokens
    assert truncated == everything[:8]
    assert truncated == eng.tokenizer(text, truncation=True, max_length=8)["input_ids"]


def test_decode_round_trips_and_refuses_unknown_ids():
    eng = engine()
    ids = eng.tokenize(TokenizeRequest(text="Hello world\n\nagain")).tokens
    assert eng.decode(DecodeRequest(tokens=ids)).text == "Hello world\n\nagain"
    with pytest.raises(ValidationError, match=r"tokens\[1\] = 32000 .* 0 to 31999"):
        eng.decode(DecodeRequest(tokens=[1, 32000]))


def test_context_limit_boundaries():
    base = engine()
    eng = Engine(base.model, base.tokenizer, serve_cfg(max_context=16, max_new_tokens_limit=12, postprocess="none"))
    n = len(eng.encode(PROMPT))
    eng.process(_greedy(max_new_tokens=16 - n))  # exactly at the limit: served
    with pytest.raises(ValidationError, match=f"<= 16 .*{n} prompt tokens \\+ {17 - n} max_new_tokens") as caught:
        eng.process(_greedy(max_new_tokens=17 - n))
    assert caught.value.field == "max_new_tokens"
    with pytest.raises(ValidationError, match="serve.max_new_tokens_limit") as caught:
        eng.process(_greedy(max_new_tokens=13))
    assert caught.value.field == "max_new_tokens"
    with pytest.raises(ValidationError, match="at most 16 tokens") as caught:
        eng.process(_greedy(prompt=PROMPT * 5, max_new_tokens=0))
    assert caught.value.field == "prompt"


def test_base_plus_adapter_equals_merged_and_4bit_loads(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(merged_folder(), dtype=torch.float32)
    peft_model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    engine().tokenizer.save_pretrained(tmp_path / "merged")

    cfg = serve_cfg(postprocess="none")
    tokenizer = engine().tokenizer
    with_adapter = Engine.from_adapter(str(merged_folder()), tmp_path / "adapter", tokenizer, cfg)
    from_merged = Engine.from_merged(tmp_path / "merged", cfg)
    request = _greedy(max_new_tokens=6)
    a, b = with_adapter.process(request), from_merged.process(request)
    assert a.text == b.text
    assert [t.logprob for t in a.tokens] == pytest.approx([t.logprob for t in b.tokens], abs=1e-4)
    assert a.tokens[0].logprob != pytest.approx(engine().process(request).tokens[0].logprob, abs=1e-4)

    import bitsandbytes as bnb

    quantized = Engine.from_adapter(str(merged_folder()), tmp_path / "adapter", tokenizer, cfg,
                                    quantization=smoke().quantization)
    layers = [m for m in quantized.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    response = quantized.process(request)
    assert len(response.tokens) == 6 and all(math.isfinite(t.logprob) for t in response.tokens)


def test_pickle_weights_are_refused(tmp_path):
    from birbal.errors import ServeError

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ServeError, match="no \\*.safetensors .*pickle"):
        Engine.from_merged(tmp_path, serve_cfg())
