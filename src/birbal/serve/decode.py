"""The per-step forward of one request: the prompt in one pass (prefill), then one token per step (decode).

Three decoders with one interface (`prefill(ids, all_positions, reserve)`, `step(token)`, each returning fp32
logits, and `prepare()` for the warm-up):
- `EagerDecoder`: a fresh `DynamicCache` per request, every step an eager forward (the path the engine began with).
- `StaticDecoder`: transformers' `StaticCache`s, one per cache length (serve.decode_cache_lengths, and
  serve.max_context), each allocated once and reset per request, so each step's shapes and addresses are the
  same; a request takes the shortest that holds `reserve` positions. Steps still run eagerly. The prompt runs as
  the eager decoder runs it and its keys and values are copied in. It runs on CPU, so the tests exercise the
  cache and mask path that the graph replays.
- `GraphDecoder`: the `StaticDecoder` whose 1-token step is a CUDA graph, captured once per cache length and
  replayed. A 7B decode step is over a thousand kernels; launched one by one from Python they take several times
  the 3.4 ms the weights need to stream through an H200, and a replay launches them all at once.
- `compiled_graph`: the same graphs, captured around the step compiled by torch.compile (Inductor, no CUDA graphs
  of its own): the RMSNorms, rotary embeddings, SiLU x up and residual adds become a few fused kernels per layer
  instead of dozens, and each small kernel costs a few microseconds even inside a graph. (SGLang captures its
  own graphs around a compiled model the same way.) The compiles take tens of seconds each, once, in the warm-up.

Why replay is correct (checked against transformers 5.17 and 5.24, whose forwards take no `cache_position`):
the cache owns the position. `StaticLayer` keeps its length in a device tensor (`cumulative_length`); each update
writes the new key and value at that index and adds one in place, and the model takes the step's position ids and
the mask's query offset from it (`get_seq_length`, `get_query_offset`). So a replay reads and advances the same
tensors the eager step would, with no host value baked in. The mask of a 1-token query over a static cache is
always built (`allow_is_causal_skip` is off for a compileable cache with q_length 1): every slot up to the query's
position, none after, from shape-only host decisions and tensor arithmetic, with no host sync.
"""

from __future__ import annotations

import copy
import inspect

import torch

from birbal.errors import ServeError
from birbal.models import unwrap_peft

GRAPH_MODES = ("cuda_graph", "compiled_layers", "compiled_graph")  # CUDA only
MODES = ("eager", "static", *GRAPH_MODES)
WARMUP_STEPS = 3  # eager steps on a side stream before capture, as the PyTorch CUDA graphs notes advise


def cache_kwarg(model) -> str:
    """The forward's cache keyword: transformers 5.24 renamed `past_key_values` to `cache` (the old name warns)."""
    core = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(core.forward).parameters else "past_key_values"


def resolve_mode(requested: str, model, device: torch.device) -> str:
    """`auto`: `compiled_layers` on CUDA for an unquantized model (one decoder layer compiled for all 32: ready in
    44-47 s at the 7B shape on an H200, where the whole-step `compiled_graph` took 214 s and more; benchmarks/results,
    sixth session), `eager` otherwise.

    A 4-bit base stays eager under `auto`: bitsandbytes' kernels have not been checked under graph capture here.
    """
    if requested == "auto":
        core = unwrap_peft(model)
        quantized = getattr(core, "hf_quantizer", None) is not None
        return "compiled_layers" if device.type == "cuda" and not quantized else "eager"
    if requested not in MODES:
        raise ServeError(f"serve.decode must be auto or one of {', '.join(MODES)}; given {requested!r}")
    if requested in GRAPH_MODES and device.type != "cuda":
        raise ServeError(f"serve.decode={requested} needs a CUDA device; the model is on {device}. "
                         "Use static (the same cache without graphs) or eager.")
    return requested


def make_decoder(mode: str, model, max_len: int, cache_lengths: tuple[int, ...] = (), compile_lengths: str = "one",
                 compile_mode: str = "default", combo_kernels: bool = False, length_update: str = "layer",
                 compile_rest: bool = False):
    """`cache_lengths`: the static decoders' smaller caches (serve.decode_cache_lengths); eager ignores them.
    `compile_lengths` (serve.decode_compile_lengths, compiled_layers only): one graph for every cache length
    ("one") or one per length ("each"). `compile_mode` (serve.decode_compile_mode, the compiled modes): Inductor's
    mode, "default" or "max-autotune-no-cudagraphs". `combo_kernels` (serve.decode_combo_kernels),
    `length_update` (serve.decode_length_update) and `compile_rest` (serve.decode_compile_rest): compiled_layers
    only, birbal.serve.regional."""
    if mode == "eager":
        return EagerDecoder(model, max_len)
    if mode == "compiled_graph":
        return GraphDecoder(model, max_len, cache_lengths, compile_step="model", compile_mode=compile_mode)
    if mode == "compiled_layers":
        return GraphDecoder(model, max_len, cache_lengths, compile_step="layers", compile_lengths=compile_lengths,
                            compile_mode=compile_mode, combo_kernels=combo_kernels, length_update=length_update,
                            compile_rest=compile_rest)
    return {"static": StaticDecoder, "cuda_graph": GraphDecoder}[mode](model, max_len, cache_lengths)


class EagerDecoder:
    mode = "eager"

    def __init__(self, model, max_len: int):
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self._cache_kw = cache_kwarg(model)
        self._cache = None

    def _forward(self, input_ids: torch.Tensor, all_positions: bool, cache=None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=0 if all_positions else 1,
                         **{self._cache_kw: self._cache if cache is None else cache})
        return out.logits[0].float()

    def prepare(self) -> None:
        """Work to do before the first request (the graph decoders capture theirs); nothing here."""

    def prefill(self, ids: list[int], all_positions: bool, reserve: int = 0) -> torch.Tensor:
        """Logits of every prompt position (`all_positions`, for echo) or of the last: shape (rows, vocab).
        `reserve`: positions the request may fill in all, prompt included (a static decoder sizes its cache by it)."""
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.model.config)
        return self._forward(torch.tensor([ids], device=self.device), all_positions)

    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """The logits after appending `token`: shape (vocab,). `token` is an id, or a 0-d tensor of one on the
        model's device (the engine's choice, not yet read by the host: the step is queued behind it)."""
        return self._forward(torch.as_tensor(token, device=self.device).view(1, 1), all_positions=False)[-1]


class StaticDecoder(EagerDecoder):
    """The eager decoder's forward over `StaticCache`s kept across requests (its own prefill and step).

    One cache per length in `cache_lengths` (those below `max_len`) plus one of `max_len`; a request takes the
    shortest that holds its prompt and its new tokens. Why several: a step attends over every slot of its cache,
    filled or not (a static shape is what lets a graph replay it), so a 1,100-token request in a 4,096-slot cache
    would read, and with SDPA's mask first expand to 32 heads, nearly four times the keys and values it needs.
    """

    mode = "static"

    def __init__(self, model, max_len: int, cache_lengths: tuple[int, ...] = (), *, compile_step: str | bool = False,
                 compile_lengths: str = "one", compile_mode: str = "default", combo_kernels: bool = False,
                 length_update: str = "layer", compile_rest: bool = False):
        """`compile_step`: False (eager steps), "model" (`compiled_graph`: torch.compile of the whole 1-token
        step) or "layers" (`compiled_layers`: each decoder layer's forward compiled, one graph shared by all;
        `birbal.serve.regional`). `compile_mode`: Inductor's mode for either ("default" or
        "max-autotune-no-cudagraphs": never Inductor's own CUDA graphs, the GraphDecoder captures its own).
        `combo_kernels`, `length_update`, `compile_rest`: the compiled layers' forms (birbal.serve.regional)."""
        super().__init__(model, max_len)
        if compile_step is True:
            compile_step = "model"
        if compile_step not in (False, "model", "layers"):
            raise ServeError(f"compile_step must be False, 'model' or 'layers'; given {compile_step!r}")
        self.compile_step = compile_step
        self.compile_lengths = compile_lengths
        from birbal.serve.regional import COMPILE_MODES

        if compile_mode not in COMPILE_MODES:
            raise ServeError(f"serve.decode_compile_mode must be one of {', '.join(COMPILE_MODES)}; "
                             f"given {compile_mode!r}")
        self.compile_mode = compile_mode
        from birbal.serve.regional import check_length_update

        if (combo_kernels or compile_rest or length_update != "layer") and compile_step != "layers":
            raise ServeError("serve.decode_combo_kernels, decode_compile_rest and decode_length_update=step are "
                             "forms of the compiled layers: they need serve.decode=compiled_layers")
        self.combo_kernels, self.compile_rest = combo_kernels, compile_rest
        self.length_update = check_length_update(length_update)
        self.cache_lengths = tuple(sorted({n for n in cache_lengths if 0 < n < max_len} | {max_len}))
        self._caches: dict[int, object] = {}  # length -> StaticCache, each built on first use
        self._cache_len = max_len  # the length of the cache `_cache` is, for this request
        # dynamic=False: the step's shapes change only with the cache's length, so one specialised graph per
        # length (a new length is a recompile, well inside Dynamo's limit of 8); Inductor's own CUDA graphs stay
        # off (the GraphDecoder captures its own, around this).
        self._step_fn = (torch.compile(self._one_token, dynamic=False,
                                       **({} if compile_mode == "default" else {"mode": compile_mode}))
                         if compile_step == "model" else self._one_token)
        self._regional = None
        if compile_step == "layers":
            from birbal.serve.regional import RegionalLayers

            self._regional = RegionalLayers.install(model)
        self._length = 0  # positions filled in this request, kept on the host only to refuse an overflow
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)

    def cache_length_for(self, positions: int) -> int:
        """The shortest cache that holds `positions` (the longest when none does: the step check refuses)."""
        return next((n for n in self.cache_lengths if n >= positions), self.max_len)

    def _new_cache(self):
        """A `StaticCache` of full-attention layers, whatever the model's sliding window.

        A sliding-window layer (`StaticSlidingWindowLayer`) keeps its length in a Python int, which the mask reads
        as the query offset: a captured graph would replay the capture's position forever. The window is still
        applied, by the mask function chosen from the model's own config (`sliding_window_causal_mask_function`);
        the cache just keeps every position up to `max_len` (Mistral-7B: window 4096 = serve.max_context anyway).
        """
        from transformers import StaticCache

        config = copy.deepcopy(self.model.config.get_text_config(decoder=True))
        config.sliding_window = None
        config.layer_types = None
        return StaticCache(config=config, max_cache_len=self._cache_len)

    def _reset(self, cache_len: int) -> None:
        """Make the cache of `cache_len` slots the current one, emptied."""
        # Built on first use, so that it is made inside the engine's inference mode (its tensors are then
        # inference tensors, updated in place there); its layers allocate on their first update.
        self._cache_len = cache_len
        if cache_len not in self._caches:
            self._caches[cache_len] = self._new_cache()
        else:
            self._caches[cache_len].reset()  # in place: the graph's captured addresses stay valid
        self._cache = self._caches[cache_len]
        self._length = 0

    def prefill(self, ids: list[int], all_positions: bool, reserve: int = 0) -> torch.Tensor:
        """The prompt runs over a fresh `DynamicCache`, as the eager decoder runs it, and its keys and values are
        then written into the static cache that holds `reserve` positions (the cache's own `update`, one copy per
        layer).

        Why not straight into the static cache: a forward over it attends over every slot of the cache with an
        explicit mask, so SDPA can use neither its flash kernel nor `is_causal`, and first copies the 8 KV heads
        out to 32, for every prompt token. Over a DynamicCache the prompt attends over itself only. The DynamicCache is built
        without the model's config so that every layer keeps every position (a sliding-window layer would drop
        those before the window, which the static cache, indexed by position, must hold); the window still
        applies through the mask, which is built from the model's config.
        """
        from transformers import DynamicCache

        if len(ids) > self.max_len:
            raise ServeError(f"{len(ids)} prompt tokens do not fit the static cache of {self.max_len}")
        self._reset(self.cache_length_for(max(len(ids), reserve)))
        prompt_cache = DynamicCache()
        logits = self._forward(torch.tensor([ids], device=self.device), all_positions, cache=prompt_cache)
        for index, layer in enumerate(prompt_cache.layers):
            self._cache.update(layer.keys, layer.values, index)
        self._length = len(ids)
        return logits

    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        # Past the end, index_copy_ would raise on CPU but write out of bounds on CUDA: refuse it here.
        if self._length >= self._cache_len:
            raise ServeError(f"decode step {self._length + 1} does not fit the static cache of {self._cache_len}")
        if isinstance(token, torch.Tensor):
            self._token.copy_(token.view(1, 1))  # on the device, queued: the graph reads its input from here
        else:
            self._token.fill_(token)
        self._length += 1
        return self._decode_step()

    def _one_token(self, token: torch.Tensor) -> torch.Tensor:
        return self._forward(token, all_positions=False)[-1]

    def _decode_step(self) -> torch.Tensor:
        if self._regional is not None:
            with self._regional.active(self._cache, self.compile_lengths, self.compile_mode, self.combo_kernels,
                                       self.length_update, self.compile_rest):
                return self._step_fn(self._token)
        return self._step_fn(self._token)


class GraphDecoder(StaticDecoder):
    mode = "cuda_graph"

    def __init__(self, model, max_len: int, cache_lengths: tuple[int, ...] = (), *, compile_step: str | bool = False,
                 compile_lengths: str = "one", compile_mode: str = "default", combo_kernels: bool = False,
                 length_update: str = "layer", compile_rest: bool = False):
        super().__init__(model, max_len, cache_lengths, compile_step=compile_step, compile_lengths=compile_lengths,
                         compile_mode=compile_mode, combo_kernels=combo_kernels, length_update=length_update,
                         compile_rest=compile_rest)
        if self.compile_step:
            self.mode = "compiled_layers" if self.compile_step == "layers" else "compiled_graph"
        if self.device.type != "cuda":
            raise ServeError(f"the cuda_graph decoder needs a CUDA device; the model is on {self.device}")
        # cache length -> (the captured step, its fp32 logits: a fixed buffer in the graph's pool, overwritten by
        # each replay)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def prepare(self) -> None:
        """Capture the step for every cache length now (the server's warm-up), not at the first request of each."""
        for cache_len in self.cache_lengths:
            if cache_len not in self._graphs:
                self._capture(cache_len)

    def prefill(self, ids: list[int], all_positions: bool, reserve: int = 0) -> torch.Tensor:
        cache_len = self.cache_length_for(max(len(ids), reserve))
        if cache_len not in self._graphs:
            self._capture(cache_len)
        return super().prefill(ids, all_positions, reserve)

    def _capture(self, cache_len: int) -> None:
        """Capture the 1-token step over the cache of `cache_len` slots, once (before a prefill, whose reset
        undoes the warm-up's writes). Warm-up runs eagerly on a side stream: it allocates the cache layers and
        lets libraries pick kernels and workspaces outside the capture; compiled, it also compiles this length."""
        self._reset(cache_len)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                super()._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = super()._decode_step()
        self._graphs[cache_len] = (graph, logits)

    def _decode_step(self) -> torch.Tensor:
        graph, logits = self._graphs[self._cache_len]
        graph.replay()
        return logits
