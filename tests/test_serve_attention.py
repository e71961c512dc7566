"""birbal.serve.attention: the flex decode step gives what transformers' SDPA gives, masked slots stay out, every
other shape goes to SDPA unchanged, and serve.decode_attention resolves and refuses as documented."""

import pytest
import torch
from serve_model import engine, serve_cfg
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from birbal.errors import ServeError
from birbal.serve.attention import NAME, apply_decode_attention, flex_decode_attention, resolve_attention
from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest


class _Attention(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def _qkv(q_len: int, kv_len: int, generator: torch.Generator):
    query = torch.randn(1, 8, q_len, 16, generator=generator)
    key, value = (torch.randn(1, 2, kv_len, 16, generator=generator) for _ in range(2))
    return query, key, value


@pytest.mark.parametrize("window", [None, 5])
def test_one_query_token_matches_sdpa_and_masked_slots_stay_out(window):
    generator = torch.Generator().manual_seed(0)
    query, key, value = _qkv(1, 12, generator)
    # position 6 of a 12-slot static cache: slots 0-6 filled; a window of 5 has dropped slots 0 and 1
    first = 0 if window is None else 2
    mask = torch.tensor([[[[False] * first + [True] * (7 - first) + [False] * 5]]])
    position = torch.tensor([[6]])
    ours, _ = flex_decode_attention(_Attention(), query, key, value, mask, scaling=0.25, sliding_window=window,
                                    position_ids=position)
    theirs, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, 1, 8, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    key[:, :, :first] += 100.0  # changing the slots outside changes nothing
    value[:, :, 7:] -= 50.0
    again, _ = flex_decode_attention(_Attention(), query, key, value, mask, scaling=0.25, sliding_window=window,
                                     position_ids=position)
    torch.testing.assert_close(again, ours)
    assert not torch.allclose(sdpa_attention_forward(_Attention(), query, key, value, None, scaling=0.25)[0], ours)


@pytest.mark.parametrize("q_len, masked", [(5, False), (5, True), (1, False)])
def test_other_shapes_go_to_transformers_sdpa_unchanged(q_len, masked):
    generator = torch.Generator().manual_seed(1)
    query, key, value = _qkv(q_len, 5, generator)
    mask = torch.ones(1, 1, q_len, 5, dtype=torch.bool).tril() if masked else None
    ours, _ = flex_decode_attention(_Attention(), query, key, value, mask, scaling=0.25,
                                    position_ids=torch.arange(5 - q_len, 5).view(1, -1))
    theirs, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.25)
    assert torch.equal(ours, theirs)


def test_decode_attention_resolves_per_decode_mode_and_refuses_flex_uncompiled():
    assert resolve_attention("auto", "compiled_graph") == "flex"
    assert resolve_attention("auto", "cuda_graph") == "sdpa"
    assert resolve_attention("sdpa", "compiled_graph") == "sdpa"
    with pytest.raises(ServeError, match=r"decode_attention=flex needs serve.decode=compiled_graph .*static"):
        resolve_attention("flex", "static")
    with pytest.raises(ServeError, match="must be one of auto, sdpa, flex"):
        resolve_attention("xformers", "eager")


def test_only_sdpa_models_are_switched_and_sdpa_is_set_back():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    model = MistralForCausalLM._from_config(config, attn_implementation="sdpa")
    assert apply_decode_attention(model, "flex") == "flex" and model.config._attn_implementation == NAME
    assert apply_decode_attention(model, "sdpa") == "sdpa" and model.config._attn_implementation == "sdpa"
    eager = MistralForCausalLM._from_config(config, attn_implementation="eager")
    assert apply_decode_attention(eager, "flex") == "eager" and eager.config._attn_implementation == "eager"


def test_static_steps_with_flex_match_sdpa(monkeypatch):
    """The path compiled_graph replays, minus the compile and the graph: flex decoding (eager: its reference
    implementation) over the static cache and the masks it builds, against the same cache on transformers' SDPA,
    over requests of different lengths in a row."""
    sdpa = Engine(engine().model, engine().tokenizer, serve_cfg(postprocess="none", decode="static"))
    ask = [ProcessRequest(prompt=p, temperature=1e-7, max_new_tokens=n, top_k_per_token=3)
           for p, n in (("The capital of France is", 8), ("one two three " * 10, 6))]
    expected = [sdpa.process(request) for request in ask]
    flex = Engine(sdpa.model, sdpa.tokenizer, serve_cfg(postprocess="none", decode="static"))
    apply_decode_attention(flex.model, "flex")
    import torch.nn.attention.flex_attention as flex_module

    calls = []
    real = flex_module.flex_attention
    monkeypatch.setattr(flex_module, "flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        for request, want in zip(ask, expected, strict=True):
            got = flex.process(request)
            assert got.text == want.text
            assert [t.logprob for t in got.tokens] == pytest.approx([t.logprob for t in want.tokens], abs=1e-4)
        layers = flex.model.config.num_hidden_layers
        assert len(calls) == layers * sum(r.max_new_tokens - 1 for r in ask)  # every decode step, no prefill
    finally:
        apply_decode_attention(sdpa.model, "sdpa")  # the cached test engine is shared


def test_compiled_static_step_with_flex_matches_sdpa():
    """The step compiled_graph replays, minus the graph: compiled by Inductor (its CPU flex template here, the
    Triton one in tests/test_serve_decode.py's GPU test), over requests of different lengths in a row."""
    from birbal.serve.decode import StaticDecoder

    sdpa = Engine(engine().model, engine().tokenizer, serve_cfg(postprocess="none", decode="static"))
    ask = [ProcessRequest(prompt=p, temperature=1e-7, max_new_tokens=n, top_k_per_token=3)
           for p, n in (("The capital of France is", 8), ("one two three " * 10, 6))]
    expected = [sdpa.process(request) for request in ask]
    flex = Engine(sdpa.model, sdpa.tokenizer, serve_cfg(postprocess="none", decode="static"))
    apply_decode_attention(flex.model, "flex")
    flex.decoder = StaticDecoder(flex.model, flex.cfg.max_context, compile_step=True)
    torch._dynamo.reset()
    try:
        for request, want in zip(ask, expected, strict=True):
            got = flex.process(request)
            assert got.text == want.text
            assert [t.logprob for t in got.tokens] == pytest.approx([t.logprob for t in want.tokens], abs=1e-4)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    finally:
        apply_decode_attention(sdpa.model, "sdpa")  # the cached test engine is shared
