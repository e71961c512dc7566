"""train.offload_layers: offloaded layers skip their recompute, their saved tensors go to the host and come back,
and the loss and LoRA gradients are those of full checkpointing (dropout on, as the recipe trains)."""

import pytest
import torch
from test_train_model import QA, randomise_lora_b

from birbal.train import offload as offload_module
from birbal.train.model import build_qlora_model, response_loss_sum
from birbal.train.offload import offloaded_layer_indices
from birbal.train.packing import collate, pack_examples, tokenize_example


def test_offloaded_layers_are_spread_over_the_checkpointed_ones():
    assert offloaded_layer_indices(32, 2, 0) == []
    assert offloaded_layer_indices(32, 2, 10) == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert offloaded_layer_indices(32, 2, 30) == list(range(30))
    assert offloaded_layer_indices(2, 0, 1) == [1]
    from birbal.errors import TrainError

    with pytest.raises(TrainError, match="more than the 30 checkpointed decoder layers"):
        offloaded_layer_indices(32, 2, 31)


def offload_matches_checkpointing(cache, tokenizer, device: torch.device, overrides=(), count_mlp=False,
                                  unchecked=0, count=2):
    """Shared with tests/test_gpu_train.py (streams, pinned memory, compiled layers on CUDA)."""
    from birbal.config import load_recipe

    rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
    batch = {k: v.to(device) for k, v in collate(rows).items()}

    def run(offloaded: int):
        # the switch off unless `overrides` turns it on: its split layers run MistralMLP.forward written out, which
        # `counted` would miss
        recipe = load_recipe("smoke", [f"train.unchecked_layers={unchecked}", f"train.offload_layers={offloaded}",
                                       f"train.device={device.type}", "train.down_proj_outside_checkpoint=false",
                                       *overrides])
        torch._dynamo.reset()
        model = randomise_lora_b(build_qlora_model(recipe, cache, device).train())  # dropout 0.05 on
        layers = model.get_base_model().model.layers
        calls = [0] * len(layers)
        index_of = {id(layer.mlp): i for i, layer in enumerate(layers)}
        mlp_forward = type(layers[0].mlp).forward

        def counted(mlp, *args, **kwargs):
            calls[index_of[id(mlp)]] += 1
            return mlp_forward(mlp, *args, **kwargs)

        def one_step():
            model.zero_grad(set_to_none=True)
            loss, _ = response_loss_sum(model, batch)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

        if count_mlp:  # module hooks do not fire in the recompute; the forward itself does
            type(layers[0].mlp).forward = counted
        torch.manual_seed(5)
        try:
            results = [one_step() for _ in range(2)]  # the second reuses the hooks and the host buffers
        finally:
            type(layers[0].mlp).forward = mlp_forward
        return results, calls, getattr(model, "birbal_offload", None), model

    reference, full_calls, _, plain = run(0)
    results, calls, offload, model = run(count)
    assert offload is not None and offload.indices == offloaded_layer_indices(len(calls), unchecked, count)
    assert offload.bytes_offloaded > 0  # real tensors went through the host copies
    assert offload.layers == {} and offload._host_bytes == 0  # every one came back and was let go
    assert offload.late_fetches == 0  # each layer fetched ahead of its backward
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    if count_mlp:
        # two micro-batches: checkpointed layers run forward + recompute, unchecked and offloaded the forward only
        assert full_calls == [4] * (len(full_calls) - unchecked) + [2] * unchecked
        assert calls == [2] * len(calls)
    for (loss, grads), (ref_loss, ref_grads) in zip(results, reference, strict=True):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)
        for name, grad in grads.items():
            assert (grad - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max() + 1e-7, name
    return offload


@pytest.mark.parametrize("unchecked,count", [(0, 2), (1, 1)])  # the top one fetched by the norm's / a layer's hook
def test_offloaded_layers_skip_their_recompute_and_keep_the_maths(unchecked, count, shared_cache, tokenizer,
                                                                  monkeypatch):
    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)  # the tiny model's tensors are all small
    fetched = []
    fetch_top = offload_module.ActivationOffload.fetch_top

    def counted(self, grad=None):
        fetched.append(self.indices[-1])
        return fetch_top(self, grad)

    monkeypatch.setattr(offload_module.ActivationOffload, "fetch_top", counted)
    offload = offload_matches_checkpointing(shared_cache, tokenizer, torch.device("cpu"), count_mlp=True,
                                            unchecked=unchecked, count=count)
    assert fetched == [offload.indices[-1]] * 2  # ahead of its backward, in both micro-batches


def test_offloaded_layers_beside_the_down_projection_outside_the_checkpoint_keep_the_maths(shared_cache, tokenizer,
                                                                                           monkeypatch):
    """birbal-4090 trains with train.down_proj_outside_checkpoint on: with one of the two layers offloaded, the other
    checkpointed in its split form, the loss and LoRA gradients are those of both layers checkpointed split."""
    from birbal.train import model as model_module

    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)
    tails = []
    tail = model_module._layer_tail

    def counted_tail(layer, *args):
        tails.append(layer.self_attn.layer_idx)
        return tail(layer, *args)

    monkeypatch.setattr(model_module, "_layer_tail", counted_tail)  # read when the model is built
    offload = offload_matches_checkpointing(shared_cache, tokenizer, torch.device("cpu"), unchecked=0, count=1,
                                            overrides=("train.down_proj_outside_checkpoint=true",))
    assert offload.indices == [1] and offload.bytes_offloaded > 0
    # two micro-batches each: both layers split in the reference, then layer 0 alone beside the offloaded one
    assert tails == [0, 1] * 2 + [0] * 2


def test_eval_passes_leave_the_offload_alone(shared_cache, tokenizer, monkeypatch):
    from birbal.config import load_recipe

    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)
    model = build_qlora_model(load_recipe("smoke", ["train.unchecked_layers=0", "train.offload_layers=1"]),
                              shared_cache, torch.device("cpu"))
    rows, _ = pack_examples([tokenize_example(tokenizer, *QA[0])], 64, tokenizer.eos_token_id)
    model.eval()
    with torch.no_grad():
        response_loss_sum(model, collate(rows))
    assert model.birbal_offload.bytes_offloaded == 0 and model.birbal_offload.layers == {}


def test_preflight_counts_the_host_ram_the_offload_pins(tmp_path):
    from birbal import preflight
    from birbal.config import load_recipe

    plain = load_recipe("birbal-4090")
    assert preflight.check_host_ram(plain, 4 * 2**30).ok  # nothing pinned without offload
    offloaded = load_recipe("birbal-4090", ["train.offload_layers=28"])
    needed = preflight.host_ram_needed_gib(offloaded)
    # 28 layers x 3.25 GiB at 16,384 tokens (what the H200 run moved a layer), x 1.07 for the pinned blocks' rounding,
    # plus the 8 GiB base
    assert abs(needed - (8 + 28 * 3332 / 1024 * 1.07)) < 0.2
    short = preflight.check_host_ram(offloaded, int(32 * 2**30))
    assert not short.ok and "train.offload_layers=28" in short.line() and "32.0 GiB" in short.line()
    assert preflight.check_host_ram(offloaded, int(128 * 2**30)).ok
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   33554432 kB\n")
    assert preflight.mem_available_bytes(meminfo) == 32 * 2**30


def test_the_4090_projection_takes_the_larger_of_compute_and_the_link():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import rtx4090_offload_projection

    common = {"status": "ok", "row_shape": "1x16384", "data": "full", "unchecked_layers": 2, "tokens_per_s": 9000.0}
    results = [dict(common, variant="ours_bin16k_full", s_per_step=16384 / 9000.0, offload_layers=0),
               dict(common, variant="ours_bin16k_full_norecompute_uncapped", s_per_step=1.3, offload_layers=0,
                    unchecked_layers=32),
               dict(common, variant="ours_bin16k_full_offload10", s_per_step=1.7, offload_layers=10,
                    offload_gib_per_micro_batch=15.5)]
    out = rtx4090_offload_projection(results)
    rows = {r["offload_layers"]: r for r in out["rows"]}
    assert out["bytes_per_offloaded_layer_gib"] == 1.55 and out["tokens_per_step"] == 16384
    assert rows[0]["rtx4090_link_s"] == 0 and rows[0]["rtx4090_step_s"] == rows[0]["rtx4090_compute_s"]
    assert rows[30]["h200_compute_s"] == 1.3  # every recompute gone: the no-recompute step
    assert rows[30]["rtx4090_link_s"] > rows[10]["rtx4090_link_s"] > 0
    assert all(r["rtx4090_step_s"] == max(r["rtx4090_compute_s"], r["rtx4090_link_s"]) for r in rows.values())
    assert out["checkpointed_step"] == "ours_bin16k_full"
    assert rtx4090_offload_projection(results[:2]) is None  # no offload measured: no projection
    # the step as birbal-4090 trains (the down projection outside the checkpoint) is the basis where measured
    downout = dict(common, variant="ours_bin16k_full_downout", s_per_step=1.7, offload_layers=0)
    faster = rtx4090_offload_projection([downout, *results])
    assert faster["checkpointed_step"] == "ours_bin16k_full_downout"
    faster_rows = {r["offload_layers"]: r for r in faster["rows"]}
    assert faster_rows[0]["h200_compute_s"] == 1.7 and faster_rows[30]["h200_compute_s"] == 1.3


def test_the_active_layers_change_on_one_model_and_the_maths_does_not(shared_cache, tokenizer, monkeypatch):
    """set_active (the benchmark's settings on one compiled model): none, the lower one (fetched by the hook of the
    inactive layer above it), both; the same loss and LoRA gradients each time."""
    from birbal.config import load_recipe

    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)
    model = randomise_lora_b(build_qlora_model(
        load_recipe("smoke", ["train.unchecked_layers=0", "train.offload_layers=2"]), shared_cache,
        torch.device("cpu")).train())
    offload = model.birbal_offload
    rows, _ = pack_examples([tokenize_example(tokenizer, q, a) for q, a in QA], 128, tokenizer.eos_token_id)
    batch = collate(rows)
    seen = {}
    for active in ([], [0], [0, 1]):
        offload.set_active(active)
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [i not in active for i in range(2)]
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        loss, _ = response_loss_sum(model, batch)
        loss.backward()
        seen[tuple(active)] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.requires_grad})
        assert (offload.bytes_offloaded > 0) == bool(active) and offload.layers == {}
    assert offload.late_fetches == 0
    ref_loss, ref_grads = seen[()]
    for loss, grads in seen.values():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            assert (grad - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max() + 1e-7, name
    from birbal.errors import TrainError

    with pytest.raises(TrainError, match="were not installed"):
        offload.set_active([0, 1, 2])
