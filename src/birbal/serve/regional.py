"""`serve.decode: compiled_layers`: the decode step with each decoder layer's forward compiled, one graph for all.

Why per layer: compiling the whole 1-token step (`compiled_graph`) hands Dynamo and Inductor all 32 layers as one
graph. On the unmerged adapter (peft's Python around 224 LoRA projections) its warm-up was still compiling after
283 s at the Mistral-7B shape (benchmarks/results/README.md, fifth session). The 32 layers run the same code on
parameters of the same shapes, so compiled once (Dynamo treats a module's parameters as inputs) they share one
graph: one layer is traced and compiled, whatever the depth; with the cache's slot dimension dynamic
(`serve.decode_compile_lengths: one`, the default) that one graph serves every cache length. This is PyTorch's
documented "regional compilation" recipe, as training's `compile_decoder_layers` does it.

What stops a plain `layer.compile()` here: the attention writes its keys and values with
`cache.update(k, v, self.layer_idx)`, which selects the cache's layer by a Python int. Dynamo specialises on it,
so each of the 32 layers would be one more compile (and the 9th would hit Dynamo's recompile limit and fall back to
eager, silently). Handed the whole cache, the layer's graph would also depend on which of its layers it picked.
So each layer is given the one cache layer it writes, behind the cache's own `update` signature
(`_LayerCache.update` ignores the index it is passed): the index is never read inside the graph, and the cache
layer's tensors (same shapes in every layer) are graph inputs like the parameters. The write itself is still
transformers' `StaticLayer.update`, traced.

The compiled forward runs only inside the decode step (`RegionalLayers.active(cache)`), for the static cache the
step decodes over; the prompt's prefill (any length, a `DynamicCache`) runs the same layers eagerly. Embedding,
rotary tables, the mask, the final norm and lm_head stay eager: a few dozen kernels in a step of over a thousand,
and all inside the CUDA graph the decoder captures around the step.

The model's maths are unchanged: the layer's own forward and modules, compiled by Inductor as `compiled_graph` is
(float rounding may differ: tests/test_serve_decode.py compares it with eager).

Three forms for the kernels they save (a decode step's small kernels cost their launch and latency, not their
bytes); the first two change no maths:
- `serve.decode_length_update: step`: transformers' `StaticLayer.update` adds the step's length to its layer's
  `cumulative_length` in place, a kernel in each of the 32 layers. Every layer of the step reads the same length
  (the decoder resets and fills them together), so here each layer's write reads its length but does not add to
  it, and after the step one `torch._foreach_add_` advances all 32 (one kernel on CUDA). The writes themselves are
  `StaticLayer.update`'s (`index_copy_` at `arange(new) + cumulative_length`).
- `serve.decode_combo_kernels`: Inductor's horizontal fusion (`combo_kernels`) of independent kernels of the layer's
  graph into one launch (the q rotary, and the k rotary and cache writes, read the same product and write
  different buffers): the same per-element code, launched together.
- `serve.decode_compile_rest`: the two modules of the step outside the layers that are several eager kernels each
  compiled too, each its own region (`model.rotary_emb`, the step's cos and sin tables: about 8 kernels; the final
  `model.norm`: about 7), Inductor's float rounding as in the layers.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from birbal.errors import ServeError
from birbal.models import unwrap_peft

_ATTR = "_birbal_regional_layers"  # on the core model: installed once, shared by every decoder on that model
CACHE_KWARGS = ("cache", "past_key_values")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # serve.decode_compile_mode  # transformers 5.24 and 5.17 names of the layer's cache argument


LENGTH_UPDATES = ("layer", "step")  # serve.decode_length_update
REST = ("rotary_emb", "norm")  # serve.decode_compile_rest: the core model's modules compiled outside its layers


def check_length_update(value: str) -> str:
    if value not in LENGTH_UPDATES:
        raise ServeError(f"serve.decode_length_update must be layer or step; given {value!r}")
    return value


class _LayerCache:
    """One layer of a `StaticCache`, with the cache's `update(key_states, value_states, layer_idx, ...)`: the
    attention's call reaches this layer whatever index it passes (the index is what makes Dynamo recompile).
    `defer`: the write without the length's increment (serve.decode_length_update step; the step adds it)."""

    __slots__ = ("layer", "defer")

    def __init__(self, layer, defer: bool = False):
        self.layer, self.defer = layer, defer

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if not self.defer:
            return self.layer.update(key_states, value_states, *args, **kwargs)
        # transformers 5.24's StaticLayer.update (cache_utils.py) for an initialized layer, less its
        # `cumulative_length.add_(kv_length)` (`RegionalLayers.active` checks the layers are initialized StaticLayers)
        layer = self.layer
        position = torch.arange(key_states.shape[-2], device=layer.keys.device) + layer.cumulative_length
        layer.keys.index_copy_(2, position, key_states)
        layer.values.index_copy_(2, position, value_states)
        return layer.keys, layer.values


class RegionalLayers:
    """The decoder layers of one model, each routed through one compiled forward while `active`."""

    def __init__(self, core):
        layers = getattr(getattr(core, "model", None), "layers", None)
        if layers is None or len(layers) == 0:
            raise ServeError(f"serve.decode=compiled_layers needs a model with decoder layers at .model.layers; "
                             f"{type(core).__name__} has none (use compiled_graph or cuda_graph)")
        classes = {type(layer) for layer in layers}
        if len(classes) != 1:
            raise ServeError(f"serve.decode=compiled_layers needs one decoder layer class; found "
                             f"{sorted(c.__name__ for c in classes)}")
        layer_class = classes.pop()
        # The undecorated forward (transformers wraps it to rename past_key_values to cache, and that wrapper's
        # code object is shared by every wrapped function, so Dynamo would keep their compiles in one list).
        forward = inspect.unwrap(layer_class.forward)
        # fullgraph: a graph break would split the layer and could let the layer index back into a guard, so it
        # is an error, not a slow path. Two compiled forms, chosen per decoder (serve.decode_compile_lengths):
        # "each" (dynamic=False): one graph per cache length; "one": the cache's slot dimension (keys, values and
        # the mask's last dimension) marked dynamic, so one graph serves every cache length (one trace and one
        # compile at start-up instead of one per length; the attention is an extern SDPA call either way).
        # Each form also per Inductor mode (serve.decode_compile_mode: "default", or "max-autotune-no-cudagraphs",
        # which times Triton's GEMM templates against cuBLAS for every product shape at compile time; Inductor's
        # own CUDA graphs stay off either way: the decoder captures its own around the step).
        self._forward = forward
        self.compiled = {"each": torch.compile(forward, dynamic=False, fullgraph=True),
                         "one": torch.compile(forward, dynamic=None, fullgraph=True)}
        self._compiled_modes: dict[tuple[str, str, bool], object] = {}
        # One graph per cache length and model kind is expected (3 lengths for the merged model and 3 for the
        # adapter, in a process that serves both, as the benchmark does): past Dynamo's default limit of 8 a frame
        # silently runs eagerly, which would serve at cuda_graph's speed under this mode's name.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))
        self.layer_class = layer_class.__name__
        self.layers = len(layers)
        self._cache = None
        self._lengths = "one"
        self._compiled_fn = self.compiled["one"]
        self._deferred: list | None = None  # decode_length_update step: (cumulative_length, new positions) a layer
        for index, layer in enumerate(layers):
            layer.forward = self._routed(layer, getattr(getattr(layer, "self_attn", None), "layer_idx", index))
        # serve.decode_compile_rest: the rotary tables and the final norm, each its own compiled region, routed like
        # the layers (their forwards as the class defines them: the rotary's is wrapped by transformers'
        # dynamic_rope_update, which Dynamo traces through)
        self._rest = False
        self.rest = {}
        for name in REST:
            module = getattr(core.model, name, None)
            if isinstance(module, torch.nn.Module):
                self.rest[name] = torch.compile(type(module).forward, dynamic=False, fullgraph=True)
                module.forward = self._routed_rest(module, name)

    @classmethod
    def install(cls, model) -> RegionalLayers:
        core = unwrap_peft(model)
        existing = getattr(core, _ATTR, None)
        if existing is None:
            existing = cls(core)
            object.__setattr__(core, _ATTR, existing)  # not a submodule, not in the state dict
        return existing

    def _routed(self, layer, index: int):
        eager = layer.forward  # the bound forward of the class, as transformers wrote it

        def forward(*args, **kwargs):
            cache = self._cache
            name = next((k for k in CACHE_KWARGS if k in kwargs), None)
            if cache is None or name is None or kwargs[name] is not cache:
                return eager(*args, **kwargs)  # a prefill, or any forward outside the decode step
            cache_layer = cache.layers[index]
            deferred = self._deferred
            kwargs[name] = _LayerCache(cache_layer, defer=deferred is not None)
            if deferred is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                deferred.append((cache_layer.cumulative_length, hidden.shape[-2]))
            if self._lengths == "one":
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(mask, mask.dim() - 1)
                for tensor in (cache_layer.keys, cache_layer.values):
                    torch._dynamo.maybe_mark_dynamic(tensor, 2)
            return self._compiled_fn(layer, *args, **kwargs)

        return forward

    def _routed_rest(self, module, name: str):
        eager = module.forward

        def forward(*args, **kwargs):
            if self._cache is None or not self._rest:
                return eager(*args, **kwargs)
            return self.rest[name](module, *args, **kwargs)

        return forward

    def compiled_for(self, lengths: str, mode: str = "default", combo: bool = False):
        if lengths not in self.compiled:
            raise ServeError(f"serve.decode_compile_lengths must be one or each; given {lengths!r}")
        if mode not in COMPILE_MODES:
            raise ServeError(f"serve.decode_compile_mode must be one of {', '.join(COMPILE_MODES)}; given {mode!r}")
        if mode == "default" and not combo:
            return self.compiled[lengths]
        if (lengths, mode, combo) not in self._compiled_modes:
            dynamic = False if lengths == "each" else None
            if combo:  # the mode's own Inductor options, and combo kernels (torch.compile takes a mode or options)
                from torch._inductor import list_mode_options

                how = {"options": {**list_mode_options(mode), "combo_kernels": True}}
            else:
                how = {"mode": mode}
            self._compiled_modes[lengths, mode, combo] = torch.compile(self._forward, dynamic=dynamic,
                                                                       fullgraph=True, **how)
        return self._compiled_modes[lengths, mode, combo]

    @contextlib.contextmanager
    def active(self, cache, lengths: str = "one", mode: str = "default", combo: bool = False,
               length_update: str = "layer", rest: bool = False):
        """Route the layers' forwards through the compiled one for steps over `cache` (a StaticCache whose layers
        are allocated; a step that allocates them runs eagerly, so that no graph is traced for an empty cache).
        `combo`: serve.decode_combo_kernels; `length_update` "step": serve.decode_length_update (the layers'
        lengths advanced once, when the step leaves this context; an exception leaves them as they were); `rest`:
        serve.decode_compile_rest."""
        check_length_update(length_update)
        if not all(getattr(layer, "is_initialized", True) for layer in cache.layers):
            yield
            return
        from transformers.cache_utils import StaticLayer

        if length_update == "step" and not all(type(layer) is StaticLayer for layer in cache.layers):
            raise ServeError("serve.decode_length_update=step writes transformers' StaticLayer's cache; this cache "
                             f"has {sorted({type(layer).__name__ for layer in cache.layers})}")
        for layer in cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None),
                           getattr(layer, "cumulative_length", None)):
                if isinstance(tensor, torch.Tensor):
                    # the same tensors every step (a graph input whose address stays), not guarded by identity:
                    # 32 layers' caches are 32 tensors, which must not mean 32 graphs
                    torch._dynamo.mark_static_address(tensor, guard=False)
        self._cache, self._lengths = cache, lengths
        self._compiled_fn = self.compiled_for(lengths, mode, combo)
        self._deferred = [] if length_update == "step" else None
        self._rest = rest
        try:
            yield
            deferred, self._deferred = self._deferred, None
            if deferred:
                counts = {n for _tensor, n in deferred}
                if len(counts) != 1:
                    raise ServeError(f"the step's layers wrote different numbers of positions: {sorted(counts)}")
                torch._foreach_add_([tensor for tensor, _n in deferred], counts.pop())
        finally:
            self._cache, self._deferred, self._rest = None, None, False


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (its own counter): the warm-up reports how many it made."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
