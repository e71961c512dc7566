"""The generation engine: one model, one request at a time, a plain decode loop over a KV cache.

The forward of each step (eager, static cache, or CUDA-graph replay: `serve.decode`) is `birbal.serve.decode`'s.

Why not `model.generate`: the winners' server asked it for `output_scores` and took a full-vocabulary softmax
of every stored step afterwards; here each step does only what the response needs (the chosen token's logprob
and the `top_k_per_token` best), on the device, with one device-to-host copy per step.

The next step is queued before the host reads the token it appends: the chosen id stays on the device, the step
is launched with it, and only then does the host wait, for the small copy alone, which the stream runs before the
step. The host's work per token (the logprob dict, detokenizing, stop checks) then runs while the GPU computes
the next step, instead of between steps. (SGLang's overlap scheduler does the same across a batch.) When the
token ends the generation (end of sequence, a stop sequence) that step was wasted; its writes go to a cache the
next request resets.

`serve.request_policy: upstream` (birbal-4090) answers as the winners' server did instead, over the same
decoders and the same queued steps: `birbal.serve.upstream` and `_process_upstream`. What follows is `kit`.

Which distribution a logprob is under (HELM reads `logprob` as the model's log-probability of the text):
- greedy (temperature <= 1e-5): the model's own distribution, log_softmax of the raw logits. Greedy is the
  temperature -> 0 limit, whose distribution is a point mass that says nothing; the raw distribution is what
  HELM's scoring means and what a reference forward pass gives (tests/test_serve_engine.py checks both).
- sampling: the distribution the token was actually drawn from, after temperature, top-k and top-p (as
  HELM's own Hugging Face client reports it). `top_logprob` is under the same distribution, finite entries only.
- echoed prompt tokens: the model's own distribution (nothing was drawn). Mistral's BOS is not echoed (it is not
  text); every prompt token after it is scored given everything before it. A tokenizer without BOS gives its
  first token logprob 0.0 and an empty `top_logprob`, as HELM's Hugging Face client does.

`logprob` of the response is the sum over the returned tokens. An end-of-sequence token ends generation and is
not returned (it has no text). A stop sequence ends generation; the text is cut before it and tokens after the
cut are dropped (a token straddling it keeps the part before), so `"".join(token texts)` is the text before
the postprocess policy's answer rule.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from birbal.config.model import QuantizationConfig
from birbal.config.serve import ServeConfig
from birbal.errors import ServeError
from birbal.serve.decode import make_decoder, resolve_mode
from birbal.serve.detok import IncrementalDetokenizer, surface_cache
from birbal.serve.errors import CancelledError, OverloadedError, ValidationError
from birbal.serve.postprocess import BLANK_LINE, get_policy
from birbal.serve.schemas import (
    DecodeRequest,
    DecodeResponse,
    ProcessRequest,
    ProcessResponse,
    Token,
    TokenizeRequest,
    TokenizeResponse,
)

GREEDY_TEMPERATURE = 1e-5  # at or below: greedy (HELM sends 1e-7 when it wants temperature 0)


def resolve_serve_device(requested: str) -> torch.device:
    from birbal.models import resolve_device

    return resolve_device(requested, "serve.device", ServeError)


@dataclass
class _Sampling:
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None


@dataclass
class _Step:
    token_id: int
    logprob: float
    top: dict[str, float]


@dataclass
class _Pending:
    """A chosen token still on its way to the host: `token` (0-d, on the model's device) can be fed to the next
    step at once; `packed` (its id, its logprob, the top-k values and ids) is read once `copied` has completed."""

    token: torch.Tensor
    packed: torch.Tensor
    copied: torch.cuda.Event | None


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0
    by_outcome: dict[str, int] = field(default_factory=dict)


class Engine:
    """Serves one causal LM and its tokenizer under `serve_cfg`'s limits and postprocess policy.

    Not thread-safe by design: the app runs every call on one worker thread, so requests queue on the GPU.
    """

    def __init__(self, model, tokenizer, serve_cfg: ServeConfig, *, source: str = "", load_s: float | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = serve_cfg
        self.policy = get_policy(serve_cfg.postprocess)
        self.source = source
        self.load_s = load_s
        self.device = next(model.parameters()).device
        self.vocab_size = len(tokenizer)
        self.stats = EngineStats()
        self.fused: dict | None = None  # serve.decode_fuse's report: groups fused, and those left and why
        self._surface = surface_cache(tokenizer)
        self._eos_ids = self._end_ids(model, tokenizer)
        self._bos_id = tokenizer.bos_token_id
        for switch, needs in (("decode_gemv_split_input", serve_cfg.decode_gemv == "triton"
                               and serve_cfg.decode_fuse == "lora"),
                              ("decode_gemv_glu", serve_cfg.decode_gemv == "triton")):
            if getattr(serve_cfg, switch) and not needs:
                raise ServeError(f"serve.{switch} is a form of decode_gemv triton's kernel"
                                 f"{' under decode_fuse lora' if switch.endswith('input') else ''}: set those too, "
                                 f"or leave it off (decode_gemv is {serve_cfg.decode_gemv}, decode_fuse "
                                 f"{serve_cfg.decode_fuse})")
        if serve_cfg.decode_fuse != "none":
            from birbal.serve.fused import fuse_projections

            self.fused = fuse_projections(model, serve_cfg.decode_fuse, serve_cfg.decode_gemv,
                                          serve_cfg.decode_gemv_split_input, serve_cfg.decode_gemv_glu)
        elif serve_cfg.decode_gemv != "cublas":
            raise ServeError(f"serve.decode_gemv={serve_cfg.decode_gemv} writes the products of the fused "
                             "projections: it needs serve.decode_fuse projections or lora")
        # what a decode step's attention runs: sdpa, or birbal.serve.attention's name (and for triton where it
        # cannot run, why not)
        self.attention = "sdpa"
        if serve_cfg.decode_attention != "sdpa":
            from birbal.serve.attention import use_decode_attention

            self.attention = use_decode_attention(model, serve_cfg.decode_attention)
        self.decoder = make_decoder(resolve_mode(serve_cfg.decode, model, self.device), model,
                                    serve_cfg.max_context, tuple(serve_cfg.decode_cache_lengths),
                                    serve_cfg.decode_compile_lengths, serve_cfg.decode_compile_mode,
                                    serve_cfg.decode_combo_kernels, serve_cfg.decode_length_update,
                                    serve_cfg.decode_compile_rest)
        self.decode_mode = self.decoder.mode
        self.warmup_s: float | None = None
        self.warmup_compiled_graphs: int | None = None  # graphs torch.compile made in the warm-up (Dynamo's count)
        # A request that generates at most one token runs no decode step, so a static cache buys it nothing and
        # would cost it the copy of its keys and values into the cache. Most of HELM's requests are of this kind
        # (multiple choice: one new token, or echo with none).
        self.prefill_only = (self.decoder if self.decoder.mode == "eager"
                             else make_decoder("eager", model, serve_cfg.max_context))

    def warm_up(self) -> float:
        """The decoder's own preparation (a graph per cache length: the CUDA graph captures, and for
        compiled_graph the compiles), then one short greedy generation through the decode path, before the server
        says it is ready: otherwise the first requests would pay them. Seconds taken."""
        from birbal.serve.regional import compiled_graph_count

        t0 = time.perf_counter()
        graphs_before = compiled_graph_count()
        prompt = "Warm-up: count to three. One, two,"
        try:
            with torch.inference_mode():  # the caches are made, and later updated, in inference mode
                self.decoder.prepare()
            self._run(self.encode(prompt), ProcessRequest(prompt=prompt, temperature=1e-7, max_new_tokens=2),
                      stops=[])
        except Exception as err:
            raise ServeError(f"the {self.decode_mode} decode path failed its warm-up ({type(err).__name__}: {err}); "
                             "--set serve.decode=cuda_graph serves without compiling, "
                             "--set serve.decode=eager without CUDA graphs or compiling") from err
        self.warmup_s = time.perf_counter() - t0
        self.warmup_compiled_graphs = compiled_graph_count() - graphs_before
        return self.warmup_s

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_merged(cls, folder: str | Path, serve_cfg: ServeConfig, device: torch.device | None = None) -> Engine:
        """The export's `merged/` folder: safetensors weights plus tokenizer files (the fast path)."""
        from birbal.serve.loading import load_merged, load_tokenizer_folder
        from birbal.serve.startup import PHASES

        with PHASES.span("load.device"):
            device = device or resolve_serve_device(serve_cfg.device)
        t0 = time.perf_counter()
        model = load_merged(Path(folder), serve_cfg.dtype, device)
        with PHASES.span("load.tokenizer"):
            tokenizer = load_tokenizer_folder(Path(folder))
        load_s = time.perf_counter() - t0
        with PHASES.span("load.engine"):
            return cls(model, tokenizer, serve_cfg, source=str(folder), load_s=load_s)

    @classmethod
    def from_adapter(cls, base: str, adapter: str | Path, tokenizer, serve_cfg: ServeConfig, *,
                     revision: str | None = None, quantization: QuantizationConfig | None = None,
                     device: torch.device | None = None, source: str | None = None,
                     allow_pickle_adapter: bool = False) -> Engine:
        """`base` (folder, or hub id at `revision`) plus the unmerged PEFT adapter (LoRA weights in
        `serve.adapter_dtype`); 4-bit base with `quantization`."""
        from birbal.serve.loading import load_base_with_adapter
        from birbal.serve.startup import PHASES

        with PHASES.span("load.device"):
            device = device or resolve_serve_device(serve_cfg.device)
        t0 = time.perf_counter()
        model = load_base_with_adapter(base, Path(adapter), serve_cfg.dtype, device, revision=revision,
                                       quantization=quantization, adapter_dtype=serve_cfg.adapter_dtype,
                                       allow_pickle_adapter=allow_pickle_adapter)
        load_s = time.perf_counter() - t0
        with PHASES.span("load.engine"):
            return cls(model, tokenizer, serve_cfg, source=source or f"{base} + {adapter}", load_s=load_s)

    @staticmethod
    def _end_ids(model, tokenizer) -> frozenset[int]:
        ids = {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, (list, tuple)):
            ids.update(configured)
        return frozenset(i for i in ids if i is not None)

    # ---- tokenizer endpoints ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        # Truncation is done by slicing, not by the tokenizer's truncation state, which is shared mutable state
        # and so not safe to change while the generation thread encodes.
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        t0 = time.perf_counter()
        ids = self.encode(request.text)
        if request.truncation:
            ids = ids[: request.max_length]  # the same ids the tokenizer's own truncation keeps for one text
        return TokenizeResponse(tokens=ids, request_time=time.perf_counter() - t0)

    def decode(self, request: DecodeRequest) -> DecodeResponse:
        t0 = time.perf_counter()
        for position, token_id in enumerate(request.tokens):
            if token_id >= self.vocab_size:
                raise ValidationError(
                    f"tokens[{position}] = {token_id} is not a token id: ids run from 0 to {self.vocab_size - 1}",
                    field="tokens")
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return DecodeResponse(text=text, request_time=time.perf_counter() - t0)

    # ---- generation ---------------------------------------------------------------------------------------

    def check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """TGI's order: the deployment's max_new_tokens cap, the prompt alone, then prompt + new tokens."""
        limit, context = self.cfg.max_new_tokens_limit, self.cfg.max_context
        if max_new_tokens > limit:
            raise ValidationError(f"max_new_tokens must be <= {limit} (serve.max_new_tokens_limit); "
                                  f"given {max_new_tokens}", field="max_new_tokens")
        if prompt_tokens > context:
            raise ValidationError(f"prompt must be at most {context} tokens (serve.max_context); given "
                                  f"{prompt_tokens} tokens after the '{self.policy.name}' prompt policy",
                                  field="prompt")
        if prompt_tokens + max_new_tokens > context:
            raise ValidationError(
                f"prompt tokens + max_new_tokens must be <= {context} (serve.max_context); given "
                f"{prompt_tokens} prompt tokens + {max_new_tokens} max_new_tokens = "
                f"{prompt_tokens + max_new_tokens}", field="max_new_tokens")

    def process(self, request: ProcessRequest, cancelled=None) -> ProcessResponse:
        """`cancelled` (a threading.Event), when set, ends the generation at its next step with CancelledError:
        the app sets it when the client has gone away."""
        if self.cfg.request_policy == "upstream":
            return self._process_upstream(request, cancelled)
        t0 = time.perf_counter()
        echo = request.echo_prompt
        prompt = request.prompt if echo else self.policy.prompt(request.prompt)
        ids = self.encode(prompt)
        self.check_lengths(len(ids), request.max_new_tokens)
        stops = list(request.stop_sequences)
        if not echo and self.policy.name == "birbal" and BLANK_LINE not in stops:
            stops.append(BLANK_LINE)  # the policy cuts the output there anyway: stop generating at it
        try:
            tokens, generated = self._run(ids, request, stops, cancelled)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OverloadedError(f"out of GPU memory for {len(ids)} prompt tokens + {request.max_new_tokens} "
                                  "max_new_tokens; retry later or ask for fewer tokens") from None
        text = "".join(t.text for t in tokens)
        if not echo:
            text = self.policy.output(text)
        elapsed = time.perf_counter() - t0
        self.stats.requests += 1
        self.stats.prompt_tokens += len(ids)
        self.stats.generated_tokens += len(generated)
        self.stats.busy_s += elapsed
        return ProcessResponse(text=text, tokens=tokens, logprob=math.fsum(t.logprob for t in tokens),
                               request_time=elapsed)

    # ---- serve.request_policy: upstream (the winners' main.py; birbal.serve.upstream says what and where) -----

    def _process_upstream(self, request: ProcessRequest, cancelled=None) -> ProcessResponse:
        from birbal.serve import upstream

        t0 = time.perf_counter()
        if "temperature" not in request.model_fields_set:
            # api.py:11: their default was 1e-7, not the challenge spec's 0.8 (HELM always sends one)
            request = request.model_copy(update={"temperature": upstream.DEFAULT_TEMPERATURE})
        if request.temperature <= 0:
            raise ValidationError("temperature must be > 0 under serve.request_policy=upstream (the winners' server "
                                  "always sampled; HELM sends 1e-7 for 0)", field="temperature")
        if request.seed is not None:
            torch.manual_seed(request.seed)  # main.py:54-55: the process's generators
        ids = self.encode(self.policy.prompt(request.prompt))  # echo requests are wrapped too (main.py:57-61)
        self.check_lengths(len(ids), request.max_new_tokens)
        try:
            steps = self._run_upstream(ids, request, upstream, cancelled)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OverloadedError(f"out of GPU memory for {len(ids)} prompt tokens + {request.max_new_tokens} "
                                  "max_new_tokens; retry later or ask for fewer tokens") from None
        generated = [int(step[0]) for step in steps]
        decode = self.tokenizer.decode
        if request.echo_prompt:
            text = decode(ids + generated, skip_special_tokens=True)
        else:
            text = self.policy.output(decode(generated, skip_special_tokens=True))
        tokens = [Token(text=decode(int(token_id)), logprob=logprob, top_logprob={decode(int(best)): best_logprob})
                  for token_id, logprob, best, best_logprob in steps]
        # main.py:122: the float32 sum of the float32 logprobs
        total = float(torch.tensor([t.logprob for t in tokens], dtype=torch.float32).sum()) if tokens else 0.0
        elapsed = time.perf_counter() - t0
        self.stats.requests += 1
        self.stats.prompt_tokens += len(ids)
        self.stats.generated_tokens += len(generated)
        self.stats.busy_s += elapsed
        return ProcessResponse(text=text, tokens=tokens, logprob=total, request_time=elapsed)

    @torch.inference_mode()
    def _run_upstream(self, ids: list[int], request: ProcessRequest, upstream,
                      cancelled=None) -> list[tuple[float, ...]]:
        """[(id, logprob, argmax id, its logprob)] per generated token, end-of-sequence included and last; each step
        queued before the host reads the token before it, as in `_run`."""
        steps: list[tuple[float, ...]] = []
        if request.max_new_tokens == 0:
            return steps
        decoder = self.decoder if request.max_new_tokens > 1 else self.prefill_only
        last = decoder.prefill(ids, all_positions=False, reserve=len(ids) + request.max_new_tokens)[-1]
        for step in range(request.max_new_tokens):
            if cancelled is not None and cancelled.is_set():
                raise CancelledError(f"the client went away: generation stopped after {step} of "
                                     f"{request.max_new_tokens} tokens")
            packed, token = upstream.choose(last, request.temperature, request.top_k)
            pending = self._pending(token, packed)
            if step + 1 < request.max_new_tokens:
                last = decoder.step(pending.token)
            if pending.copied is not None:
                pending.copied.synchronize()
            values = tuple(pending.packed.tolist())
            steps.append(values)
            if int(values[0]) in self._eos_ids:
                break
        return steps

    def _pending(self, token: torch.Tensor, packed: torch.Tensor) -> _Pending:
        """`packed` on its way to pinned host memory, the copy queued behind the step that made it (no wait)."""
        if self.device.type != "cuda":
            return _Pending(token=token, packed=packed, copied=None)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        return _Pending(token=token, packed=host, copied=copied)

    def _sampling(self, request: ProcessRequest) -> _Sampling:
        if request.temperature <= GREEDY_TEMPERATURE:
            return _Sampling(True, request.temperature, request.top_k, request.top_p, None)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        return _Sampling(False, request.temperature, request.top_k, request.top_p, generator)

    @torch.inference_mode()
    def _run(self, ids: list[int], request: ProcessRequest, stops: list[str],
             cancelled=None) -> tuple[list[Token], list[int]]:
        """(returned tokens, the ids generated, before any stop cut)."""
        echo, k = request.echo_prompt, request.top_k_per_token
        detok = IncrementalDetokenizer(self.tokenizer)
        tokens: list[Token] = []
        generated: list[int] = []
        if request.max_new_tokens == 0 and not echo:
            return tokens, generated
        decoder = self.decoder if request.max_new_tokens > 1 else self.prefill_only
        logits = decoder.prefill(ids, all_positions=echo, reserve=len(ids) + request.max_new_tokens)
        if echo:
            tokens.extend(self._prompt_tokens(ids, logits, detok, k))
        prompt_chars, first_generated = len(detok.text), len(tokens)
        sampling = self._sampling(request)
        longest_stop = max((len(s) for s in stops), default=0)
        last = logits[-1]
        for step in range(request.max_new_tokens):
            if cancelled is not None and cancelled.is_set():
                raise CancelledError(f"the client went away: generation stopped after {step} of "
                                     f"{request.max_new_tokens} tokens")
            pending = self._choose(last, sampling, k)
            if step + 1 < request.max_new_tokens:
                last = decoder.step(pending.token)  # queued behind the choice and its copy, before the host reads
            chosen = self._read(pending, k)
            if chosen.token_id in self._eos_ids:
                break
            generated.append(chosen.token_id)
            scanned_to = len(detok.text) - prompt_chars
            tokens.append(Token(text=detok.push(chosen.token_id), logprob=chosen.logprob, top_logprob=chosen.top))
            if stops and self._cut_at_stop(tokens, first_generated, detok.text[prompt_chars:],
                                           max(0, scanned_to - longest_stop + 1), stops):
                return tokens, generated
        held_back = detok.flush()
        if held_back and len(tokens) > first_generated:
            last_token = tokens[-1]
            tokens[-1] = Token(text=last_token.text + held_back, logprob=last_token.logprob,
                               top_logprob=last_token.top_logprob)
        return tokens, generated

    def _prompt_tokens(self, ids: list[int], logits: torch.Tensor, detok: IncrementalDetokenizer,
                       k: int) -> list[Token]:
        """Echo: each prompt token with its logprob given the tokens before it (logits[i] predicts ids[i+1])."""
        if len(ids) > 1:
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(ids[1:], device=logits.device).unsqueeze(1)
            chosen = logprobs.gather(1, targets).squeeze(1).tolist()
            top_values, top_ids = (t.tolist() for t in torch.topk(logprobs, k, dim=-1))
        out: list[Token] = []
        for position, token_id in enumerate(ids):
            piece = detok.push(token_id)
            if position == 0:
                if token_id != self._bos_id:
                    out.append(Token(text=piece, logprob=0.0, top_logprob={}))
                continue
            top = self._top_dict(top_ids[position - 1], top_values[position - 1])
            out.append(Token(text=piece, logprob=chosen[position - 1], top_logprob=top))
        return out

    def _choose(self, logits: torch.Tensor, sampling: _Sampling, k: int) -> _Pending:
        """Queue the choice of the next token and the copy of what the response needs to the host; no wait."""
        if sampling.greedy:
            token = torch.argmax(logits)  # on the logits, exactly as `generate` does
            logprobs = torch.log_softmax(logits, dim=-1)
        else:
            logprobs = torch.log_softmax(self._processed_scores(logits, sampling), dim=-1)
            token = torch.multinomial(logprobs.exp(), 1, generator=sampling.generator)[0]
        top_values, top_ids = torch.topk(logprobs, k)
        # One device-to-host copy per step: the token, its logprob and the top-k, packed (float64 holds every id
        # exactly), into pinned memory without a wait, so that the next step can be queued behind it.
        # gather, not logprobs[token]: indexing with a 0-d CUDA tensor copies it to the host first, a sync
        # (pytorch/pytorch#105641), which would make the host wait for the step before it could queue the next.
        packed = torch.cat([token.view(1).to(torch.float64), logprobs.gather(0, token.view(1)).to(torch.float64),
                            top_values.to(torch.float64), top_ids.to(torch.float64)])
        return self._pending(token, packed)

    def _read(self, pending: _Pending, k: int) -> _Step:
        """Wait for the copy alone (not for a step queued after it) and unpack it."""
        if pending.copied is not None:
            pending.copied.synchronize()
        packed = pending.packed.tolist()
        top = self._top_dict([int(i) for i in packed[2 + k:]], packed[2:2 + k])
        return _Step(token_id=int(packed[0]), logprob=packed[1], top=top)

    def _processed_scores(self, logits: torch.Tensor, sampling: _Sampling) -> torch.Tensor:
        """Temperature, then top-k, then top-p (the order of transformers' warpers)."""
        scores = logits / sampling.temperature
        if 0 < sampling.top_k < scores.shape[-1]:
            kth = torch.topk(scores, sampling.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if sampling.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token once the tokens before it already hold top_p of the mass; the best is always kept.
            drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= sampling.top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores

    def _top_dict(self, ids: list[int], values: list[float]) -> dict[str, float]:
        top: dict[str, float] = {}
        for token_id, value in zip(ids, values, strict=True):
            if math.isfinite(value):
                top.setdefault(self._surface(token_id), value)  # two ids may share a text: keep the likelier
        return top

    @staticmethod
    def _cut_at_stop(tokens: list[Token], first: int, generated_text: str, search_from: int,
                     stops: list[str]) -> bool:
        """Cut the generated tokens before the earliest stop sequence; True when one was found."""
        hits = [i for i in (generated_text.find(s, search_from) for s in stops) if i >= 0]
        if not hits:
            return False
        cut, start = min(hits), 0
        kept = tokens[:first]
        for token in tokens[first:]:
            if start >= cut:
                break
            if start + len(token.text) > cut:
                token = Token(text=token.text[: cut - start], logprob=token.logprob, top_logprob=token.top_logprob)
            kept.append(token)
            start += len(token.text)
        tokens[:] = kept
        return True
