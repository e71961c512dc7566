"""The decoders of birbal.serve.decode: the static KV cache (the path the CUDA graph replays) against the eager
DynamicCache path and a reference forward pass, on the smoke profile's tiny random Mistral in fp32; the CUDA
graph itself on a GPU (`pytest -m gpu tests/test_serve_decode.py`)."""

from __future__ import annotations

import inspect

import pytest
import torch
from serve_model import engine, merged_folder, serve_cfg

from birbal.errors import ServeError
from birbal.serve.decode import EagerDecoder, StaticDecoder, resolve_mode
from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest

GREEDY = 1e-7
# Different lengths in a row: each request must start from a reset cache, whatever the one before left in it.
PROMPTS = [("The capital of France is", 12),
           ("one two three four five six seven eight nine ten " * 6, 20),
           ("Hi", 3),
           ("Question: what is two plus two?\nAnswer:", 16)]


def _twin(eng: Engine, **changes) -> Engine:
    """Another engine on the same weights, with other serve settings."""
    return Engine(eng.model, eng.tokenizer, serve_cfg(postprocess="none", **changes))


def _greedy(prompt: str, max_new_tokens: int, **kwargs) -> ProcessRequest:
    return ProcessRequest(prompt=prompt, temperature=GREEDY, max_new_tokens=max_new_tokens, top_k_per_token=3,
                          **kwargs)


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _assert_same(a, b, tol: float) -> None:
    assert a.text == b.text
    assert [t.text for t in a.tokens] == [t.text for t in b.tokens]
    assert [t.logprob for t in a.tokens] == pytest.approx([t.logprob for t in b.tokens], abs=tol)
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert x.top_logprob.keys() == y.top_logprob.keys()
        assert list(x.top_logprob.values()) == pytest.approx(list(y.top_logprob.values()), abs=tol)


def _assert_matches_reference(eng: Engine, request: ProcessRequest) -> None:
    """The generated ids are the argmax of one forward pass over prompt + output, with its logprobs."""
    ids = eng.encode(request.prompt)
    tokens, generated = eng._run(ids, request, stops=[])
    assert generated, "nothing generated: the check would be empty"
    reference = _reference_logprobs(eng.model, ids + generated)
    for step, (token, token_id) in enumerate(zip(tokens, generated, strict=True)):
        row = reference[len(ids) - 1 + step]
        assert token_id == int(torch.argmax(row))
        assert token.logprob == pytest.approx(row[token_id].item(), abs=1e-4)


def test_static_cache_equals_eager_and_one_forward_pass_across_requests():
    eager = engine()
    static = _twin(eager, decode="static")
    assert (eager.decode_mode, static.decode_mode) == ("eager", "static")
    for prompt, n in PROMPTS + PROMPTS[::-1]:
        request = _greedy(prompt, n)
        _assert_same(eager.process(request), static.process(request), tol=1e-5)
        _assert_matches_reference(static, request)
    # the smoke profile's cache lengths (16, 64) and max_context: these requests moved between all three
    assert sorted(static.decoder._caches) == [16, 64, static.cfg.max_context]


def test_static_cache_echo_scores_the_prompt_like_eager():
    eager = engine()
    static = _twin(eager, decode="static")
    for prompt, n in PROMPTS[:2]:
        for new in (n, 0):
            _assert_same(eager.process(_greedy(prompt, new, echo_prompt=True)),
                         static.process(_greedy(prompt, new, echo_prompt=True)), tol=1e-5)


def test_static_cache_filled_to_max_context():
    context = 24
    eager = _twin(engine(), max_context=context, max_new_tokens_limit=context)
    static = _twin(engine(), max_context=context, max_new_tokens_limit=context, decode="static")
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    n = len(static.encode(prompt))
    assert 4 < n < context
    request = _greedy(prompt, context - n)  # every slot of the cache but the last token's is written
    first = static.process(request)
    _assert_same(eager.process(request), first, tol=1e-5)
    assert len(first.tokens) == context - n, "ended early (end of sequence): the cache was not filled"
    _assert_matches_reference(static, request)
    # A prompt of exactly max_context tokens: the prefill fills the whole cache. (The engine itself prefills
    # such a request, which can generate nothing, without the static cache: see the prefill-only test.)
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " * 3
    full = static.encode(words)[:context]
    with torch.inference_mode():
        filled = StaticDecoder(static.model, max_len=context).prefill(full, all_positions=True)
        grown = EagerDecoder(static.model, max_len=context).prefill(full, all_positions=True)
    assert filled.shape == (context, static.vocab_size)
    torch.testing.assert_close(filled, grown, rtol=1e-5, atol=1e-5)
    # and the next request starts over in the same cache
    _assert_same(first, static.process(request), tol=1e-6)


def test_static_decoder_refuses_a_step_past_its_cache():
    decoder = StaticDecoder(engine().model, max_len=5)
    with torch.inference_mode():
        decoder.prefill([1, 2, 3, 4], all_positions=False)
        decoder.step(5)
        with pytest.raises(ServeError, match="does not fit the static cache of 5"):
            decoder.step(6)
        with pytest.raises(ServeError, match="6 prompt tokens do not fit"):
            decoder.prefill([1, 2, 3, 4, 5, 6], all_positions=False)


def test_a_request_takes_the_shortest_cache_that_holds_it():
    decoder = StaticDecoder(engine().model, max_len=32, cache_lengths=(8, 16, 64))
    assert decoder.cache_lengths == (8, 16, 32)  # 64 is past max_len: max_len is the longest
    assert [decoder.cache_length_for(n) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    with torch.inference_mode():
        decoder.prefill([1, 2, 3, 4], all_positions=False, reserve=8)
        assert decoder._cache is decoder._caches[8] and decoder._cache.layers[0].keys.shape[2] == 8
        for token in range(5, 9):  # positions 5..8: the cache is full
            decoder.step(token)
        with pytest.raises(ServeError, match="decode step 9 does not fit the static cache of 8"):
            decoder.step(9)
        decoder.prefill([1, 2, 3, 4], all_positions=False, reserve=9)
        assert decoder._cache is decoder._caches[16]
        decoder.prefill([1, 2, 3, 4], all_positions=False)  # no reserve: the prompt's own length
        assert decoder._cache is decoder._caches[8]


def test_static_cache_applies_the_sliding_window():
    """The cache's layers are full-attention (see StaticDecoder._new_cache): the model's mask must still keep a
    query to its window, as a forward pass without a cache does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_folder(), dtype=torch.float32, sliding_window=6,
                                                 attn_implementation="sdpa").eval()
    windowed = Engine(model, engine().tokenizer, serve_cfg(postprocess="none", decode="static"))
    request = _greedy(PROMPTS[1][0], 12)
    _assert_matches_reference(windowed, request)
    # the window matters here: the full-context model gives other logprobs
    assert windowed.process(request).logprob != pytest.approx(engine().process(request).logprob, abs=1e-3)


def test_sampling_with_a_seed_is_the_same_on_the_static_cache():
    eager = engine()
    static = _twin(eager, decode="static")
    ask = dict(prompt=PROMPTS[0][0], temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12, top_k_per_token=2)
    for seed in (1, 2):
        _assert_same(eager.process(ProcessRequest(seed=seed, **ask)), static.process(ProcessRequest(seed=seed, **ask)),
                     tol=1e-5)
    again = static.process(ProcessRequest(seed=1, **ask))
    assert again.text == static.process(ProcessRequest(seed=1, **ask)).text
    assert again.text != static.process(ProcessRequest(seed=2, **ask)).text


def test_static_cache_positions_and_mask_live_on_the_device():
    """What makes a replayed graph correct: the query offset the mask and positions come from is a tensor that
    each update advances in place (no host int baked into the capture), and a 1-token query's mask over the
    static cache admits exactly the slots up to its own position."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    model = engine().model
    decoder = StaticDecoder(model, max_len=32)
    ids = engine().encode(PROMPTS[0][0])
    with torch.inference_mode():
        decoder.prefill(ids, all_positions=False)
        cache = decoder._cache
        offsets = [cache.get_query_offset(i) for i in range(len(cache.layers))]
        assert all(isinstance(o, torch.Tensor) and int(o) == len(ids) for o in offsets)
        decoder.step(7)
        assert int(offsets[0]) == len(ids) + 1  # the same tensor, advanced in place
        kw = "cache" if "cache" in inspect.signature(create_sliding_window_causal_mask).parameters \
            else "past_key_values"
        mask = create_sliding_window_causal_mask(
            config=model.config, inputs_embeds=torch.zeros(1, 1, model.config.hidden_size),
            attention_mask=None, position_ids=torch.tensor([[len(ids) + 1]]), **{kw: cache})
    assert mask is not None and mask.shape == (1, 1, 1, 32)
    assert mask[0, 0, 0].tolist() == [j <= len(ids) + 1 for j in range(32)]


def test_decode_mode_resolution():
    model = engine().model
    cpu = torch.device("cpu")
    assert resolve_mode("auto", model, cpu) == "eager"
    assert resolve_mode("static", model, cpu) == "static"
    with pytest.raises(ServeError, match="cuda_graph needs a CUDA device"):
        resolve_mode("cuda_graph", model, cpu)
    assert resolve_mode("auto", model, torch.device("cuda")) == "compiled_layers"


def test_one_token_requests_skip_the_static_cache():
    """Prefill-only requests (one new token, or an echo scoring the prompt) run eagerly: nothing to replay."""
    eager = engine()
    static = _twin(eager, decode="static")
    for prompt, _ in PROMPTS:
        for request in (_greedy(prompt, 1), _greedy(prompt, 0, echo_prompt=True), _greedy(prompt, 1, echo_prompt=True)):
            _assert_same(eager.process(request), static.process(request), tol=0.0)
    assert static.decoder._cache is None, "a prefill-only request touched the static cache"
    _assert_same(eager.process(_greedy(*PROMPTS[0])), static.process(_greedy(*PROMPTS[0])), tol=1e-5)
    assert static.decoder._cache is not None


def test_each_step_is_queued_before_the_host_reads_the_token_it_appends(monkeypatch):
    """The engine hands the chosen token to the next step as a device tensor and reads it on the host only after
    that step is queued (so the host's per-token work overlaps the GPU's step). A generation cut by a stop
    sequence has queued one step it did not need; the next request starts from a reset cache regardless."""
    eager = engine()
    static = _twin(eager, decode="static")
    calls: list[str] = []
    step, read = static.decoder.step, static._read

    def logged_step(token):
        calls.append("step(tensor)" if isinstance(token, torch.Tensor) else "step(int)")
        return step(token)

    def logged_read(pending, k):
        calls.append("read")
        return read(pending, k)

    monkeypatch.setattr(static.decoder, "step", logged_step)
    monkeypatch.setattr(static, "_read", logged_read)
    prompt, n = PROMPTS[0]
    full = static.process(_greedy(prompt, n))
    assert len(full.tokens) == n, "an end of sequence came early: pick a prompt that runs to max_new_tokens"
    assert calls == ["step(tensor)", "read"] * (n - 1) + ["read"]
    _assert_same(eager.process(_greedy(prompt, n)), full, tol=1e-5)

    calls.clear()
    stop = next(t.text for t in full.tokens[2:] if t.text.strip() and full.text.find(t.text) > 0)
    cut = static.process(_greedy(prompt, n, stop_sequences=[stop]))
    assert cut.text == full.text[: full.text.find(stop)]
    assert calls[-2:] == ["step(tensor)", "read"]  # the step after the stop's token was queued, then unused
    for prompt, n in PROMPTS[1:]:
        _assert_same(eager.process(_greedy(prompt, n)), static.process(_greedy(prompt, n)), tol=1e-5)


def test_compiled_step_equals_eager():
    """The compiled_graph mode's step (torch.compile of the static-cache step), here without the graph: the same
    tokens and logprobs as eager, across requests that reuse the caches, one compiled graph per cache length."""
    eager = engine()
    compiled = _twin(eager, decode="static")
    compiled.decoder = StaticDecoder(compiled.model, compiled.cfg.max_context,
                                     tuple(compiled.cfg.decode_cache_lengths), compile_step=True)
    torch._dynamo.reset()
    for prompt, n in PROMPTS[:3]:
        request = _greedy(prompt, n)
        _assert_same(eager.process(request), compiled.process(request), tol=1e-4)
    assert len(compiled.decoder._caches) == 3  # three cache lengths: the step compiled for each
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3


@pytest.mark.parametrize(("lengths", "graphs"), [("one", 1), ("each", 2)])
def test_compiled_layers_step_equals_eager_with_one_graph_for_all_layers(lengths, graphs):
    """compiled_layers' step (each decoder layer's forward compiled, routed only inside the step), without the
    graph: the eager tokens and logprobs across requests and cache lengths; one compiled graph for all the layers
    (the layer index never reaches a guard): for every cache length (`one`, the slot dimension dynamic) or per
    length (`each`); prefills and the eager decoders untouched."""
    from birbal.serve.regional import compiled_graph_count

    eager = engine()
    layers = _twin(eager, decode="static")
    layers.decoder = StaticDecoder(layers.model, layers.cfg.max_context, (16,), compile_step="layers",
                                   compile_lengths=lengths)
    assert len(layers.model.model.layers) >= 2
    torch._dynamo.reset()
    before = compiled_graph_count()
    for prompt, n in (PROMPTS[2], PROMPTS[0], PROMPTS[2]):  # 16 slots, then max_context, then 16 again
        request = _greedy(prompt, n)
        _assert_same(eager.process(request), layers.process(request), tol=1e-4)
    assert sorted(layers.decoder._caches) == [16, layers.cfg.max_context]
    assert compiled_graph_count() - before == graphs
    _assert_same(eager.process(_greedy(*PROMPTS[1])), _twin(eager, decode="static").process(_greedy(*PROMPTS[1])),
                 tol=1e-5)  # the same layers outside the step: eager, no new graph
    assert compiled_graph_count() - before == graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["cuda_graph", "compiled_layers", "compiled_graph", "compiled_layers+grouped"])
def test_cuda_graph_equals_eager_on_cuda(mode):
    cfg = serve_cfg(postprocess="none", device="cuda")
    mode, _, attention = mode.partition("+")
    graph = Engine.from_merged(merged_folder(), cfg.model_copy(update={"decode": mode,
                                                                       "decode_attention": attention or "sdpa"}))
    assert graph.decode_mode == mode
    eager = Engine(graph.model, graph.tokenizer, cfg.model_copy(update={"decode": "eager"}))
    static = Engine(graph.model, graph.tokenizer, cfg.model_copy(update={"decode": "static"}))
    graph.warm_up()
    captured = dict(graph.decoder._graphs)
    assert sorted(captured) == [16, 64, cfg.max_context]  # one graph per cache length, all in the warm-up
    if mode == "compiled_layers":  # one compiled layer for every cache length, not one per layer (it has several)
        assert len(graph.model.model.layers) >= 2 and graph.warmup_compiled_graphs == 1
    for prompt, n in PROMPTS + PROMPTS[::-1]:
        request = _greedy(prompt, n)
        replayed = graph.process(request)
        assert graph.decoder._graphs == captured  # the same graphs, replayed for every later request
        _assert_same(static.process(request), replayed, tol=1e-5)  # the same kernels, replayed
        _assert_same(eager.process(request), replayed, tol=1e-3)
        _assert_matches_reference(graph, request)
    ask = dict(prompt=PROMPTS[0][0], temperature=0.8, top_k=20, max_new_tokens=12, seed=3)
    _assert_same(static.process(ProcessRequest(**ask)), graph.process(ProcessRequest(**ask)), tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("temperature", [GREEDY, 0.8])
def test_choosing_a_token_and_queuing_the_next_step_never_wait_for_the_gpu(temperature):
    """What lets the host's per-token work overlap the GPU's step: between the logits and the next replay nothing
    synchronises (CUDA's sync debug mode turns any synchronising call into an error)."""
    cfg = serve_cfg(postprocess="none", device="cuda", decode="cuda_graph")
    eng = Engine.from_merged(merged_folder(), cfg)
    eng.warm_up()
    request = ProcessRequest(prompt=PROMPTS[0][0], temperature=temperature, top_k=20, top_p=0.9, seed=1,
                             max_new_tokens=8, top_k_per_token=3)
    ids = eng.encode(request.prompt)
    sampling = eng._sampling(request)
    with torch.inference_mode():
        last = eng.decoder.prefill(ids, all_positions=False, reserve=len(ids) + 8)[-1]
        torch.cuda.synchronize()
        for _ in range(4):
            torch.cuda.set_sync_debug_mode("error")
            try:
                pending = eng._choose(last, sampling, 3)
                last = eng.decoder.step(pending.token)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            eng._read(pending, 3)
    assert eng.process(request).text == eng.process(request).text  # and a whole request still runs, seeded


def test_a_failing_warm_up_names_the_decode_path_and_the_way_out():
    static = _twin(engine(), decode="static")
    static.decoder = StaticDecoder(static.model, max_len=4)  # too small for the warm-up prompt
    with pytest.raises(ServeError, match=r"the static decode path failed its warm-up .*serve.decode=eager"):
        static.warm_up()
    assert static.warmup_s is None
    assert _twin(engine(), decode="static").warm_up() > 0


_RESTART = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from birbal.serve.stage import use_compile_cache
use_compile_cache(Path(sys.argv[1]))  # the serve stage's own setting: <run>/cache/inductor
import torch
from torch._dynamo.utils import counters
from serve_model import engine, serve_cfg
from birbal.serve.decode import StaticDecoder
from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest
eng = Engine(engine().model, engine().tokenizer, serve_cfg(postprocess="none", decode="static"))
eng.decoder = StaticDecoder(eng.model, eng.cfg.max_context, (16,), compile_step="layers")
out = eng.process(ProcessRequest(prompt="Hi", temperature=1e-7, max_new_tokens=4, top_k_per_token=2))
print(json.dumps({"text": out.text, "logprobs": [t.logprob for t in out.tokens],
                  "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])}))
"""


def test_a_restart_reuses_the_runs_compile_cache(tmp_path):
    """Two server processes on one run's compile cache (`use_compile_cache`: <run>/cache/inductor): the first
    compiles the decoder layer (cache misses, kernels saved there), the second loads it (hits, no miss), with the
    same answer."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    tests = str(Path(__file__).parent)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _RESTART, str(tmp_path / "cache"), tests], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert (tmp_path / "cache" / "inductor").is_dir()
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 1 and not cold["inductor"].get("fxgraph_cache_hit")
    assert warm["aot"].get("autograd_cache_hit", 0) + warm["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert not warm["inductor"].get("fxgraph_cache_miss") and not warm["aot"].get("autograd_cache_miss")
    assert warm["text"] == cold["text"] and warm["logprobs"] == pytest.approx(cold["logprobs"], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_attention_equals_sdpa(dtype):
    """serve.decode_attention=grouped against transformers' SDPA path (which expands the KV heads), one query
    token over a masked cache: the same output up to float rounding; a prompt (several queries) is SDPA itself."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from birbal.serve.attention import grouped_decode_attention

    gen = torch.Generator().manual_seed(0)
    attn = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)  # what both read of the module
    q = torch.randn(1, 8, 1, 16, generator=gen).to(dtype)
    k, v = (torch.randn(1, 2, 40, 16, generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool)
    mask[..., :29] = True  # 29 slots filled, the rest of the static cache empty
    ours, _ = grouped_decode_attention(attn, q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, 1, 8, 16)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol)
    wrong = grouped_decode_attention(attn, q, k, v, torch.ones_like(mask), scaling=0.25)[0]
    assert (wrong.float() - theirs.float()).abs().max() > 10 * tol  # the mask matters: the check can fail
    prompt_q = torch.randn(1, 8, 5, 16, generator=gen).to(dtype)
    torch.testing.assert_close(grouped_decode_attention(attn, prompt_q, k[:, :, :5], v[:, :, :5], None)[0],
                               sdpa_attention_forward(attn, prompt_q, k[:, :, :5], v[:, :, :5], None)[0])


def test_grouped_decode_attention_serves_the_static_path_with_the_same_answers():
    from transformers import AttentionInterface

    from birbal.serve import attention

    plain = _twin(engine(), decode="static")
    grouped = Engine.from_merged(merged_folder(), serve_cfg(postprocess="none", decode="static",
                                                            decode_attention="grouped"))
    assert grouped.model.config._attn_implementation == attention.NAME
    taken = []

    def counted(module, query, key, value, mask, **kwargs):
        taken.append(query.shape[2] == 1 and mask is not None and mask.dtype == torch.bool)
        return attention.grouped_decode_attention(module, query, key, value, mask, **kwargs)

    AttentionInterface.register(attention.NAME, counted)
    try:
        for prompt, n in PROMPTS[:2]:
            _assert_same(plain.process(_greedy(prompt, n)), grouped.process(_greedy(prompt, n)), tol=1e-4)
    finally:
        AttentionInterface.register(attention.NAME, attention.grouped_decode_attention)
    assert any(taken) and not all(taken)  # decode steps took the grouped path, prompts SDPA's


def test_one_length_update_a_step_writes_and_answers_as_each_layers_own():
    """serve.decode_length_update step (each layer's write leaves its length alone; one `_foreach_add_` after the
    step advances all of them), with decode_combo_kernels asked for (combo kernels are Triton code: the
    GPU test covers each alone and both): the same tokens and logprobs as the
    compiled layers' own updates, bitwise (the same compiled maths over the same positions), across requests and
    cache lengths; every layer's length is the positions filled after each request (a missed or doubled increment
    would put the next key in the wrong slot)."""
    eager = engine()
    each = _twin(eager, decode="static")
    each.decoder = StaticDecoder(each.model, each.cfg.max_context, (16,), compile_step="layers",
                                 compile_lengths="each")
    once = _twin(eager, decode="static")
    once.decoder = StaticDecoder(once.model, once.cfg.max_context, (16,), compile_step="layers",
                                 compile_lengths="each", combo_kernels=True, length_update="step")
    for prompt, n in (PROMPTS[2], PROMPTS[0], PROMPTS[2]):  # 16 slots, then max_context, then 16 again
        request = _greedy(prompt, n)
        a, b = each.process(request), once.process(request)
        _assert_same(a, b, tol=0.0)
        _assert_same(eager.process(request), b, tol=1e-4)
        filled = len(once.encode(prompt)) + len(b.tokens) - 1  # the last token is chosen, not written
        lengths = {int(layer.cumulative_length) for layer in once.decoder._cache.layers}
        assert lengths == {filled} == {int(each.decoder._cache.layers[0].cumulative_length)}


def test_the_rotary_tables_and_the_final_norm_compile_as_their_own_regions():
    """serve.decode_compile_rest: inside the step the rotary embedding and the final norm run compiled (one graph
    each, besides the layers' one), with the tokens and logprobs of the plain compiled layers up to Inductor's
    rounding; outside the step (prefills, other decoders) they stay eager: no further graph."""
    from birbal.serve.regional import REST, RegionalLayers, compiled_graph_count

    eager = engine()
    plain = _twin(eager, decode="static")
    plain.decoder = StaticDecoder(plain.model, plain.cfg.max_context, (), compile_step="layers",
                                  compile_lengths="each")
    rest = _twin(eager, decode="static")
    rest.decoder = StaticDecoder(rest.model, rest.cfg.max_context, (), compile_step="layers",
                                 compile_lengths="each", compile_rest=True)
    assert set(RegionalLayers.install(rest.model).rest) == set(REST)
    request = _greedy(*PROMPTS[0])
    want = plain.process(request)
    torch._dynamo.reset()
    before = compiled_graph_count()
    got = rest.process(request)
    assert compiled_graph_count() - before == 3  # the layer, the rotary tables, the final norm
    _assert_same(want, got, tol=1e-5)
    _assert_same(eager.process(request), got, tol=1e-4)
    _assert_same(eager.process(_greedy(*PROMPTS[2])), _twin(eager, decode="static").process(_greedy(*PROMPTS[2])),
                 tol=1e-5)  # the same modules outside the step: eager, no new graph
    assert compiled_graph_count() - before == 3


def test_the_compiled_layer_forms_are_refused_outside_compiled_layers():
    eng = engine()
    with pytest.raises(ServeError, match="need serve.decode=compiled_layers"):
        StaticDecoder(eng.model, 64, (16,), length_update="step")
    with pytest.raises(ServeError, match="need serve.decode=compiled_layers"):
        StaticDecoder(eng.model, 64, (16,), compile_step="model", combo_kernels=True)
    with pytest.raises(ServeError, match="need serve.decode=compiled_layers"):
        StaticDecoder(eng.model, 64, (16,), compile_rest=True)
    with pytest.raises(ServeError, match="decode_length_update must be layer or step"):
        StaticDecoder(eng.model, 64, (16,), compile_step="layers", length_update="token")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("forms", ["step", "combo", "step+combo", "rest", "step+combo+rest"])
def test_compiled_layer_forms_equal_eager_on_cuda_with_fewer_kernels(forms):
    """compiled_layers in its CUDA graph with serve.decode_length_update step, decode_combo_kernels and/or
    decode_compile_rest: the static path's and the eager model's answers, as test_cuda_graph_equals_eager_on_cuda
    checks the graph; and each replayed step launches fewer kernels than the plain compiled layers' (step: one
    increment instead of one a layer; rest: the rotary's and the norm's dozen or so eager kernels become two)."""
    cfg = serve_cfg(postprocess="none", device="cuda", decode="compiled_layers")
    update = {"decode_length_update": "step" if "step" in forms else "layer", "decode_combo_kernels": "combo" in forms,
              "decode_compile_rest": "rest" in forms}
    graph = Engine.from_merged(merged_folder(), cfg.model_copy(update=update))
    plain = Engine(graph.model, graph.tokenizer, cfg)
    static = Engine(graph.model, graph.tokenizer, cfg.model_copy(update={"decode": "static"}))
    eager = Engine(graph.model, graph.tokenizer, cfg.model_copy(update={"decode": "eager"}))
    for eng in (graph, plain):
        eng.warm_up()
    for prompt, n in PROMPTS + PROMPTS[::-1]:
        request = _greedy(prompt, n)
        replayed = graph.process(request)
        _assert_same(plain.process(request), replayed, tol=1e-5)
        _assert_same(static.process(request), replayed, tol=1e-5)
        _assert_same(eager.process(request), replayed, tol=1e-3)
        _assert_matches_reference(graph, request)
    layers = len(graph.model.model.layers)
    fewer = _kernels_per_replay(plain) - _kernels_per_replay(graph)
    needed = (layers - 1 if "step" in forms else 0) + (6 if "rest" in forms else 0) + ("combo" in forms)
    assert fewer >= max(needed, 1), fewer


def _kernels_per_replay(eng: Engine) -> int:
    """Kernels one replay of the engine's 64-slot step graph launches (the profiler's CUDA kernel events)."""
    from torch.profiler import ProfilerActivity, profile

    graph, _logits = eng.decoder._graphs[64]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
