"""`ni_predictions.engine: static`: many prompts' greedy continuations the way a serving engine batches them.

One batch (rows of left-padded prompts, from `inference.length_batches`):
1. Prefill: one forward over all rows (or chunks of rows, `prefill_tokens`), written straight into a static KV
   cache of `rows x cache_len` slots (the prompt at slots [0, width), left-padded; the new tokens after it), with
   the 2D padding mask over the whole cache and the position ids `generate` gives left-padded rows
   (`cumsum(mask) - 1`, pads at 1). Only the last position's logits are computed.
2. Decode: `max_new_tokens - 1` one-token steps over that cache. A step's inputs live in fixed device buffers (the
   tokens, the positions, the padding mask, the finished flags), so on CUDA the step is captured once per batch
   shape as a CUDA graph and replayed: a 7B step is about a thousand kernels, launched one by one from Python they
   cost many times the time the weights take to stream (the serve engine's `GraphDecoder`, the same reasoning).
   The token choice is on the device: argmax, a finished row emits the pad token (`generate`'s rule:
   `next * unfinished + pad * (1 - unfinished)`, the end-of-sequence id finishing a row), so no step waits on the
   host; every `DONE_CHECK_EVERY` steps one small read asks whether every row is done, and stops the batch if so.

Why the replay is correct: the cache owns the write position (`StaticLayer.cumulative_length`, a device tensor
advanced in place by each update, which the mask also reads as the query's slot); the step's rotary positions are
a buffer advanced in place inside the graph; the padding mask is fixed for the batch (0 at a row's left pads, 1
elsewhere: slots after the query are cut by the causal mask). So a replay reads and advances the same tensors an
eager step would, with no host value baked in (serve/decode.py's notes, for one row).

Shapes are bucketed so that few graphs are captured: rows rounded up to 1, 2, 4, 8, then multiples of 8, the cache
length (prompt width + new tokens) rounded up to four sizes an octave (at most 25% and typically about 10% more
slots, all masked). Extra rows are copies of the batch's last row, their outputs dropped. Every shape's cache is a
view into one arena per layer (sized at first use to the batch token budget, `reserve_slots`, which bucketed
batches never pass; grown, dropping the shapes, only for a larger one), so the memory is that of the largest batch
however many shapes were captured, and the graphs share one memory pool (each step writes its results into
buffers allocated outside it, so no graph's output lives in memory another graph may reuse).

The decode steps' attention is SDPA or, `attention="grouped"` (the recipe's default), the serve engine's grouped
decode attention: a masked step over a static cache makes SDPA copy the 8 KV heads out to 32 first, which cost
11.6 of 28.9 s on an H200 at the Mistral-7B shape (benchmarks/results, seventh session).

The maths is `generate`'s: the same forward, the same masks (extra masked slots contribute exact zeros), the same
argmax; tests/test_data_static_engine.py checks the tokens equal `generate`'s on CPU in fp32, an early EOS
included, and the replayed graph against the same steps run eagerly on CUDA in bf16.
"""

from __future__ import annotations

import copy

import torch

from birbal.serve.decode import WARMUP_STEPS, cache_kwarg

DONE_CHECK_EVERY = 8  # steps between the one host read that ends a batch whose rows have all finished


def bucket_rows(rows: int) -> int:
    """1, 2, 4, 8, then the next multiple of 8."""
    if rows <= 8:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // 8) * 8


def bucket_length(slots: int) -> int:
    """Four sizes an octave (multiples of a quarter of the octave's lower end), at least 16."""
    if slots <= 16:
        return 16
    step = 1 << ((slots - 1).bit_length() - 3)
    return -(-slots // step) * step


def _cache_over(config, cache_len: int, tensors: list[tuple[torch.Tensor, torch.Tensor]]):
    """A `StaticCache` whose layers store into the given (keys, values) tensors, each (rows, KV heads, slots,
    head dim), its write positions at 0."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=cache_len)
    for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
        # The layer as its `lazy_initialization` would leave it, but over these tensors (same dtype, device and
        # layout). Written here, not through `early_initialization`, which would allocate its own buffers first.
        layer.device, layer.batch_size, layer.num_heads = keys.device, keys.shape[0], keys.shape[1]
        layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
        layer.keys, layer.values = keys, values
        layer.cumulative_length = torch.zeros((), dtype=torch.long, device=keys.device)
        layer.is_initialized = True
    return cache


class _Shape:
    """One bucketed batch shape: its cache (views into the arena), its step's buffers and, on CUDA, its graph."""

    def __init__(self, engine: StaticEngine, rows: int, cache_len: int):
        self.rows, self.cache_len = rows, cache_len
        device = engine.device
        self._config = engine.cache_config
        self.cache = _cache_over(self._config, cache_len,
                                 [engine.arena_views(index, rows, cache_len)
                                  for index in range(self._config.num_hidden_layers)])
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.mask = torch.ones((rows, cache_len), dtype=torch.bool, device=device)  # as the model converts it
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def rewind(self, length: int = 0) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)  # in place: the graph's captured address stays valid

    def rows_cache(self, start: int, stop: int):
        """A cache over rows [start, stop) of this one (views: what it writes lands here), for a chunk's prefill."""
        return _cache_over(self._config, self.cache_len,
                           [(layer.keys[start:stop], layer.values[start:stop]) for layer in self.cache.layers])


class StaticEngine:
    """Greedy continuations of many prompts at once over a static KV cache; `graphs`: replay each step as a CUDA
    graph (CUDA only); off, the same steps run eagerly (the CPU path, and the GPU test's reference)."""

    def __init__(self, model, pad_token_id: int, eos_token_id: int | None, max_new_tokens: int,
                 graphs: bool | None = None, attention: str = "sdpa", reserve_slots: int = 0,
                 prefill_tokens: int | None = None):
        """`attention`: `sdpa` (the model's own) or `grouped`: the serve engine's decode attention
        (serve/attention.py: the 4 query heads of a KV head as one matrix product, no 4x copy of the cache per
        step; prompts still run SDPA), or `triton`: the same as serve/flash_decode.py's kernels (each row's own
        mask; grouped where there is no CUDA device). It sets the model's attention implementation, for every later forward.
        `reserve_slots`: the arena's size at first use (the batch token budget, which bucketed batches never
        pass), so that it is not grown, and the shapes recaptured, as bigger batches come.
        `prefill_tokens`: the most prompt tokens (rows x width) one prefill forward takes; a bigger batch's rows
        are prefilled in chunks into their rows of the cache (rows are independent: the same maths), so the
        prefill's activations stay that size while the decode still steps every row at once. None: one forward."""
        if attention not in ("sdpa", "grouped", "triton"):
            raise ValueError(f"attention must be sdpa, grouped or triton; given {attention!r}")
        self.attention = "sdpa"  # what the decode steps' attention runs (serve.engine's report of the same)
        if attention != "sdpa":
            from birbal.serve.attention import use_decode_attention

            self.attention = use_decode_attention(model, attention)
        self.model = model
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        self.pad, self.eos, self.max_new_tokens = pad_token_id, eos_token_id, max_new_tokens
        self._cache_kw = cache_kwarg(model)
        # Full-attention layers whatever the model's sliding window, as serve.decode's StaticDecoder builds its
        # cache: a sliding-window layer keeps its length in a Python int, which a replay would freeze. The window
        # still applies through the mask, built from the model's own config.
        config = copy.deepcopy(model.config.get_text_config(decoder=True))
        config.sliding_window = None
        config.layer_types = None
        self.cache_config = config
        # the keys' and values' dtype is the hidden states', the embedding's (a 4-bit base's first parameters
        # may be packed uint8 weights)
        self._dtype = model.get_input_embeddings().weight.dtype
        self._kv_heads = config.num_key_value_heads
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._arena: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._arena_slots = 0
        self._reserve_slots = reserve_slots
        self.prefill_tokens = prefill_tokens
        self._shapes: dict[tuple[int, int], _Shape] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.captured = 0  # graphs captured so far (a test and the benchmark read it)
        self.capture_s = 0.0  # seconds spent capturing them (warm-up steps included)

    # --- memory --------------------------------------------------------------------------------------------------

    def arena_views(self, layer: int, rows: int, cache_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = rows * self._kv_heads * cache_len * self._head_dim
        keys, values = self._arena[layer]
        shape = (rows, self._kv_heads, cache_len, self._head_dim)
        return keys[:size].view(shape), values[:size].view(shape)

    def _ensure_arena(self, slots: int) -> None:
        """Room for `slots` (rows x cache length) per layer; a bigger arena drops every shape and graph over the
        old one. Zeros: a masked slot is multiplied by 0, and 0 x a stale finite value is 0."""
        if slots <= self._arena_slots:
            return
        slots = max(slots, self._reserve_slots)
        self._shapes.clear()
        self._arena, self._arena_slots = [], 0  # the old arena freed first (so the check below counts its room)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        size = slots * self._kv_heads * self._head_dim
        layers = self.cache_config.num_hidden_layers
        if self.device.type == "cuda":
            self._check_room(2 * layers * size * torch.finfo(self._dtype).bits // 8, slots)
        self._arena = [(torch.zeros(size, dtype=self._dtype, device=self.device),
                        torch.zeros(size, dtype=self._dtype, device=self.device)) for _ in range(layers)]
        self._arena_slots = slots

    def _check_room(self, arena_bytes: int, slots: int) -> None:
        """A one-line error, before the allocation, when the cache arena cannot fit the GPU's free memory (a CUDA
        out-of-memory error later would name neither the setting nor its size)."""
        from birbal.errors import DataError

        free, total = torch.cuda.mem_get_info(self.device)
        if arena_bytes > free:
            raise DataError(
                f"natural_instructions.predictions: the static KV cache for {slots:,} tokens (max_batch_tokens) "
                f"needs {arena_bytes / 2**30:.1f} GiB, and the GPU has {free / 2**30:.1f} GiB free of "
                f"{total / 2**30:.1f}; lower max_batch_tokens (the defaults, 49152 with max_prefill_tokens 16384, "
                f"peaked at 22.0 GiB at the Mistral-7B shape: a 24 GB card's budget, benchmarks/results)")

    def shape_for(self, rows: int, width: int) -> _Shape:
        key = (bucket_rows(rows), bucket_length(width + self.max_new_tokens))
        if key not in self._shapes:
            self._ensure_arena(key[0] * key[1])
            shape = _Shape(self, *key)
            if self.graphs and self.max_new_tokens > 1:  # one new token is the prefill's: no step to replay
                self._capture(shape)
            self._shapes[key] = shape
        return self._shapes[key]

    # --- the step ------------------------------------------------------------------------------------------------

    def _forward(self, shape: _Shape, input_ids: torch.Tensor, positions: torch.Tensor, rows: slice | None = None
                 ) -> torch.Tensor:
        """The last position's logits; `rows`: a chunk of the batch's rows only (a prefill chunk)."""
        mask, cache = (shape.mask, shape.cache) if rows is None else (shape.mask[rows],
                                                                      shape.rows_cache(rows.start, rows.stop))
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1]

    def _choose(self, shape: _Shape, logits: torch.Tensor) -> None:
        """The next tokens into `shape.tokens`, on the device: argmax, a finished row's pad, EOS finishing a row."""
        chosen = torch.where(shape.done, torch.full_like(shape.done, self.pad, dtype=torch.long),
                             logits.argmax(dim=-1))
        if self.eos is not None:
            shape.done |= chosen == self.eos
        shape.tokens.copy_(chosen.view(-1, 1))

    def _step(self, shape: _Shape) -> None:
        logits = self._forward(shape, shape.tokens, shape.positions)
        shape.positions.add_(1)
        self._choose(shape, logits)

    def _capture(self, shape: _Shape) -> None:
        """Warm-up steps on a side stream (allocating workspaces and picking kernels outside the capture), then
        the capture; both on the empty cache, which the batch's prefill rewinds."""
        import time

        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(shape)
        shape.graph = graph
        self.captured += 1
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start

    # --- a batch -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, encoded: list[list[int]]) -> list[list[int]]:
        """The new token ids of each row (`max_new_tokens` of them; a row finished by EOS continues with pads)."""
        real = len(encoded)
        width = max(len(ids) for ids in encoded)
        shape = self.shape_for(real, width)
        rows = encoded + [encoded[-1]] * (shape.rows - real)  # bucket filler: a real row again, never all-masked
        pads = [width - len(ids) for ids in rows]
        input_ids = torch.tensor([[self.pad] * p + ids for p, ids in zip(pads, rows, strict=True)],
                                 device=self.device)
        mask = torch.ones((shape.rows, shape.cache_len), dtype=torch.long)
        for row, p in enumerate(pads):
            mask[row, :p] = 0
        shape.mask.copy_(mask)
        prompt_mask = mask[:, :width]
        positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1).to(self.device)
        shape.rewind()
        shape.done.zero_()
        chunk = shape.rows if self.prefill_tokens is None else max(1, self.prefill_tokens // width)
        if chunk >= shape.rows:
            logits = self._forward(shape, input_ids, positions)
        else:
            parts = [slice(start, min(start + chunk, shape.rows)) for start in range(0, shape.rows, chunk)]
            logits = torch.cat([self._forward(shape, input_ids[part], positions[part], part) for part in parts])
            shape.rewind(width)  # each chunk's cache counted its own writes: the batch's holds `width` now
        shape.positions.copy_(positions[:, -1:] + 1)
        self._choose(shape, logits)
        out = torch.full((shape.rows, self.max_new_tokens), self.pad, dtype=torch.long, device=self.device)
        out[:, 0] = shape.tokens[:, 0]
        for step in range(1, self.max_new_tokens):
            if step % DONE_CHECK_EVERY == 0 and bool(shape.done[:real].all()):
                break  # every real row has finished: the rest of `out` is pads already
            if shape.graph is not None:
                shape.graph.replay()
            else:
                self._step(shape)
            out[:, step] = shape.tokens[:, 0]
        return out[:real].tolist()
