"""`ni_predictions.engine: static` (birbal.data.static_engine): its greedy tokens equal transformers' `generate` on
one left-padded batch of varied lengths (CPU, fp32, a tiny random Mistral), rows finished early by EOS included;
the shapes are bucketed and reused; on a GPU the replayed CUDA graphs equal the same steps run eagerly, in bf16,
and no step waits on the host (`pytest -m gpu tests/test_data_static_engine.py`)."""

from __future__ import annotations

import random

import pytest
import torch

from birbal.data.static_engine import StaticEngine, bucket_length, bucket_rows

PAD = EOS = 2
NEW = 12
LENGTHS = (40, 7, 23, 3, 15)  # 5 rows: bucketed to 8, three filler rows


def _model(device: str = "cpu", dtype=torch.float32):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=EOS,
                           initializer_range=0.2, attn_implementation="sdpa")  # attention far from uniform
    return MistralForCausalLM(config).to(device=device, dtype=dtype).eval()


def _prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 1000) for _ in range(n)] for n in lengths]


def _generate(model, encoded: list[list[int]], eos: int, new: int = NEW) -> list[list[int]]:
    """transformers' greedy `generate` on the left-padded batch (what `engine: generate` runs), padded to `new`."""
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=PAD, eos_token_id=eos)
    return [row + [PAD] * (new - len(row)) for row in out[:, width:].tolist()]


def test_buckets_are_few_and_hold_the_shape():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 8, 9, 17, 63, 64)] == [1, 2, 4, 8, 8, 16, 24, 64, 64]
    assert [bucket_length(n) for n in (1, 16, 17, 53, 632, 1100, 4128)] == [16, 16, 20, 56, 640, 1280, 5120]
    lengths = range(16, 4200)
    assert all(n <= bucket_length(n) <= 1.25 * n for n in lengths)
    assert len({bucket_length(n) for n in lengths}) <= 4 * 9  # four sizes an octave


@pytest.mark.parametrize("attention", ["grouped", "sdpa", "triton"])  # triton: grouped here, without CUDA
def test_static_engine_equals_generate_token_for_token_with_an_early_eos(attention):
    model = _model()
    encoded = _prompts()
    free = _generate(model, encoded, eos=999_999)  # an id the model never emits: no row stops (generate: SDPA)
    engine = StaticEngine(model, PAD, 999_999, NEW, attention=attention)
    assert engine.generate(encoded) == free
    # the prefill in chunks of 2 rows (90 tokens at width 41) into their rows of the cache: the same tokens
    chunked = StaticEngine(model, PAD, 999_999, NEW, attention=attention, prefill_tokens=90)
    assert chunked.generate(encoded) == free
    assert len({tuple(r) for r in free}) == len(free)  # random weights, different prompts: a real comparison
    # an EOS that one row emits at its 3rd new token and no other row emits: that row stops early, the others go on
    row = next(i for i, r in enumerate(free) if all(r[2] not in o[:NEW] for j, o in enumerate(free) if j != i)
               and r[2] not in r[:2])
    eos = free[row][2]
    expected = _generate(model, encoded, eos=eos)
    assert expected[row] == free[row][:3] + [PAD] * (NEW - 3)  # generate: the EOS, then pads
    assert StaticEngine(model, PAD, eos, NEW, attention=attention).generate(encoded) == expected
    assert chunked.generate(encoded) == free and list(chunked._shapes) == [(8, 56)]  # rewound to 0, not to 41
    assert [r for i, r in enumerate(expected) if i != row] == [r for i, r in enumerate(free) if i != row]


def test_every_row_done_stops_the_batch_and_shapes_are_reused():
    model = _model()
    encoded = _prompts((9, 30))
    free = _generate(model, encoded, eos=999_999, new=20)
    # each row's first new token as the EOS: both rows finish at once, the batch stops at the first check
    firsts = {r[0] for r in free}
    for eos in firsts:
        engine = StaticEngine(model, PAD, eos, 20)
        assert engine.generate(encoded) == _generate(model, encoded, eos=eos, new=20)
    engine = StaticEngine(model, PAD, 999_999, NEW)
    first = engine.generate(_prompts())
    other = _prompts((38, 5, 30, 9, 12, 20), seed=1)  # 6 rows of width <= 41: the same (8, 56) shape
    assert engine.generate(other) == _generate(model, other, eos=999_999)
    assert list(engine._shapes) == [(8, 56)]  # reused: its cache was rewound, stale slots masked
    assert engine.generate(_prompts()) == first
    engine.generate(_prompts((500,)))  # a bigger shape (640 slots) grows the arena, dropping the old shapes
    assert list(engine._shapes) == [(1, 640)] and engine.generate(other) == _generate(model, other, eos=999_999)


def test_grouped_attention_runs_every_decode_step_and_sdpa_only_the_prompt(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model = _model()
    grouped = StaticEngine(model, PAD, 999_999, NEW, attention="grouped")
    assert model.config._attn_implementation == "birbal_grouped_sdpa"  # serve/attention.py's, installed
    calls = []
    real = sdpa.sdpa_attention_forward

    def counted(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", counted)  # the grouped path's fallback for a prompt
    grouped.generate(_prompts())
    assert calls == [max(LENGTHS) + 1] * model.config.num_hidden_layers  # the prefill only: no step fell back


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["sdpa", "grouped", "triton"])
def test_replayed_graphs_equal_eager_static_steps_on_cuda_without_host_syncs(attention):
    model = _model("cuda", torch.bfloat16)
    batches = [_prompts((200, 180, 150), seed=2), _prompts(), _prompts((38, 5, 30, 9, 12, 20), seed=1),
               _prompts((3,), seed=3)]  # the largest shape first, as length-sorted batches come: no arena growth
    eager = StaticEngine(model, PAD, 999_999, NEW, graphs=False, attention=attention)
    graph = StaticEngine(model, PAD, 999_999, NEW, attention=attention)
    assert graph.graphs and not eager.graphs
    if attention == "triton":  # each row's decode attention through birbal.serve.flash_decode's kernels
        assert graph.attention == "birbal::decode_attention (Triton)"
    expected = [eager.generate(b) for b in batches]
    assert [graph.generate(b) for b in batches] == expected
    assert graph.captured == 3  # (4, 224), (8, 56) twice, (1, 16): one graph a shape
    again = [graph.generate(b) for b in batches]
    assert again == expected and graph.captured == 3
    # with an EOS a row emits: the same early stop, replayed
    eos = expected[1][1][4]
    assert (StaticEngine(model, PAD, eos, NEW).generate(batches[1])
            == StaticEngine(model, PAD, eos, NEW, graphs=False).generate(batches[1]))
    # a replay and its token copy never synchronise with the host (CUDA's sync debug mode errors on one)
    shape = graph.shape_for(5, 41)
    torch.cuda.synchronize()
    out = torch.zeros((shape.rows, 4), dtype=torch.long, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(4):
            shape.graph.replay()
            out[:, step] = shape.tokens[:, 0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_a_cache_too_big_for_the_gpu_is_a_one_line_error_naming_the_setting(monkeypatch):
    """On a GPU the arena is checked against the free memory before it is allocated: a budget a 24 GB card cannot
    hold is a DataError naming max_batch_tokens and the sizes, not an out-of-memory error inside a batch. (CPU:
    the engine's device and the free-memory query are the GPU's as torch reports them, set here.)"""
    from birbal.errors import DataError

    engine = StaticEngine(_model(), PAD, 999_999, NEW, reserve_slots=131072)
    # the tiny model's arena for 131,072 slots: 2 layers x keys and values x 131,072 x 2 KV heads x 16 dims x 4 B
    need = 2 * 2 * 131072 * 2 * 16 * 4
    monkeypatch.setattr(engine, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need - 1, 24 * 2**30))
    with pytest.raises(DataError, match=r"131,072 tokens \(max_batch_tokens\) needs 0\.1 GiB.*max_prefill_tokens"):
        engine.shape_for(5, 40)
    assert engine._arena == [] and engine._arena_slots == 0  # nothing allocated, nothing half-set
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 24 * 2**30))
    engine._check_room(need, 131072)  # exactly room enough: no error
    # an engine whose arena grew before: a refused bigger one leaves no stale size behind (a later, smaller shape
    # allocates afresh instead of reading an arena that is gone)
    monkeypatch.setattr(engine, "device", torch.device("cpu"))
    engine.shape_for(5, 40)
    assert engine._arena_slots == 131072 and len(engine._arena) == 2
    monkeypatch.setattr(engine, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 24 * 2**30))
    with pytest.raises(DataError, match="max_batch_tokens"):
        engine._ensure_arena(131073)
    assert engine._arena == [] and engine._arena_slots == 0 and engine._shapes == {}
