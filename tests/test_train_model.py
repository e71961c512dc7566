"""The numerics of QLoRA training on CPU: packing isolation, the AVX512-BF16 trap, per-example NEFTune."""

import math

import pytest
import torch

from birbal.train.model import build_qlora_model, response_loss_sum
from birbal.train.neftune import PerExampleNEFTune
from birbal.train.packing import IGNORE_INDEX, collate, pack_examples, tokenize_example

QA = [("### Input:\nWhat is 2 plus 3?\n\n### Response:\n", "2 plus 3 equals 5. The answer is: 5"),
      ("### Instruction:\nReverse the words.\n\n### Input:\nWords: apple river stone\n\n### Response:\n",
       "stone river apple"),
      ("### Input:\nWhich city is the capital of Peru?\n\n### Response:\n", "The capital of Peru is Lima.")]


@pytest.fixture(scope="module")
def model(smoke_recipe, shared_cache):
    m = build_qlora_model(smoke_recipe, shared_cache, torch.device("cpu"))
    m.eval()  # no dropout: the comparisons below are exact functions of the weights
    return m


def test_prompt_tokens_are_masked(tokenizer):
    ex = tokenize_example(tokenizer, *QA[0])
    prompt_len = len(tokenizer(QA[0][0])["input_ids"])
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert (ex.labels[:prompt_len] == IGNORE_INDEX).all() and (ex.labels[prompt_len:] != IGNORE_INDEX).all()
    assert tokenizer.decode(ex.input_ids[prompt_len:-1]).strip() == QA[0][1]


def test_packed_loss_equals_the_sum_of_separate_losses(model, tokenizer):
    examples = [tokenize_example(tokenizer, q, a) for q, a in QA]
    rows, dropped = pack_examples(examples, 256, tokenizer.eos_token_id)
    assert dropped == 0 and len(rows) == 1 and rows[0].example_lengths == tuple(len(e) for e in examples)
    with torch.no_grad():
        packed, n_packed = response_loss_sum(model, collate(rows))
        alone = [response_loss_sum(model, collate(pack_examples([e], len(e), 2)[0])) for e in examples]
    assert n_packed == sum(n for _, n in alone)
    torch.testing.assert_close(packed, sum(loss for loss, _ in alone), rtol=1e-4, atol=1e-4)
    # and the mask is what makes it so: the same tokens in one unbroken sequence give another loss
    flat = collate(rows)
    flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
    with torch.no_grad():
        leaked, _ = response_loss_sum(model, flat)
    assert abs(float(leaked) - float(packed)) > 1e-2


def test_too_long_examples_are_dropped(tokenizer):
    examples = [tokenize_example(tokenizer, q, a) for q, a in QA]
    rows, dropped = pack_examples(examples, 30, tokenizer.eos_token_id)
    assert dropped == sum(1 for e in examples if len(e) > 30)
    assert all(len(r.input_ids) == 30 for r in rows)


def _lora_grads(recipe, cache, batch, eval_pass_first: bool):
    torch.manual_seed(0)
    m = build_qlora_model(recipe, cache, torch.device("cpu"))
    if eval_pass_first:  # what an eval inside training, or a generate before it, does
        m.eval()
        with torch.no_grad():
            m(input_ids=batch["input_ids"], use_cache=False)
    m.eval()
    loss, _ = response_loss_sum(m, batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])


def test_lora_gradients_are_right_after_an_eval_pass(smoke_recipe, shared_cache, tokenizer):
    """PLATFORM_NOTES: on AVX512-BF16 CPUs an eval-mode forward repacks 4-bit weights and later LoRA gradients
    are silently wrong. build_qlora_model switches the repack off; gradients must not depend on an eval pass."""
    batch = collate(pack_examples([tokenize_example(tokenizer, *QA[0])], 64, 2)[0])
    fresh = _lora_grads(smoke_recipe, shared_cache, batch, eval_pass_first=False)
    after_eval = _lora_grads(smoke_recipe, shared_cache, batch, eval_pass_first=True)
    assert fresh.abs().max() > 0
    torch.testing.assert_close(after_eval, fresh, rtol=1e-5, atol=1e-7)


class _Embed(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, 512)


def test_neftune_noise_is_scaled_per_example_not_per_row():
    embed = _Embed().train()
    hook = PerExampleNEFTune(embed, alpha=5.0)
    lengths = torch.tensor([[10] * 10 + [90] * 90 + [0] * 28])  # two examples and padding in one 128-token row
    hook.example_length = lengths
    noise = embed(torch.zeros(1, 128, dtype=torch.long))
    bound_short, bound_long = 5 / math.sqrt(10 * 512), 5 / math.sqrt(90 * 512)
    short, long_, pad = noise[0, :10], noise[0, 10:100], noise[0, 100:]
    assert short.abs().max() <= bound_short and short.abs().max() > 0.95 * bound_short
    assert long_.abs().max() <= bound_long and long_.abs().max() > 0.95 * bound_long
    assert (pad == 0).all()
    # the upstream scaling (row length 128 for everyone) would give the short example far less noise
    assert short.abs().max() > 2 * (5 / math.sqrt(128 * 512))
    embed.eval()
    assert (embed(torch.zeros(1, 128, dtype=torch.long)) == 0).all()  # never at eval
    hook.remove()


def test_compiled_layers_give_the_eager_loss_and_gradients(smoke_recipe, shared_cache, tokenizer):
    """train.torch_compile changes the kernels, not the maths: same loss and LoRA gradients (no dropout), same
    parameter names (so adapters and checkpoints are interchangeable), and dropout still trains compiled."""
    assert_compiled_matches_eager(smoke_recipe, shared_cache, tokenizer, torch.device("cpu"))


def randomise_lora_b(model):
    """LoRA B starts at zero, which would leave every A gradient zero: small random values instead, seeded."""
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.05).to(param.device, param.dtype)
    return model


def assert_compiled_matches_eager(recipe, cache, tokenizer, device: torch.device) -> None:
    """Also run on CUDA by tests/test_gpu_train.py, with the GPU attention paths."""
    from birbal.train.model import compile_decoder_layers

    torch._dynamo.reset()  # a fresh compile cache: earlier graphs must not count against the recompile limit
    model = randomise_lora_b(build_qlora_model(recipe, cache, device).eval())
    rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
    batch = {k: v.to(device) for k, v in collate(rows).items()}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, _ = response_loss_sum(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = loss_and_grads()
    names = [n for n, _ in model.named_parameters()]
    assert compile_decoder_layers(model) == recipe.model.architecture.num_hidden_layers
    assert [n for n, _ in model.named_parameters()] == names
    compiled_loss, compiled_grads = loss_and_grads()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert all(g.abs().max() > 0 for n, g in eager_grads.items() if "lora_A" in n)
    for name, grad in eager_grads.items():
        # fp32, summed in another order by the fused kernels: ~1e-6 of the largest entry here
        assert (compiled_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    model.train()
    torch.manual_seed(1)
    dropped, _ = response_loss_sum(model, batch)
    assert torch.isfinite(dropped) and not torch.equal(dropped.detach(), compiled_loss)


def test_every_lora_weight_gets_a_gradient_without_input_grads(model, tokenizer):
    """Non-reentrant checkpointing reaches layer 0's LoRA weights although the embedding output needs no grad."""
    batch = collate(pack_examples([tokenize_example(tokenizer, *QA[1])], 64, 2)[0])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    assert not embeds.requires_grad
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    saved = {n: p.detach().clone() for n, p in lora_b.items()}
    with torch.no_grad():
        for p in lora_b.values():
            p.normal_(0, 0.05)
    try:
        model.zero_grad(set_to_none=True)
        loss, _ = response_loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())
    finally:
        with torch.no_grad():
            for n, p in lora_b.items():
                p.copy_(saved[n])
        model.zero_grad(set_to_none=True)


def test_unchecked_layers_skip_their_recompute_and_keep_the_maths(shared_cache, tokenizer, monkeypatch):
    """train.unchecked_layers: the last N layers run their forward once instead of twice (no recompute in the
    backward), the others still twice; the loss and every LoRA gradient are those of full checkpointing."""
    from birbal.config import load_recipe
    from birbal.errors import TrainError
    from birbal.train.model import leave_last_layers_unchecked

    def run(unchecked: int):
        # the switch off: its layers run MistralMLP.forward written out (put_down_proj_outside_checkpoint)
        recipe = load_recipe("smoke", ["lora.dropout=0.0", f"train.unchecked_layers={unchecked}",
                                       "train.down_proj_outside_checkpoint=false"])
        model = randomise_lora_b(build_qlora_model(recipe, shared_cache, torch.device("cpu")).train())
        layers = model.get_base_model().model.layers
        calls = [0] * len(layers)
        index_of = {id(layer.mlp): i for i, layer in enumerate(layers)}
        mlp_forward = type(layers[0].mlp).forward

        def counted(mlp, *args, **kwargs):  # module hooks do not fire in the recompute; the forward itself does
            calls[index_of[id(mlp)]] += 1
            return mlp_forward(mlp, *args, **kwargs)

        monkeypatch.setattr(type(layers[0].mlp), "forward", counted)
        rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
        loss, _ = response_loss_sum(model, collate(rows))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        monkeypatch.undo()
        return loss.detach(), grads, calls, model

    full_loss, full_grads, full_calls, _ = run(0)
    loss, grads, calls, model = run(1)
    assert full_calls == [2] * len(full_calls)  # checkpointed: the forward, then the recompute
    assert calls == [2] * (len(calls) - 1) + [1]
    torch.testing.assert_close(loss, full_loss)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(TrainError, match="more than the model's 2 decoder layers"):
        leave_last_layers_unchecked(model, 3)


def _state_storages(model) -> set[int]:
    """The storages of the model's parameters, buffers and 4-bit quantisation states (absmax, code)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                        if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return {t.untyped_storage().data_ptr() for t in tensors}


def _down_proj_run(recipe, shared_cache, batch, seed: int = 1, compiled: bool = False,
                   device: torch.device | None = None):
    """Loss, LoRA gradients, the 4-bit base products each layer's down projection ran in the forward and in the
    backward, and the tensors other than the model's own autograd kept, for one training step (dropout on,
    seeded)."""
    from birbal.train.model import put_down_proj_outside_checkpoint

    torch._dynamo.reset()
    device = device or torch.device("cpu")
    model = randomise_lora_b(build_qlora_model(recipe, shared_cache, device).train())
    batch = {k: v.to(device) for k, v in batch.items()}
    split = recipe.train.down_proj_outside_checkpoint
    if compiled and not split:
        from birbal.train.model import compile_decoder_layers
        compile_decoder_layers(model)
    elif compiled:
        put_down_proj_outside_checkpoint(model, compiled=True)
    layers = model.get_base_model().model.layers
    counts = {"forward": [0] * len(layers), "backward": [0] * len(layers)}
    phase = ["forward"]
    base_forward = type(layers[0].mlp.down_proj.base_layer).forward
    index_of = {id(layer.mlp.down_proj.base_layer): i for i, layer in enumerate(layers)}

    def counted(base, *args, **kwargs):
        if id(base) in index_of:
            counts[phase[0]][index_of[id(base)]] += 1
        return base_forward(base, *args, **kwargs)

    if compiled:  # compile the forward, recompute and backward graphs first: their tracing runs the ops too
        response_loss_sum(model, batch)[0].backward()
        model.zero_grad(set_to_none=True)
    kept = []
    own = _state_storages(model)

    def keep(t):
        if t.untyped_storage().data_ptr() not in own:  # the weights themselves cost no memory to keep
            kept.append((tuple(t.shape), t.dtype))
        return t

    original = type(layers[0].mlp.down_proj.base_layer).forward
    type(layers[0].mlp.down_proj.base_layer).forward = counted
    try:
        torch.manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, _ = response_loss_sum(model, batch)
        phase[0] = "backward"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        # what the compiled graphs run, which the Python counter above sees only while they are traced
        counts["backward_4bit_products"] = sum(e.name == "bitsandbytes::gemm_4bit" for e in profile.events())
    finally:
        type(layers[0].mlp.down_proj.base_layer).forward = original
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counts, sorted(kept, key=str)


def test_the_down_projection_outside_the_checkpoint_is_skipped_by_the_recompute_and_keeps_the_maths(
        shared_cache, tokenizer):
    """train.down_proj_outside_checkpoint: a checkpointed layer's recompute no longer runs its down projection's
    4-bit product (the unchecked layer never recomputes), the tensors kept for the backward are the same, and the
    loss and every LoRA gradient are bit for bit those of the libraries' own forward, dropout included."""
    from birbal.config import load_recipe

    rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
    batch = collate(rows)
    library = load_recipe("smoke", ["train.unchecked_layers=1", "train.down_proj_outside_checkpoint=false"])
    split = load_recipe("smoke", ["train.unchecked_layers=1", "train.down_proj_outside_checkpoint=true"])
    loss, grads, counts, kept = _down_proj_run(library, shared_cache, batch)
    split_loss, split_grads, split_counts, split_kept = _down_proj_run(split, shared_cache, batch)
    # layer 0 checkpointed: its recompute ran its 7 products, down's included; layer 1 is unchecked
    assert counts == {"forward": [1, 1], "backward": [1, 0], "backward_4bit_products": 7}
    assert split_counts == {"forward": [1, 1], "backward": [0, 0], "backward_4bit_products": 6}
    assert split_kept == kept and kept
    assert torch.equal(split_loss, loss)
    assert split_grads.keys() == grads.keys() and all(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        assert torch.equal(split_grads[name], grad), name


def test_the_down_projection_outside_the_checkpoint_compiles_to_the_same_maths(shared_cache, tokenizer):
    """Compiled (as birbal-4090 trains), against the whole compiled layer: the same recompute saving, the loss
    and gradients within the fused kernels' summation order (fp32 here), and the same kept tensors."""
    assert_down_proj_outside_compiles_to_the_same_maths(shared_cache, tokenizer, torch.device("cpu"))


def assert_down_proj_outside_compiles_to_the_same_maths(cache, tokenizer, device: torch.device,
                                                        overrides: tuple[str, ...] = ()) -> None:
    """Also run on CUDA by tests/test_gpu_train.py (Inductor's GPU kernels, bitsandbytes' CUDA 4-bit)."""
    from birbal.config import load_recipe

    rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
    batch = collate(rows)
    whole = load_recipe("smoke", ["train.unchecked_layers=0", "lora.dropout=0.0", *overrides,
                                  "train.down_proj_outside_checkpoint=false"])
    split = load_recipe("smoke", ["train.unchecked_layers=0", "lora.dropout=0.0", *overrides,
                                  "train.down_proj_outside_checkpoint=true"])
    loss, grads, counts, kept = _down_proj_run(whole, cache, batch, compiled=True, device=device)
    split_loss, split_grads, split_counts, split_kept = _down_proj_run(split, cache, batch, compiled=True,
                                                                       device=device)
    assert (counts["backward_4bit_products"], split_counts["backward_4bit_products"]) == (14, 12)  # 2 layers
    assert split_kept == kept and kept
    torch.testing.assert_close(split_loss, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        assert (split_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_a_compiled_layer_keeps_what_an_eager_checkpointed_one_keeps(shared_cache, tokenizer):
    """train.torch_compile under checkpointing: the compiled layers keep for the backward exactly the tensors the
    eager checkpointed layers keep (their inputs), whichever transformers wraps (5.17: __call__; 5.24: forward).
    Under 5.24, compiling each layer as a module instead traces the checkpoint into the graph and keeps more
    (2.3x the bytes here; at the 7B shape an out-of-memory error under the 24 GiB cap): checked too, so that this
    count can tell the two apart."""
    from birbal.config import load_recipe
    from birbal.train.model import _unwrapped_forward, compile_decoder_layers

    torch._dynamo.reset()
    recipe = load_recipe("smoke", ["lora.dropout=0.0", "train.unchecked_layers=0"])
    rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
    batch = collate(rows)

    def kept(model) -> list[tuple[tuple[int, ...], torch.dtype]]:
        shapes = []

        def pack(t):
            shapes.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = response_loss_sum(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return sorted(shapes, key=str)

    model = build_qlora_model(recipe, shared_cache, torch.device("cpu")).train()
    eager = kept(model)
    compile_decoder_layers(model)
    assert kept(model) == eager and eager
    layers = model.get_base_model().model.layers
    if _unwrapped_forward(type(layers[0])) is not None:  # transformers 5.24: the module compile keeps more
        naive = build_qlora_model(recipe, shared_cache, torch.device("cpu")).train()
        for layer in naive.get_base_model().model.layers:
            layer.compile()
        assert len(kept(naive)) > len(eager)


def test_the_build_checkpoints_its_layers_without_a_deprecation_warning(smoke_recipe, shared_cache):
    """transformers 5.24 renames gradient_checkpointing_enable to activation_checkpointing_enable and warns on the
    old name (and on is_gradient_checkpointing, which peft reads) in every training log: the build uses the new
    name and still checkpoints every layer but the recipe's unchecked ones."""
    import warnings

    from birbal.models import unwrap_peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = build_qlora_model(smoke_recipe, shared_cache, torch.device("cpu"))
    checkpointing = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert checkpointing == []
    flags = [layer.gradient_checkpointing for layer in unwrap_peft(m).model.layers]
    unchecked = smoke_recipe.train.unchecked_layers
    assert flags == [True] * (len(flags) - unchecked) + [False] * unchecked and unchecked < len(flags)


def test_the_mfu_counts_the_keys_inside_the_sliding_window():
    """Mistral attends to at most its window of keys (4,097 as trained, upstream's flash-attention window): the
    attention term of the MFU counts those, token by token, not the whole causal prefix of a long example."""
    from transformers import MistralConfig

    from birbal.train.metrics import flops_per_token, mean_attention_context

    lengths, window = [1, 7, 8, 9, 30], 8
    keys = [min(position + 1, window) for n in lengths for position in range(n)]
    assert mean_attention_context(lengths, window) == pytest.approx(sum(keys) / len(keys))
    assert mean_attention_context(lengths) == pytest.approx(sum(n * (n + 1) / 2 for n in lengths) / sum(lengths))
    assert mean_attention_context([8192, 8192], 4097) == pytest.approx(3072.75)  # not 4096.5
    assert mean_attention_context([4097], 4097) == mean_attention_context([4097])  # the window reaches no further
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100)
    assert (flops_per_token(config, mean_attention_context([8192], 4097))
            < flops_per_token(config, mean_attention_context([8192])))



def test_a_checkpoint_is_saved_without_asking_the_hub(smoke_recipe, shared_cache, tmp_path, monkeypatch):
    """peft's save_embedding_layers="auto" looks the recipe's base up on the hub (then loads its config, unpinned)
    at every save; birbal-4090 names `mistralai/Mistral-7B-v0.1`. The checkpoint says outright what "auto" would
    conclude, so no save touches the network, and the adapter holds the LoRA weights only."""
    import json

    from peft.utils import save_and_load
    from safetensors import safe_open

    from birbal.train.checkpoint import ADAPTER, save_checkpoint

    asked = []
    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", lambda *a, **k: asked.append(a))  # None: "could not tell"
    model = build_qlora_model(smoke_recipe, shared_cache, torch.device("cpu"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"global_step": 1},
                             base_model="mistralai/Mistral-7B-v0.1")
    assert asked == []
    adapter = folder / ADAPTER
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "mistralai/Mistral-7B-v0.1"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as saved:
        names = list(saved.keys())
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == len(expected)
