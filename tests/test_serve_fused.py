"""serve.decode_fuse=projections (birbal.serve.fused): q/k/v and gate/up as one product each, the LoRA A matrices
likewise, against the unfused model, merged and unmerged, on the tiny random Mistral (fp32 and bf16 on CPU; the
CUDA graphs in bf16 and fp32 with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
from serve_model import engine, merged_folder, serve_cfg
from test_serve_upstream import adapter_folder
from torch.utils._python_dispatch import TorchDispatchMode

from birbal.config import load_recipe
from birbal.models import unwrap_peft
from birbal.serve.decode import StaticDecoder
from birbal.serve.engine import Engine
from birbal.serve.schemas import ProcessRequest

PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.linear.default)
PROMPTS = [("The capital of France is", 10), ("one two three four five six seven eight " * 4, 14), ("Hi", 3)]


class _Products(TorchDispatchMode):
    """Counts the matrix products a forward runs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in PRODUCTS
        return func(*args, **(kwargs or {}))


def _engine(kind: str, fuse: str, shape: str = "tiny", **changes) -> Engine:
    """The tiny model (`shape` "7b-layers": serve_model's two Mistral-7B-shaped layers) served with `decode_fuse`
    `fuse`; its products through cuBLAS (`decode_gemv` cublas, not the profile's triton) and the compiled step in
    its plain form (the profile's decode_gemv_glu, combo kernels, length update and rest regions off) unless
    `changes` says otherwise."""
    cfg = serve_cfg(**{"postprocess": "none", "request_policy": "kit", "decode": "static", "decode_fuse": fuse,
                       "decode_gemv": "cublas", "decode_gemv_glu": False, "decode_combo_kernels": False,
                       "decode_length_update": "layer", "decode_compile_rest": False, **changes})
    if kind == "merged":
        return Engine.from_merged(merged_folder(shape), cfg)
    return Engine.from_adapter(str(merged_folder(shape)), adapter_folder(shape), engine().tokenizer, cfg)


def _request(prompt: str, n: int) -> ProcessRequest:
    return ProcessRequest(prompt=prompt, temperature=1e-7, max_new_tokens=n, top_k_per_token=3)


def _assert_same(a, b, tol: float) -> None:
    assert a.text == b.text
    assert [t.logprob for t in a.tokens] == pytest.approx([t.logprob for t in b.tokens], abs=tol)
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert x.top_logprob.keys() == y.top_logprob.keys()
        assert list(x.top_logprob.values()) == pytest.approx(list(y.top_logprob.values()), abs=tol)


def _products_per_step(eng: Engine) -> int:
    counter = _Products()
    with torch.inference_mode():
        eng.decoder.prefill(eng.encode("Hi there"), all_positions=False, reserve=8)
        with counter:
            eng.decoder.step(5)
    return counter.count


@pytest.mark.parametrize(("kind", "mode", "gemv", "unfused", "fused", "groups"),
                         [("merged", "projections", "cublas", 7, 4, 2), ("adapter", "projections", "lora_a", 21, 15, 2),
                          ("merged", "lora", "all", 7, 4, 4), ("adapter", "lora", "cublas", 21, 8, 4),
                          ("adapter", "lora", "all", 21, 8, 4)])
def test_fused_projections_give_the_same_answers_with_fewer_products(kind, mode, gemv, unfused, fused, groups):
    """The same tokens and logprobs as the unfused model, eager steps and compiled layers (one graph for all the
    layers), with q/k/v and gate/up one product each (the adapter: their base weights and their LoRA A matrices;
    each B its own; `lora`: each B in its base's product, o_proj's and down_proj's too), the state dict
    unchanged and the weights no larger (views of the fused matrix; `lora` adds the zero blocks beside each B).
    serve.decode_gemv writes the compiled step's products (LoRA A's, or all) as fp32 multiply-and-sum: the
    compiled answers stay the eager ones (eager steps, outside a compile, keep F.linear)."""
    from birbal.serve.regional import compiled_graph_count

    plain, fast = _engine(kind, "none"), _engine(kind, mode, decode_gemv=gemv)
    layers = len(fast.model.get_base_model().model.layers if kind == "adapter" else fast.model.model.layers)
    assert layers >= 2 and plain.fused is None
    assert fast.fused == {"mode": mode, "gemv": gemv, "split_input": False, "glu": False, "fused": groups * layers,
                          "skipped": {}}
    assert _products_per_step(plain) == unfused * layers + 1  # + lm_head
    assert _products_per_step(fast) == fused * layers + 1
    plain_state, fast_state = plain.model.state_dict(), fast.model.state_dict()
    assert plain_state.keys() == fast_state.keys()
    assert all(torch.equal(plain_state[k], fast_state[k]) for k in plain_state)

    def storage_bytes(model):
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in
                    [*model.parameters(), *model.buffers()]}.values())

    extra = 0
    if mode == "lora" and kind == "adapter":  # q/k/v: each B beside the base, zeros beside the others' (gate/up too)
        cfg = plain.model.get_base_model().config
        r = plain.model.peft_config["default"].r
        kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
        extra = layers * 4 * r * ((cfg.hidden_size + 2 * kv) * 2 + 2 * cfg.intermediate_size)  # fp32
    assert storage_bytes(fast.model) == storage_bytes(plain.model) + extra
    compiled = Engine(fast.model, fast.tokenizer, fast.cfg)
    compiled.decoder = StaticDecoder(fast.model, fast.cfg.max_context, (64,), compile_step="layers")
    torch._dynamo.reset()
    before = compiled_graph_count()
    for prompt, n in PROMPTS:
        expected = plain.process(_request(prompt, n))
        _assert_same(expected, fast.process(_request(prompt, n)), tol=1e-5)
        _assert_same(expected, compiled.process(_request(prompt, n)), tol=1e-4)
    assert compiled_graph_count() - before == 1  # one graph for all the layers and cache lengths (lengths "one")


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_fused_projections_in_bf16_stay_within_rounding(kind):
    """bf16: the fused model's logits over a prompt are the unfused model's up to bf16 rounding."""
    plain, fast = _engine(kind, "none", dtype="bfloat16"), _engine(kind, "projections", dtype="bfloat16")
    ids = torch.tensor([plain.encode(PROMPTS[1][0])])
    with torch.inference_mode():
        a, b = (e.model(input_ids=ids).logits.float() for e in (plain, fast))
    assert not torch.equal(a, torch.zeros_like(a))
    assert (a - b).abs().max().item() <= 0.02 * a.abs().max().item()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_lora_member_outside_its_group_runs_peft_forward():
    """k_proj called on its own (not after q_proj on the same input), or in training mode: peft's own forward
    over the same weights."""
    fast = _engine("adapter", "projections")
    attn = fast.model.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 3, attn.q_proj.in_features)
    with torch.inference_mode():
        lone = attn.k_proj(x)
        k = attn.k_proj
        expected = k.base_layer(x) + k.lora_B["default"](k.lora_A["default"](x)) * k.scaling["default"]
        assert torch.allclose(lone, expected, atol=1e-6)
        q_first, k_after = attn.q_proj(x), attn.k_proj(x)  # the group's way: one product, the slice handed over
        assert torch.allclose(k_after, expected, atol=1e-5)
        assert q_first.shape[-1] == attn.q_proj.out_features
        assert attn.v_proj(torch.randn_like(x)).shape[-1] == attn.v_proj.out_features  # another input: its own
    fast.model.train()
    torch.manual_seed(0)
    trained = attn.k_proj(x)
    torch.manual_seed(0)
    peft_own = attn.k_proj._birbal_peft_forward(x)
    assert torch.equal(trained, peft_own)  # dropout active: peft's path, the same random mask


def test_groups_that_cannot_fuse_exactly_are_left_as_they_are():
    """An fp32 adapter on a bf16 base (serve.adapter_dtype: float32) cannot share the base's product: every group
    is left unfused, with the reason, and the answers are the unfused model's."""
    plain = _engine("adapter", "none", dtype="bfloat16", adapter_dtype="float32")
    fast = _engine("adapter", "projections", dtype="bfloat16", adapter_dtype="float32")
    layers = len(fast.model.get_base_model().model.layers)
    assert fast.fused["fused"] == 0 and sum(fast.fused["skipped"].values()) == 2 * layers
    assert all("dtype" in reason for reason in fast.fused["skipped"])
    _assert_same(plain.process(_request(*PROMPTS[0])), fast.process(_request(*PROMPTS[0])), tol=0.0)


def _errors_against(reference_engine: Engine, eng: Engine, prompt: str, n: int) -> tuple[list[float], list[float]]:
    """|logprob - the reference's| per generated token, with the reference teacher-forced over the same tokens; and,
    for each token that is not the reference's argmax, the reference's margin (its argmax's logprob minus the
    chosen token's)."""
    ids = eng.encode(prompt)
    tokens, generated = eng._run(ids, _request(prompt, n), stops=[])
    assert generated, "nothing generated: the check would be empty"
    with torch.inference_mode():
        logits = reference_engine.model(input_ids=torch.tensor([ids + generated], device=eng.device)).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    errors, flips = [], []
    for step, (token, token_id) in enumerate(zip(tokens, generated, strict=True)):
        row = reference[len(ids) - 1 + step]
        if token_id != int(torch.argmax(row)):
            flips.append(row.max().item() - row[token_id].item())
        errors.append(abs(token.logprob - row[token_id].item()))
    return errors, flips


def _check_fused_against_eager(kind: str, mode: str, dtype: str, device: str, decode: str,
                               gemv: str = "cublas", attention: str = "grouped", split_input: bool = False,
                               glu: bool = False, forms: dict | None = None, shape: str = "tiny") -> None:
    """The fused engine (`decode`: compiled_layers in a CUDA graph on a GPU; on CPU static decode with the layers
    compiled, the same compiled forward without the graph; its products as `serve.decode_gemv` says) against the
    unfused eager model, with today's unfused path of the same decode as the yardstick: see the GPU test's
    docstring. `forms`: more serve settings of the fused engine (decode_combo_kernels, decode_length_update,
    decode_compile_rest). `shape`: the model `_engine` builds."""
    # one cache length (max_context): one compile per engine, so that the four GPU cases fit a short GPU call
    changes = dict(device=device, dtype=dtype, decode_cache_lengths=[], decode_attention="grouped", decode=decode)
    fast = _engine(kind, mode, shape, decode_gemv=gemv, decode_gemv_split_input=split_input, decode_gemv_glu=glu,
                   **{**changes, "decode_attention": attention, **(forms or {})})
    assert fast.fused["gemv"] == gemv and fast.fused["split_input"] == split_input and fast.fused["glu"] == glu
    if glu:
        assert fast.fused["glu_mlps"] == len(unwrap_peft(fast.model).model.layers)
    if gemv == "triton" and device == "cuda":  # the hand-written kernel, lm_head's product included
        assert fast.fused["gemv_kernel"] == fast.fused["lm_head"] == "birbal::gemv (Triton)"
    if attention == "triton" and device == "cuda":  # birbal.serve.flash_decode's kernels
        assert fast.attention == "birbal::decode_attention (Triton)"
    today = _engine(kind, "none", shape, **changes)
    plain = _engine(kind, "none", shape, **{**changes, "decode": "eager"})
    for eng in (fast, today):
        if decode == "static":  # CPU: the compiled layers without the graph
            eng.decoder = StaticDecoder(eng.model, eng.cfg.max_context, (), compile_step="layers",
                                        compile_lengths="each", combo_kernels=eng.cfg.decode_combo_kernels,
                                        length_update=eng.cfg.decode_length_update,
                                        compile_rest=eng.cfg.decode_compile_rest)
        eng.warm_up()
    assert fast.decode_mode == today.decode_mode == decode
    assert _products_per_step_graphless(fast) < _products_per_step_graphless(today)
    worst, flips = {"fast": 0.0, "today": 0.0}, {"fast": [], "today": []}
    for prompt, n in PROMPTS + PROMPTS[::-1]:
        if dtype == "float32":
            _assert_same(plain.process(_request(prompt, n)), fast.process(_request(prompt, n)), tol=1e-3)
        for name, eng in (("fast", fast), ("today", today)):
            errors, margins = _errors_against(plain, eng, prompt, n)
            worst[name] = max(worst[name], *errors)
            flips[name] += margins
    bound = max(2 * worst["today"], 0.02)
    assert worst["fast"] <= bound, worst
    # A clear choice: a margin (the eager model's argmax over the chosen token) that no two tokens' errors within
    # the bound can overturn (each logprob off by at most `bound`), and never under 0.05. The fast path takes another token where the choice is clear no more
    # often than today's path does.
    clear = max(0.05, 2 * bound)
    wrong = {name: sum(m > clear for m in margins) for name, margins in flips.items()}
    print(f"served step {kind}/{mode}/{dtype}/{shape}: worst logprob errors {worst}, bound {bound:.4f}; margins of "
          f"another choice {flips}")  # the figures, for a GPU run's record (pytest -s or -rP)
    assert wrong["fast"] <= wrong["today"], (f"clear choices (margin over {clear:.4f}) not the eager model's: {wrong}; "
                                             f"worst logprob errors {worst}; every margin of another choice {flips}")


@pytest.mark.parametrize(("kind", "mode", "dtype", "gemv"), [("adapter", "lora", "bfloat16", "lora_a"),
                                                             ("merged", "projections", "float32", "cublas")])
def test_fused_compiled_layers_equal_eager_on_cpu(kind, mode, dtype, gemv):
    """The GPU test's checks on CPU (the compiled layers without the CUDA graph): what runs before the graph does."""
    _check_fused_against_eager(kind, mode, dtype, "cpu", "static", gemv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("kind", "mode", "dtype", "gemv", "attention"), [
    ("adapter", "lora", "bfloat16", "cublas", "grouped"), ("merged", "projections", "bfloat16", "cublas", "grouped"),
    ("adapter", "lora", "float32", "cublas", "grouped"),
    ("adapter", "lora", "bfloat16", "lora_a", "grouped"), ("adapter", "lora", "float32", "lora_a", "grouped"),
    ("adapter", "lora", "bfloat16", "triton", "grouped"), ("adapter", "lora", "float32", "triton", "grouped"),
    ("merged", "projections", "bfloat16", "triton", "grouped"),  # birbal-4090's and plus's served step
    ("adapter", "lora", "bfloat16", "triton", "triton"), ("adapter", "lora", "float32", "triton", "triton"),
    ("merged", "projections", "bfloat16", "triton", "triton")])  # with decode_attention: triton
def test_fused_compiled_layers_graph_equals_eager_on_cuda(kind, mode, dtype, gemv, attention):
    """The served path on a GPU (compiled_layers in a CUDA graph, grouped attention) with the projections fused,
    against the unfused eager model: in fp32 the same tokens and logprobs within the compiled-vs-eager tests' 1e-3;
    in bf16 (the served dtype) each token's logprob within bf16 rounding of the eager model's over the same tokens,
    no further off than today's unfused compiled_layers path is (twice its worst error, or 0.02), and the eager
    model's choice wherever it is clear (a margin over 0.05 and over twice that bound) as often as today's path
    makes it. `gemv` lora_a: the LoRA A products as Inductor's Triton reductions (serve.decode_gemv); triton: those,
    and every other one-row product through birbal.serve.gemv's kernel, birbal-4090's and plus's served path.
    `attention` triton: the decode steps' attention as birbal.serve.flash_decode's kernels instead of grouped's."""
    _check_fused_against_eager(kind, mode, dtype, "cuda", "compiled_layers", gemv, attention)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_split_input_graph_equals_eager_on_cuda(dtype):
    """birbal-4090's served step with serve.decode_gemv_split_input (each [W, B] product over [x, scaling * A x]
    read in place by the kernel's gemv2) against the eager model, as the test above checks the served step."""
    _check_fused_against_eager("adapter", "lora", dtype, "cuda", "compiled_layers", "triton", "grouped", True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("kind", "mode", "dtype"), [("adapter", "lora", "bfloat16"), ("adapter", "lora", "float32"),
                                                     ("merged", "projections", "bfloat16")])
def test_glu_graph_equals_eager_on_cuda(kind, mode, dtype):
    """The served step with serve.decode_gemv_glu (the gate/up product's kernel writes silu(gate) * up, with the
    split input where the products are [W, B] under decode_fuse lora; merged projections have no split input)
    against the eager model, as the test above checks the served step."""
    _check_fused_against_eager(kind, mode, dtype, "cuda", "compiled_layers", "triton", "grouped", mode == "lora",
                               True)


FORMS = ("decode_combo_kernels", "decode_length_update", "decode_compile_rest")


def _profile_check(profile: str, device: str, shape: str = "tiny") -> None:
    """`profile`'s serve section through `_check_fused_against_eager` on `device`, on the model of `shape`."""
    serve = load_recipe(profile).serve
    kind = "adapter" if serve.model == "adapter" else "merged"
    decode = "static" if device == "cpu" else "compiled_layers" if serve.decode == "auto" else serve.decode
    _check_fused_against_eager(kind, serve.decode_fuse, "bfloat16", device, decode, serve.decode_gemv,
                               serve.decode_attention, serve.decode_gemv_split_input, serve.decode_gemv_glu,
                               {k: getattr(serve, k) for k in (*FORMS, "decode_compile_lengths")}, shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("profile", ["birbal-4090", "birbal-4090-plus"])
def test_each_profiles_served_step_equals_eager_on_cuda(profile):
    """Each profile's own decode settings together, on the tiny model of its kind (the adapter unmerged for
    birbal-4090, merged for plus), in bf16 against the eager model as the tests above check the served step. (Its
    earlier cases "birbal-4090+forms" and "birbal-4090+rest", birbal-4090 with a form of plus's, passed on the H200
    on 2026-12-02 and turned those forms on in birbal-4090.)"""
    _profile_check(profile, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("profile", ["birbal-4090", "birbal-4090-plus"])
def test_each_profiles_served_step_equals_eager_at_the_7b_layer_shape_on_cuda(profile):
    """The test above at Mistral-7B's layer shape (serve_model.SEVEN_B_LAYERS: two of its layers, its vocabulary,
    a LoRA of birbal-4090's r=128 for the unmerged adapter): the Triton GEMV's tiles over K = 4096 and 14336 and
    N up to 2 x 14336 + the LoRA rows, the decode attention's 32 heads over 8 KV heads, the fused MLP's and the
    combo kernels' real sizes, each checked against the eager model, as no tiny shape can."""
    _profile_check(profile, "cuda", "7b-layers")


def test_birbal_4090_served_step_equals_eager_on_cpu():
    """The GPU test's birbal-4090 case on CPU (the compiled layers without the graph or the kernels, the length
    advanced once a step, Inductor's combo kernels asked for, the rest regions compiled): what runs before the
    graph does."""
    _profile_check("birbal-4090", "cpu")


@pytest.mark.parametrize(("kind", "mode"), [("adapter", "lora"), ("merged", "projections")])
def test_glu_is_installed_and_changes_nothing_without_cuda(kind, mode):
    """Every layer's MLP takes serve.decode_gemv_glu's forward (a SiLU MLP whose gate/up are one fused product of
    ours); on CPU the kernel does not run, so the answers are the switch-off engine's exactly. Under decode_fuse
    projections over the adapter (each LoRA B added after the fused product) it is installed nowhere."""
    glu = _engine(kind, mode, decode_gemv="triton", decode_gemv_glu=True)
    plain = _engine(kind, mode, decode_gemv="triton")
    layers = unwrap_peft(glu.model).model.layers
    assert glu.fused["glu_mlps"] == len(layers) and "glu_mlps" not in plain.fused
    assert all("forward" in vars(layer.mlp) for layer in layers)
    for prompt, n in PROMPTS[:2]:
        _assert_same(plain.process(_request(prompt, n)), glu.process(_request(prompt, n)), tol=0.0)
    if kind == "adapter":
        unfit = _engine(kind, "projections", decode_gemv="triton", decode_gemv_glu=True)
        assert unfit.fused["glu_mlps"] == 0
        assert not any("forward" in vars(layer.mlp) for layer in unwrap_peft(unfit.model).model.layers)


def test_split_input_is_recorded_and_changes_nothing_without_cuda():
    """On CPU the kernel does not run, so the switch changes no answer; the fused report records it, and an
    engine asking for the other setting over the same fused model is refused, not silently served."""
    from birbal.errors import ServeError
    from birbal.serve.fused import fuse_projections

    split = _engine("adapter", "lora", decode_gemv="triton", decode_gemv_split_input=True)
    plain = _engine("adapter", "lora", decode_gemv="triton")
    assert split.fused["split_input"] is True and plain.fused["split_input"] is False
    for prompt, n in PROMPTS[:2]:
        _assert_same(plain.process(_request(prompt, n)), split.process(_request(prompt, n)), tol=0.0)
    with pytest.raises(ServeError, match="split input"):
        fuse_projections(split.model, "lora", "triton", split_input=False)


def _products_per_step_graphless(eng: Engine) -> int:
    """The products of one step over the model (the eager decoder of the same engine's model)."""
    counter = _Products()
    with torch.inference_mode():
        eng.prefill_only.prefill(eng.encode("Hi there"), all_positions=False)
        with counter:
            eng.prefill_only.step(5)
    return counter.count


def test_decode_gemv_needs_fused_projections():
    from birbal.errors import ServeError

    with pytest.raises(ServeError, match="decode_fuse"):
        _engine("merged", "none", decode_gemv="all")
    # the kernel's forms without the kernel: refused, not silently ignored
    with pytest.raises(ServeError, match="decode_gemv_glu is a form of decode_gemv triton"):
        _engine("merged", "projections", decode_gemv="lora_a", decode_gemv_glu=True)
    with pytest.raises(ServeError, match="decode_gemv_split_input .* under decode_fuse lora"):
        _engine("adapter", "projections", decode_gemv="triton", decode_gemv_split_input=True)


def test_decode_compile_mode_reaches_the_compiled_layers():
    """serve.decode_compile_mode goes to the decoder and picks the layers' compiled form; an unknown mode is a
    one-line error (no compile runs here: the forms are built lazily)."""
    from birbal.errors import ServeError
    from birbal.serve.decode import make_decoder
    from birbal.serve.regional import RegionalLayers

    eng = _engine("merged", "none")
    decoder = StaticDecoder(eng.model, 64, (16,), compile_step="layers", compile_mode="max-autotune-no-cudagraphs")
    assert decoder.compile_mode == "max-autotune-no-cudagraphs"
    regional = RegionalLayers.install(eng.model)
    assert regional.compiled_for("each", "max-autotune-no-cudagraphs") is regional.compiled_for(
        "each", "max-autotune-no-cudagraphs") is not regional.compiled_for("each")
    with pytest.raises(ServeError, match="decode_compile_mode"):
        make_decoder("compiled_layers", eng.model, 64, compile_mode="fastest")
    assert serve_cfg(decode_compile_mode="max-autotune-no-cudagraphs").decode_compile_mode != "default"
