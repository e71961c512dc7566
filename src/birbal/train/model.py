"""The QLoRA model: the frozen 4-bit base with LoRA adapters, and the response-only loss."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from birbal.config import Recipe
from birbal.errors import TrainError
from birbal.models import (
    DTYPES,
    load_base_model,
    peft_without_deprecation_noise,
    plain_lora_parts,
    unwrap_peft,
)
from birbal.train.packing import IGNORE_INDEX

LOSS_CHUNK_TOKENS = 2048


def enable_activation_checkpointing(model) -> None:
    """Every decoder layer checkpointed, non-reentrant (what axolotl 0.3.0's `gradient_checkpointing: true` set
    through HF's `gradient_checkpointing_enable`, which transformers 5.24 renames `activation_checkpointing_enable`
    and deprecates, warning in every run; the old name where the new one is missing, as in transformers 5.17)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_qlora_model(recipe: Recipe, cache_dir: Path, device: torch.device):
    """Load the base (NF4 when the recipe says so), freeze it, and wrap it with the recipe's LoRA."""
    from peft import LoraConfig, get_peft_model

    compute_dtype = DTYPES[recipe.quantization.compute_dtype]
    quantization = recipe.quantization if recipe.quantization.load_in_4bit else None
    model = load_base_model(recipe.model, cache_dir, device, compute_dtype, quantization)
    model.config.use_cache = False
    if recipe.train.sliding_window_keys == "flash_attn" and getattr(model.config, "sliding_window", None):
        # Upstream's flash-attention patch passed window_size=(sliding_window, sliding_window) to flash-attn 2.3
        # (mistral_attn_hijack_flash.py:153-161, 212-220): a token attends to itself and the 4096 before it, 4097
        # keys. transformers 5's mask keeps kv > q - sliding_window (masking_utils.sliding_window_overlay), 4096
        # keys, and its own flash path passes (sliding_window - 1, ...) to match that. One more makes ours
        # upstream's; it changes only examples longer than the window.
        model.config.sliding_window = model.config.sliding_window + 1
    for param in model.parameters():
        param.requires_grad_(False)
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    lora = recipe.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias=lora.bias, task_type="CAUSAL_LM")
    torch.manual_seed(recipe.train.seed)  # LoRA A matrices are initialised from the global generator
    with peft_without_deprecation_noise():
        model = get_peft_model(model, peft_config)
    if recipe.train.gradient_checkpointing and hasattr(model, "disable_input_require_grads"):
        # transformers (and peft, for unquantized bases) hook the embedding so its output requires grad: reentrant
        # checkpointing needs that to reach the LoRA weights. Non-reentrant checkpointing does not, and the hook
        # only makes the backward compute the gradient of the frozen embedding's output (layer 0's input).
        model.disable_input_require_grads()
    if recipe.train.gradient_checkpointing and recipe.train.unchecked_layers:
        leave_last_layers_unchecked(model, recipe.train.unchecked_layers)
    if recipe.train.gradient_checkpointing and recipe.train.offload_layers:
        from birbal.train.offload import install_offload

        # before compiling: the offloaded layers get their own class (an outer __call__), compiled as the others
        model.birbal_offload = install_offload(model, device, recipe.train.unchecked_layers,
                                               recipe.train.offload_layers)
    if recipe.train.gradient_checkpointing and recipe.train.down_proj_outside_checkpoint:
        put_down_proj_outside_checkpoint(model, compiled=recipe.train.torch_compile)
    elif recipe.train.torch_compile:
        compile_decoder_layers(model)
    return model


def leave_last_layers_unchecked(model, count: int) -> list[int]:
    """Turn gradient checkpointing off for the last `count` decoder layers; returns their indices.

    The last layers, because the backward reaches them first: their kept activations are freed early in the
    backward, while the peak comes at its start (every checkpointed layer's input plus these). The forward of a
    kept layer is not run twice, so each saves 1/32 of the recompute (the recompute is a third of the GEMM work of
    a frozen-base step: 2N of 6N FLOP a token). transformers checks each layer's own `gradient_checkpointing`
    flag at call time (`GradientCheckpointingLayer`), so this is the switch it offers per layer.
    """
    layers = unwrap_peft(model).model.layers
    if count > len(layers):
        raise TrainError(f"train.unchecked_layers={count} is more than the model's {len(layers)} decoder layers")
    kept = list(range(len(layers) - count, len(layers)))
    for index in kept:
        layers[index].gradient_checkpointing = False
    return kept


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place; returns how many.

    Per layer, as torchtune compiles its models, not the whole model: the 32 layers share one compiled graph
    (Dynamo treats their parameters as inputs), so compile time is one layer's; gradient checkpointing still
    discards and recomputes the layer's activations, around the compiled forward (below); and the embedding with
    its NEFTune hook, the block mask construction and the chunked loss stay eager. In place, so parameter names,
    the adapter's state dict and checkpoints are unchanged. What it buys: the element-wise work around the GEMMs
    (RMSNorm, rotary, SiLU x up, each LoRA's dropout, scale and add) runs as a few fused kernels instead of
    dozens, in the forward, the recompute and the backward.

    Where the checkpoint sits matters. transformers 5.17 checkpoints around the layer's `__call__`, so
    `nn.Module.compile` (which compiles `_call_impl`) puts the compiled forward inside the checkpoint: the layer
    keeps only its inputs for the backward. transformers 5.24 (the training image's pin) checkpoints around
    `forward` instead (`GradientCheckpointingLayer.__init_subclass__`, modeling_layers.py), so the same call
    would trace the checkpoint into the compiled graph, and AOTAutograd's partitioner then saves whatever it
    judges cheaper to keep than recompute: on the smoke model 2.3x the bytes eager checkpointing keeps, and at
    the Mistral-7B shape an out-of-memory error under the 24 GiB cap (tests/test_gpu_train.py, H200,
    2026-12-01). Under 5.24 each layer's forward is therefore that wrapper's own logic around the compiled
    original forward: the checkpoint outside the graph, as in 5.17 (tests/test_train_model.py checks that a
    compiled layer saves what an eager checkpointed one saves).
    """
    core = unwrap_peft(model)
    layers = core.model.layers
    for layer in layers:
        inner = _unwrapped_forward(type(layer))
        if inner is None:  # transformers 5.17: the checkpoint is around __call__, outside _call_impl
            layer.compile()
        else:
            layer.forward = types.MethodType(_checkpoint_outside(_compiled(inner)), layer)
    return len(layers)


def _unwrapped_forward(cls):
    """The layer class's own forward under transformers 5.24's checkpointing wrapper, or None when its forward
    is not so wrapped."""
    forward = cls.forward
    code = getattr(forward, "__code__", None)
    if code is not None and code.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__"):
        return forward.__wrapped__
    return None


@functools.cache
def _compiled(forward):
    """One compiled function per layer class's forward: every layer runs (and shares the graphs of) this one."""
    return torch.compile(forward)


def _checkpoint_outside(compiled, head=None, tail=None):
    """transformers 5.24's `forward_with_checkpointing` (modeling_layers.py) with the compiled forward inside:
    checkpointed when the layer's own flag says so in training with gradients (the flag read at call time, so
    train.unchecked_layers and the offloaded layers still switch it per layer), `use_cache` off there and, unless
    the layer may checkpoint with one, no cache (a recompute would update it twice). With `head` and `tail`
    (train.down_proj_outside_checkpoint), a checkpointed layer checkpoints `head` and runs `tail` after it."""
    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if not getattr(self, "_can_checkpoint_with_cache", False):
                for name in ("cache", "layer_past"):
                    if kwargs.get(name) is not None:
                        kwargs[name] = None
            if head is not None:
                return tail(self, *self._gradient_checkpointing_func(functools.partial(head, self, **kwargs), *args))
            return self._gradient_checkpointing_func(functools.partial(compiled, self, **kwargs), *args)
        return compiled(self, *args, **kwargs)
    return forward


def put_down_proj_outside_checkpoint(model, compiled: bool) -> int:
    """train.down_proj_outside_checkpoint: each decoder layer's forward as `_layer_head` under the checkpoint and
    `_layer_tail` after it, compiled when `compiled` (as `compile_decoder_layers` compiles the whole forward);
    returns how many layers. Unchecked and offloaded layers (their flag off) run the whole forward as before.

    Why: a checkpointed layer's recompute reruns its forward to regenerate what its backward needs, and the last
    thing that forward computes, the frozen 4-bit down projection and the two adds after it, regenerates nothing:
    its output is the layer's output, which the backward never needs (the next layer's checkpoint already holds
    it as its input), and bitsandbytes' 4-bit product keeps only the packed weight for its own backward. At the
    Mistral-7B shape that product is 2 x 4096 x 14336 FLOP a token of the layer's 2 x 218M (27%). torch's
    checkpoint cannot skip it: its early stop ends a recompute at the last saved tensor, but a compiled layer
    saves all of its tensors at once when its graph ends, and peft computes the base product before the LoRA
    term. What moves out of the checkpoint keeps nothing for the backward (the adds keep nothing either), so the
    kept bytes are the same (tests/test_train_model.py); the backward now holds the down projection's input
    gradient during the layer's recompute, as the whole layer held it beside the recomputed activations.
    """
    from peft.tuners.lora.bnb import Linear4bit

    layers = unwrap_peft(model).model.layers
    inner = _unwrapped_forward(type(layers[0]))
    if inner is None:
        raise TrainError("train.down_proj_outside_checkpoint needs transformers' checkpointing around the layer's "
                         "forward (GradientCheckpointingLayer, transformers >= 5.24): this transformers "
                         "checkpoints around __call__")
    for layer in layers:
        down = layer.mlp.down_proj
        if not isinstance(down, Linear4bit) or plain_lora_parts(down) is None:
            raise TrainError(f"train.down_proj_outside_checkpoint needs a 4-bit base with one plain LoRA adapter on "
                             f"down_proj (peft's bnb Linear4bit); this model's is {type(down).__name__}")
    whole, head, tail = ((_compiled(inner), _compiled(_layer_head), _compiled(_layer_tail)) if compiled
                         else (inner, _layer_head, _layer_tail))
    for layer in layers:
        layer.forward = types.MethodType(_checkpoint_outside(whole, head, tail), layer)
    return len(layers)


def _layer_head(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
    """MistralDecoderLayer.forward and MistralMLP.forward (transformers 5.24, modeling_mistral.py) up to the down
    projection, and of that projection (peft 0.21 `Linear4bit.forward`, tuners/lora/bnb.py) only the LoRA term:
    `lora_B(lora_A(dropout(x))) * scaling`, cast to the base output's dtype (x's: bitsandbytes returns its input's
    dtype) when autocast is off. Returns (the residual after attention, the down projection's input, that
    term); `_layer_tail` adds the base product. Written out because neither library exposes the parts: the test
    holds it bit for bit to the libraries' own forward."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    mlp = self.mlp
    x = self.post_attention_layernorm(hidden_states)
    x = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    down = mlp.down_proj
    _, lora_a, lora_b, dropout, scaling, name = plain_lora_parts(down)  # checked plain when installed
    if down.disable_adapters or list(down.active_adapters) != [name]:
        raise TrainError("train.down_proj_outside_checkpoint computes down_proj's one adapter: it is disabled or "
                         "not the active one")
    expected_dtype = x.dtype
    requires_conversion = not torch.is_autocast_enabled()
    lora_x = down._cast_input_dtype(x, lora_a.weight.dtype) if requires_conversion else x
    term = lora_b(lora_a(dropout(lora_x))) * scaling
    if requires_conversion:
        term = term.to(expected_dtype)
    return hidden_states, x, term


def _layer_tail(self, hidden_states, x, term):
    """The rest of `_layer_head`'s forward: peft's `result = base_layer(x).clone(); result = result + term`, then
    the layer's `residual + hidden_states`."""
    result = self.mlp.down_proj.base_layer(x).clone()
    return hidden_states + (result + term)


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled (response) tokens, and how many there are.

    Only labelled positions go through lm_head, in checkpointed chunks: the full logits of a 2 x 8192 batch over
    a 32k vocabulary would be 2 GiB in fp32, and prompt positions need none.
    """
    causal_lm = unwrap_peft(model)
    outputs = causal_lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    hidden = outputs.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = hidden[keep]
    targets = targets[keep]
    count = int(targets.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, LOSS_CHUNK_TOKENS):
        h = hidden[start:start + LOSS_CHUNK_TOKENS]
        t = targets[start:start + LOSS_CHUNK_TOKENS]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, causal_lm.lm_head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(causal_lm.lm_head, h, t)
    return total, count
