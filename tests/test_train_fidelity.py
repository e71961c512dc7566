"""birbal-4090 trains as the winners' code did (docs/FIDELITY.md). Each reference below is written from their code
(Upaya07/NeurIPS-llm-efficiency-challenge @ 6b2bb5d, training/axolotl; transformers 4.35's Trainer), not from ours."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from birbal.train.multipack import epoch_orders, next_fit_bins, plan_steps
from birbal.train.neftune import NEFTune
from birbal.train.packing import IGNORE_INDEX, UpstreamEncoder, make_row, padded_width, tokenize_example

PROMPT = "### Input:\nIs the sky blue?\n\n### Response:\n"
# [1] + SentencePiece's encoding of PROMPT with the Mistral-7B-v0.1 tokenizer.model: what transformers 4.35's slow
# LlamaTokenizer (legacy) returned for it with add_special_tokens, no EOS (prompt_tokenizers.py:120).
PROMPT_IDS = [1, 774, 11232, 28747, 13, 2301, 272, 7212, 5045, 28804, 13, 13, 27332, 12107, 28747, 13]
# The answer tokenised alone, BOS stripped, EOS (2) appended (prompt_tokenizers.py:125-130): the dummy prefix '▁'
# stays ('▁yes'; '3' -> '▁', '3').
ANSWERS = {"yes": [5081, 2], "3": [28705, 28770, 2], "(A)": [325, 28741, 28731, 2],
           "The answer is: 4": [415, 4372, 349, 28747, 28705, 28781, 2],
           "a  b": [264, 28705, 287, 2]}  # SentencePiece's own merge of two spaces; transformers 5's differs


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_upstream_tokenisation_of_answers(tokenizer, answer):
    ex = tokenize_example(tokenizer, PROMPT, answer, mode="upstream")
    assert ex.input_ids.tolist() == PROMPT_IDS + ANSWERS[answer]
    # train_on_inputs: false masks the prompt, BOS included; the answer and its EOS are targets
    assert ex.labels.tolist() == [IGNORE_INDEX] * len(PROMPT_IDS) + ANSWERS[answer]


def test_upstream_tokenisation_edge_cases(tokenizer):
    enc = UpstreamEncoder(tokenizer)
    # an empty answer: `_tokenize("")` returns nothing, so no EOS and nothing to learn (prompt_tokenizers.py:64-67)
    assert tokenize_example(tokenizer, PROMPT, "", mode="upstream", upstream=enc).input_ids.tolist() == PROMPT_IDS
    # the slow tokenizer split special tokens' texts out of the string (its added-tokens trie)
    assert enc.encode("x</s>y") == [1318, 2, 337]
    # truncation to max_length (8192 upstream) drops the EOS of a cut answer (prompt_tokenizers.py:80-85)
    long = tokenize_example(tokenizer, PROMPT, "yes " * 20, mode="upstream", upstream=enc, max_length=8)
    assert long.input_ids.tolist() == PROMPT_IDS[:8] + [5081] * 7
    # the plus profile's joint tokenisation is different: no dummy prefix before the answer
    joint = tokenize_example(tokenizer, PROMPT, "yes", mode="joint")
    assert joint.input_ids.tolist() == PROMPT_IDS + [9780, 2]


class _Embed(torch.nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.zeros(*x.shape, self.dims)


@pytest.mark.parametrize(("lengths", "width"), [([100, 300], 8192), ([5000, 6000], 16384), ([8192], 8192)])
def test_neftune_row_scale_is_upstreams(lengths, width):
    """mistral_embeddings_hijack.py:19-24: alpha / sqrt(size(1) * size(2)), size(1) the padded micro-batch width.
    One micro-batch is one bin of up to 2 x 8192 tokens, padded to a multiple of 64 * ceil(8192 / 64) = 8192
    (trainer_builder.py:634-637, collators.py:74-80)."""
    assert padded_width(sum(lengths), 8192) == width
    dims = 16
    embed = _Embed(dims).train()
    hook = NEFTune(embed, alpha=5.0, scale="row")
    noise = embed(torch.zeros(1, width, dtype=torch.long))
    bound = 5.0 / math.sqrt(width * dims)
    for start, n in zip(np.cumsum([0] + lengths[:-1]), lengths, strict=True):  # every example, whatever its length
        assert noise[0, start:start + n].abs().max() <= bound * (1 + 1e-6)
        assert noise[0, start:start + n].abs().max() > 0.9 * bound
    hook.remove()


def test_neftune_example_scale_is_the_plus_switch():
    dims = 16
    embed = _Embed(dims).train()
    hook = NEFTune(embed, alpha=5.0, scale="example")
    hook.example_length = torch.tensor([[100] * 100 + [300] * 300 + [0] * (8192 - 400)])
    noise = embed(torch.zeros(1, 8192, dtype=torch.long))
    assert noise[0, :100].abs().max() > 0.9 * 5.0 / math.sqrt(100 * dims)
    assert noise[0, 100:400].abs().max() <= 5.0 / math.sqrt(300 * dims) * (1 + 1e-6)
    assert (noise[0, 400:] == 0).all()
    hook.remove()


# ---- packing and steps: a reference port of upstream's code ------------------------------------------------------

def _ref_ffd_check(a, c, n):  # utils/dataloader.py:15-34
    a = np.sort(a)[::-1]
    bins = np.full((n,), c, dtype=a.dtype)
    for size in a:
        for idx in range(n):
            if bins[idx] >= size:
                bins[idx] -= size
                break
        else:
            return False
    return True


def _ref_allocate(lengths, lengths_cumsum, c, n=1):  # utils/dataloader.py:62-110 (rank 0), bins as index sets
    s, start_index, result = 0, 0, []
    while True:
        left, right = 1, 1 + np.searchsorted(lengths_cumsum[start_index:], s + c * n, "right")
        while right - left > 1:
            mid = (left + right) // 2
            if _ref_ffd_check(lengths[start_index:start_index + mid], c, n):
                left = mid
            else:
                right = mid
        batch = lengths[start_index:start_index + left]
        if len(batch) == 0:  # ffd_with_result gives no bin: len(batch) < n, break
            break
        result.append(list(range(start_index, start_index + left)))
        start_index += left
        s = lengths_cumsum[start_index - 1]
    return result, s, len(result) * c * n


def _ref_len_est(total, eff, seq, bs):  # dataloader.py:261-279, __len__ 281-290
    return max(1, math.floor(0.99 * total / eff // seq // bs) - 1)


def _ref_steps(lengths, probe_order, order_per_epoch, seq, mbs, accumulation, epochs):
    """utils/trainer.py:204-238 (the efficiency pass over its own RandomSampler order, `probe_order`), trainer.py
    4.35:1581-1597 (max_steps), 1838-1920 (the loop)."""
    c = seq * mbs
    total = int(lengths.sum())
    first = lengths[probe_order]
    batches, used, slots = _ref_allocate(first, np.cumsum(first), c)
    eff = math.ceil(used / slots * 100.0) / 100.0
    length = _ref_len_est(total, eff, seq, mbs)
    max_steps = math.ceil(epochs * max(length // accumulation, 1))
    steps, current, total_batched = [], [], 0
    for order in order_per_epoch:
        lens = lengths[order]
        bins, _, _ = _ref_allocate(lens, np.cumsum(lens), c)
        for step, b in enumerate(bins[:length]):
            total_batched += 1
            current.append(sorted(order[i] for i in b))
            if total_batched % accumulation == 0 or (length <= accumulation and step + 1 == length):
                steps.append(current)
                current = []
                if len(steps) >= max_steps:
                    return steps, length, max_steps
    return steps, length, max_steps


def test_sampler_order_is_hf_trainers_random_sampler():
    """RandomSampler(dataset) with no generator draws its seed from the global generator, which Trainer seeds
    with set_seed(42) (trainer.py:337): the same permutations, epoch after epoch."""
    torch.manual_seed(42)
    sampler = torch.utils.data.RandomSampler(range(1000))
    expected = [list(sampler), list(sampler), list(sampler)]
    assert [o.tolist() for o in epoch_orders(1000, 42, 3)] == expected


def test_next_fit_is_upstreams_allocate():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 8192, size=400)
    order = epoch_orders(400, 42, 1)[0]
    ref, _, _ = _ref_allocate(lengths[order], np.cumsum(lengths[order]), 16384)
    ours = next_fit_bins(lengths, order, 16384)
    assert [sorted(b.tolist()) for b in ours] == [sorted(order[i] for i in b) for b in ref]


@pytest.mark.parametrize("seed", [42, 7])
def test_steps_per_epoch_and_learning_rate_match_upstream(seed):
    rng = np.random.default_rng(seed)
    # a mix shaped like the published data: mostly short rows, a tail of long ones
    lengths = np.concatenate([rng.integers(40, 600, size=3000), rng.integers(600, 8192, size=300)])
    orders = epoch_orders(len(lengths), seed, 3)
    # the efficiency pass's order: upstream's came from torch's global generator before set_seed (unknowable);
    # ours is drawn from seed + 1
    probe = epoch_orders(len(lengths), seed + 1, 1)[0]
    ref_steps, ref_len, ref_max = _ref_steps(lengths, probe, orders, 8192, 2, 4, 3)
    plan = plan_steps(lengths, seed=seed, sequence_len=8192, micro_batch_size=2, accumulation=4, num_epochs=3)
    assert plan.epoch_micro_batches == [ref_len] * 3 and plan.steps_per_epoch == ref_len // 4
    assert plan.total_steps == ref_max == len(ref_steps)
    assert all(ref_len < bins for bins in plan.bins_per_epoch)  # each epoch ends early: some bins never trained
    ours = [[sorted(b.tolist()) for b in step] for step in plan.steps]
    assert ours == ref_steps
    # cosine with 100 warm-up steps over max_steps (transformers' get_cosine_schedule_with_warmup)
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=plan.total_steps)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for k in (0, 50, 100, ref_max // 2, ref_max - 1):
        progress = (k - 100) / (ref_max - 100)
        ref = 2e-5 * (k / 100 if k < 100 else 0.5 * (1 + math.cos(math.pi * progress)))
        assert lrs[k] == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_all_bins_switch_trains_every_bin():
    rng = np.random.default_rng(3)
    lengths = rng.integers(40, 2000, size=2000)
    plan = plan_steps(lengths, seed=42, sequence_len=8192, micro_batch_size=2, accumulation=4, num_epochs=3,
                      epoch_length="all_bins")
    trained = [i for step in plan.steps for b in step for i in b.tolist()]
    assert sorted(trained) == sorted(list(range(2000)) * 3)


def test_a_micro_batch_is_one_padded_bin(tokenizer):
    enc = UpstreamEncoder(tokenizer)
    examples = [tokenize_example(tokenizer, PROMPT, a, mode="upstream", upstream=enc) for a in ANSWERS]
    row = make_row(examples, 2, padded_width(sum(len(e) for e in examples), 64))
    assert len(row.input_ids) == 128 and row.example_lengths == tuple(len(e) for e in examples)
    starts = np.cumsum([0] + [len(e) for e in examples[:-1]])
    assert (row.position_ids[starts] == 0).all()  # positions restart per example: isolation, as cu_seqlens did


# ---- loss over accumulation, eval, seed: the real recipe on the smoke run's data ------------------------------

@pytest.fixture(scope="module")
def recipe_on_smoke_data(smoke_run, tmp_path_factory, shared_cache):
    from birbal.config import load_recipe
    from birbal.train.recipe import QLoRARecipe

    def make(**train):
        overrides = [f"train.{k}={v}" for k, v in {"neftune_noise_alpha": "null", "max_grad_norm": 1e9,
                                                    **train}.items()] + ["lora.dropout=0.0"]
        recipe = load_recipe("smoke", overrides=overrides)
        r = QLoRARecipe(recipe, smoke_run / "data", tmp_path_factory.mktemp("fid"), shared_cache)
        r.setup()
        return r

    return make


def _loss_and_grads(r, step):
    """One step's micro-batches, each loss computed independently, and the gradients the recipe produced."""
    from birbal.train.model import response_loss_sum

    captured = {}
    real_step = r.optimizer.step

    def capture(*a, **k):
        captured["grads"] = [p.grad.detach().clone() for p in r.trainable]
        return real_step(*a, **k)

    r.optimizer.step = capture
    r.model.train()
    micro = [r._to_device(rows) for rows in r._micro_batches(step) if rows is not None]
    stats = r.train_step(step)
    return micro, stats, captured["grads"], response_loss_sum


def test_loss_over_accumulation_is_the_mean_of_micro_batch_means(recipe_on_smoke_data):
    r = recipe_on_smoke_data()
    before = [p.detach().clone() for p in r.trainable]
    micro, stats, grads, loss_fn = _loss_and_grads(r, 0)
    for p, b in zip(r.trainable, before, strict=True):
        p.data.copy_(b)
    r.model.zero_grad(set_to_none=True)
    means = []
    for batch in micro:
        s, n = loss_fn(r.model, batch)
        means.append(s / n)
    reference = sum(means) / r.train_cfg.gradient_accumulation_steps  # accelerator.backward divides by 4
    reference.backward()
    assert len(micro) == r.train_cfg.gradient_accumulation_steps
    assert stats["loss"] == pytest.approx(reference.item(), rel=1e-5)
    for g, p in zip(grads, r.trainable, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
    # the token-weighted switch gives another loss whenever the micro-batches' labelled counts differ
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    assert len(set(counts)) > 1


def test_eval_loss_is_the_mean_of_per_bin_means(recipe_on_smoke_data):
    from birbal.train.model import response_loss_sum

    r = recipe_on_smoke_data()
    r.model.eval()
    per_bin = []
    with torch.no_grad():
        for rows in r.eval_rows:
            assert len(rows) == 1  # one packed bin per eval batch (eval_batch_size = micro_batch_size)
            s, n = response_loss_sum(r.model, r._to_device(rows))
            per_bin.append((float(s), n))
    assert r.evaluate() == pytest.approx(sum(s / n for s, n in per_bin) / len(per_bin), rel=1e-6)
    r.train_cfg = r.train_cfg.model_copy(update={"eval_loss_averaging": "token_mean"})
    assert r.evaluate() == pytest.approx(sum(s for s, _ in per_bin) / sum(n for _, n in per_bin), rel=1e-6)


def test_smoke_run_evaluates_only_at_multiples_of_eval_steps(smoke_run, smoke_recipe):
    details = json.loads((smoke_run / "train" / "stage.json").read_text())["details"]
    steps = [e["step"] for e in details["eval_history"]]
    assert steps and all(s % smoke_recipe.train.eval_steps == 0 for s in steps)
    assert details["global_step"] % smoke_recipe.train.eval_steps != 0  # the last step: no eval, not a candidate
    best = min(details["eval_history"], key=lambda e: e["eval_loss"])
    assert details["best_step"] == best["step"]


def test_birbal_4090_is_upstreams_and_plus_turns_every_switch_on():
    from birbal.config import load_recipe

    faithful, plus = load_recipe("birbal-4090").train, load_recipe("birbal-4090-plus").train
    assert faithful.seed == 42  # HF TrainingArguments' default; nips_02 leaves `#seed: 57` commented out
    switches = {"tokenization": ("upstream", "joint"), "neftune_scale": ("row", "example"),
                "loss_averaging": ("micro_batch_mean", "token_mean"),
                "eval_loss_averaging": ("bin_mean", "token_mean"), "epoch_length": ("estimate", "all_bins"),
                "eval_at_end": (False, True)}
    for name, (upstream, better) in switches.items():
        assert getattr(faithful, name) == upstream, name
        assert getattr(plus, name) == better, name


def test_training_window_is_flash_attns(smoke_recipe, shared_cache):
    """flash-attn's window_size=(w, w) with causal=True keeps keys j with i - w <= j <= i (flash_attn_interface
    docstring); transformers' overlay with sliding_window + 1 keeps exactly those."""
    from transformers.masking_utils import sliding_window_overlay

    from birbal.train.model import build_qlora_model

    w = smoke_recipe.model.architecture.sliding_window
    model = build_qlora_model(smoke_recipe, shared_cache, torch.device("cpu"))
    window = model.get_base_model().config.sliding_window
    assert window == w + 1
    keep = sliding_window_overlay(window)
    for q in (w - 1, w, w + 5):
        allowed = [kv for kv in range(q + 1) if keep(0, 0, q, kv)]
        assert allowed == [kv for kv in range(q + 1) if q - w <= kv]
