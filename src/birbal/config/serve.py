"""The submission server: where it listens, which weights it loads, and the winners' output policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from birbal.config.base import Section
from birbal.config.model import PublishedAdapterConfig


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, gt=0, lt=65536)
    model: Literal["merged", "adapter"] = Field(
        "adapter", description="adapter: the base in serve.dtype plus the run's adapter (export/adapter) unmerged, "
        "as the winners served (inference/submission_2/main.py); merged: the export's merged weights."
    )
    adapter_dtype: Literal["base", "float32"] = Field(
        "base", description="adapter only. base: the LoRA weights in the base's dtype, as peft 0.5/0.6 loaded them "
        "for the winners; float32: upcast (peft's autocast_adapter_dtype, its default since 0.12)."
    )
    published_adapter: PublishedAdapterConfig | None = Field(
        None, description="Serve this hub adapter (the submission's own weights) on model.* instead of the run's; "
        "`invoke reproduce` then skips prepare-data, train and export."
    )
    request_policy: Literal["upstream", "kit"] = Field(
        "upstream", description="upstream: /process uses the fields the winners' ProcessRequest had (prompt, "
        "max_new_tokens, top_k, temperature, seed, echo_prompt), samples as their model.generate(do_sample=True) "
        "call did and answers as their main.py did (docs/SERVE.md); kit: every field HELM sends (stop_sequences, "
        "top_p, top_k_per_token), greedy at temperature <= 1e-5, echoed prompt logprobs."
    )
    quantize: Literal["none", "4bit"] = Field("none", description="4bit: load the base in NF4 (adapter only).")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when one is visible.")
    postprocess: Literal["birbal", "none"] = Field(
        "birbal", description="birbal: the winners' prompt wrapping and output cutting rules; none: raw."
    )
    max_context: int = Field(4096, gt=0, description="Prompt plus new tokens may not exceed this.")
    decode: Literal["auto", "eager", "static", "cuda_graph", "compiled_layers", "compiled_graph"] = Field(
        "auto", description="The per-token forward. cuda_graph: a static KV cache and a CUDA graph replayed per "
        "token (CUDA only); compiled_layers: the same graph around a step whose decoder layers are torch.compile'd, "
        "one compiled graph shared by every layer (fused kernels; compiles one layer per cache length in the "
        "server's warm-up); compiled_graph: the same around the whole step compiled (the slowest warm-up); static: the same cache without graphs (runs on CPU, for tests); eager: a growing cache, "
        "one eager forward per token; auto: compiled_layers on CUDA (eager for a 4-bit base), eager elsewhere."
    )
    decode_cache_lengths: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [1024, 2048],
        description="Static-cache lengths below max_context (which is always one): a generation takes the shortest "
        "that holds its prompt and max_new_tokens, since a decode step attends over every slot of its cache. Each "
        "is one more CUDA graph (and compile) in the warm-up; lengths at or above max_context add nothing. "
        "static and the graph modes only.",
    )
    decode_compile_lengths: Literal["one", "each"] = Field(
        "each", description="compiled_layers only: one graph per static-cache length, each its own compile (the "
        "form measured and GPU-tested at the Mistral-7B shape, benchmarks/results), or one compiled graph for every "
        "length (the slot dimension dynamic: one compile at start-up; CPU-tested, not yet run on a GPU).",
    )
    decode_gemv: Literal["cublas", "lora_a", "triton", "all"] = Field(
        "cublas", description="With decode_fuse, inside a compiled decode step: cublas: every product F.linear "
        "(cuBLAS); lora_a: the LoRA A products (small: cuBLAS runs each as a split-K kernel and a reduce kernel) as "
        "fp32 multiply-and-sum, one Triton reduction kernel each from Inductor; triton: that, and every other "
        "one-row product on CUDA (the fused projections, o_proj, down_proj, lm_head; compiled or not) through "
        "birbal.serve.gemv's hand-written Triton GEMV (F.linear where there is no CUDA device); all: every product "
        "of the fused projections as Inductor's reductions (merged o_proj and down_proj too). The same dot "
        "products in fp32, summed in another order.",
    )
    decode_gemv_split_input: bool = Field(
        False, description="decode_fuse lora with decode_gemv triton, on CUDA: each [W, B] product reads its input "
        "[x, scaling * A x] from the two halves where they are (birbal.serve.gemv's gemv2) instead of writing the "
        "concatenation first: bitwise the same products at the Mistral-7B shapes (tests/test_serve_gemv.py, "
        "through Triton's interpreter); off until measured on a GPU.",
    )
    decode_gemv_glu: bool = Field(
        False, description="decode_gemv triton, on CUDA: the fused gate/up product's kernel writes the MLP's "
        "silu(gate) * up instead of gate and up (birbal.serve.gemv's gemv_act: each rounded to the dtype as stored, "
        "then Inductor's order), so no kernel of its own makes the activation; merged, or decode_fuse lora.",
    )
    decode_compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="Inductor's mode for the compiled decode modes: max-autotune-no-cudagraphs times "
        "Triton's GEMM templates against cuBLAS for each product's shape at compile time and keeps the fastest "
        "(a longer warm-up; the same products: float rounding only). Inductor's own CUDA graphs stay off.",
    )
    decode_combo_kernels: bool = Field(
        False, description="compiled_layers only: Inductor's combo kernels (independent kernels of a layer's graph, "
        "such as the q rotary and the k rotary with the cache writes, launched as one; the same per-element code).",
    )
    decode_compile_rest: bool = Field(
        False, description="compiled_layers only: the step's rotary tables and final norm (several eager kernels "
        "each) compiled too, each its own region, with the compiled layers' float rounding; off until measured.",
    )
    decode_length_update: Literal["layer", "step"] = Field(
        "layer", description="compiled_layers only. layer: each layer's cache write adds one to its length, as "
        "transformers' StaticLayer.update does (a kernel a layer); step: the layers write at the same length and "
        "one kernel after the step advances all of them (the same positions; birbal.serve.regional).",
    )
    decode_attention: Literal["sdpa", "grouped", "triton"] = Field(
        "sdpa", description="A decode step's attention over the static cache. sdpa: transformers' SDPA (the KV "
        "heads expanded to the query heads first); grouped: the query heads of each KV head as rows of two batched "
        "GEMMs, each key and value read once (the same maths up to float rounding; birbal.serve.attention); "
        "triton: the same maths as two Triton kernels a layer, split over the cache's slots, the slots the mask "
        "excludes not read (birbal.serve.flash_decode; grouped where there is no CUDA device). Prompts always "
        "run SDPA.",
    )
    decode_fuse: Literal["none", "projections", "lora"] = Field(
        "none", description="projections: the projections of one input (q/k/v, gate/up) computed as one product, "
        "their weights rows of one matrix, the LoRA A matrices likewise (each output the same dot product: the same "
        "maths up to float rounding; birbal.serve.fused); lora: that, and each LoRA B product summed in its base's "
        "product (base and LoRA terms in one accumulator, not each rounded first: float rounding); none: one "
        "product per projection.",
    )
    max_new_tokens_limit: int = Field(2048, gt=0, description="Largest max_new_tokens a request may ask for.")
    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest request body accepted.")
    startup_timeout_s: float = Field(600.0, gt=0.0, description="How long callers wait for /health.")
