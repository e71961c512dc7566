"""Compile birbal.serve's Triton kernels ahead of time for a GPU this machine does not have, and report each cubin's
resources as JSON: `python tests/triton_aot.py` (tests/test_triton_aot.py runs it).

Triton's own compiler does it without a device: the kernel's source through Triton's passes to PTX, then the
ptxas its wheel bundles, for an explicit target (sm_90: H100/H200; sm_89: RTX 4090). The kernels and their
arguments are taken from the real launch functions (`gemv.launch`, `flash_decode.launch`), called with a recording
`wrap` in place of `torch.library.wrap_triton`: what is compiled is exactly what a launch on that GPU would
compile (its dtypes, constexprs, warps and stages), apart from Triton's run-time specialisations (an int argument
of 1 becomes a constant, as here; alignment hints are left out).

`python tests/triton_aot.py --trace` instead reports what torch.compile makes of the custom ops (`traced()`).

A separate process: Triton picks its interpreter or its compiler when it is first imported, and the test session
on a CPU imports it as the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"sm_90": 90, "sm_89": 89}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.bool: "i1", torch.int32: "i32"}


class Recorder:
    """Stands in for `wrap_triton(kernel)`: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, calls: list):
        self.calls = calls

    def __call__(self, kernel):
        calls = self.calls

        class Launch:
            def __getitem__(self, grid):
                def record(*args, **kwargs):
                    calls.append((kernel, grid, args, kwargs))
                return record
        return Launch()


def signature(kernel, args, kwargs, floats: str = "fp32") -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) for ASTSource from one recorded launch. A Python float is `floats`: fp32 as
    Triton's own launcher types it, fp64 as Inductor does inside a compiled graph on a device with fp64
    (torch._inductor.codegen.triton_utils.signature_of, `_use_fp64_for_unbacked_floats`)."""
    names = kernel.arg_names
    sig, consts = {}, {}
    for name, value in zip(names, args, strict=False):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton's run-time specialisation
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
        elif isinstance(value, float):
            sig[name] = floats
        elif value is None:  # an absent pointer (flash_decode's counters, two kernels): a constant, as Triton's
            sig[name], consts[name] = "constexpr", None
        else:
            raise TypeError(f"{name}: {type(value).__name__}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    for name, value in kwargs.items():
        if name not in options:
            sig[name], consts[name] = "constexpr", value
    missing = set(names) - set(sig)
    assert not missing, f"{kernel.__name__}: arguments not passed: {sorted(missing)}"
    return {name: sig[name] for name in names}, consts, options


def launches() -> dict:
    """name -> recorded launches, for the shapes and dtypes the served step runs."""
    from birbal.serve import flash_decode, gemv

    out = {}
    for (n, k), shape in gemv.BLOCK_SHAPES.items():
        calls: list = []
        x, w = torch.empty(1, k, dtype=torch.bfloat16), torch.empty(n, k, dtype=torch.bfloat16)
        gemv.launch(x, w, torch.empty(1, n, dtype=torch.bfloat16), shape, wrap=Recorder(calls))
        out[f"gemv {n}x{k} bf16 {shape}"] = calls
        if k not in (4096, 14336):  # decode_fuse lora's [W, B]: also read as x then the scaled LoRA term (gemv2)
            calls = []
            k1 = 14336 if k > 14336 else 4096
            x, x2 = torch.empty(1, k1, dtype=torch.bfloat16), torch.empty(1, k - k1, dtype=torch.bfloat16)
            gemv.launch(x, w, torch.empty(1, n, dtype=torch.bfloat16), shape, wrap=Recorder(calls), x2=x2)
            out[f"gemv2 {n}x{k1}+{k - k1} bf16 {shape}"] = calls
        if n == 28672:  # gate/up: also writing silu(gate) * up (gemv_act; gemv2_act over [W, B])
            calls = []
            x2 = torch.empty(1, k - 4096, dtype=torch.bfloat16) if k > 4096 else None
            x = torch.empty(1, 4096, dtype=torch.bfloat16)
            gemv.launch(x, w, torch.empty(1, n // 2, dtype=torch.bfloat16), shape, wrap=Recorder(calls), x2=x2,
                        act=True)
            out[f"gemv{'2' if x2 is not None else ''}_act {n}x4096+{k - 4096} bf16 {shape}"] = calls
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for slots in (1024, 2048, 4096):
            q = torch.empty(1, 1, 32, 128, dtype=dtype).transpose(1, 2)
            k, v = (torch.empty(1, 8, slots, 128, dtype=dtype) for _ in range(2))
            mask = torch.ones(1, 1, 1, slots, dtype=torch.bool)
            for fold in (False, True):  # the two kernels, then the split kernel doing the reduction too
                calls = []
                flash_decode.launch(q, k, v, mask, 128**-0.5, torch.empty(1, 1, 32, 128, dtype=dtype),
                                    torch.zeros(8, dtype=torch.int32) if fold else None, wrap=Recorder(calls))
                out[f"decode_attention{' folded' if fold else ''} {slots} slots {DTYPES[dtype]}"] = calls
    return out


def resources(compiled, workdir: Path) -> dict:
    """REG, STACK, LOCAL and static SHARED of a compiled kernel's cubin as cuobjdump reports them, and `shared`: the
    shared memory a launch needs, the static plus the dynamic allocation Triton requests at launch
    (`metadata.shared`, what its launcher checks against the device's limit: "out of resource: shared memory").
    A Triton kernel's buffers are all dynamic, so the cubin's static figure alone is about 0 and says nothing."""
    import triton

    path = workdir / "kernel.cubin"
    path.write_bytes(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                          check=True).stdout
    found = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    found["static_shared"] = found.pop("shared")
    found["dynamic_shared"] = int(compiled.metadata.shared)
    found["shared"] = found["static_shared"] + found["dynamic_shared"]
    return found


def traced() -> dict:
    """What torch.compile makes of the custom ops (`torch.ops.birbal.gemv`, `.gemv2`, `.decode_attention`) at the
    7B step's shapes: AOTAutograd's graph, recorded by a backend that runs nothing. For each op call, the kernels
    it became, their grids, the tensors each kernel writes (found by torch from the kernels' own Triton IR, for an
    sm_90 target named here since there is no device) and those still cloned after Inductor's reinplacing pass;
    the graph inputs written (a declared mutation: the folded attention's counters) and the copies left after that
    pass. The attention is traced as its two kernels and folded, twice: at a static cache length, and with the
    length dynamic (`decode_compile_lengths: one`)."""
    import re

    import triton
    from torch._functorch.aot_autograd import aot_module_simplified
    from triton.backends.compiler import GPUTarget

    from birbal.serve import flash_decode, gemv

    class Target:  # what torch asks of Triton's driver to read a kernel's IR: the target only
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Target())
    flash_decode._register()
    gemv._register()
    graphs: list = []

    def backend(gm, example_inputs):
        def record(graph, inputs):
            from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
            from torch._inductor.fx_utils import FakeTensorUpdater

            before = graph.code
            reinplace_inplaceable_ops(FakeTensorUpdater(graph), graph.graph)  # Inductor's own pass
            graph.recompile()
            graphs.append((before, graph.code))
            return graph  # never run: there is no GPU
        # keep_inference_input_mutations as Inductor sets it: a graph input's mutation stays in the graph (a copy_)
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, keep_inference_input_mutations=True)

    flash_decode.arrivals("cpu")  # the folded kernel's counters, made before tracing as the served model makes them

    def step(q, k, v, mask, x, x2, w, w1):
        return (torch.ops.birbal.decode_attention(q, k, v, mask, 128**-0.5, None),  # the two kernels, then folded
                torch.ops.birbal.decode_attention(q, k, v, mask, 128**-0.5, flash_decode.arrivals(q.device)),
                torch.ops.birbal.gemv2(x, x2, w),
                torch.ops.birbal.gemv(x, w1), torch.ops.birbal.gemv2_act(x, x2, w))

    bf16 = torch.bfloat16
    report = {}
    for name, dynamic in (("static", False), ("dynamic cache length", True)):
        torch._dynamo.reset()
        graphs.clear()
        k, v = (torch.empty(1, 8, 2048, 128, dtype=bf16) for _ in range(2))
        mask = torch.ones(1, 1, 1, 2048, dtype=torch.bool)
        if dynamic:
            for t in (k, v, mask):
                torch._dynamo.mark_dynamic(t, t.dim() - 2 if t is not mask else 3)
        args = (torch.empty(1, 1, 32, 128, dtype=bf16).transpose(1, 2), k, v, mask, torch.empty(1, 4096, dtype=bf16),
                torch.empty(1, 128, dtype=bf16), torch.empty(4096, 4224, dtype=bf16), torch.empty(4096, 4096, dtype=bf16))
        try:
            torch.compile(step, backend=backend, fullgraph=True, dynamic=False)(*args)
        except Exception as exc:  # the recorded graph cannot run; a failure before it is the report's
            if not graphs:
                report[name] = {"error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
                continue
        code, reinplaced = graphs[0]
        pattern = (r"triton_kernel_wrapper_functional\(kernel_idx = \d+.*?grid = \[([^\]]*)\].*?"
                   r"tensors_to_clone = \[([^\]]*)\]")
        calls, left = re.findall(pattern, code), re.findall(pattern, reinplaced)
        report[name] = {"kernel_calls": [{"grid": grid, "written": re.findall(r"'(\w+)'", clone),
                                          "cloned": re.findall(r"'(\w+)'", still)}
                                         for (grid, clone), (_grid, still) in zip(calls, left, strict=True)],
                        "inputs_written": len(re.findall(r"aten\.copy_\.default\(arg", code)),
                        "copies": len(re.findall(r"aten\.(copy|clone|cat)", reinplaced)),
                        "slots": re.findall(r"'slots': ([\w.]+)", code), "chunk": re.findall(r"'chunk': ([\w.]+)", code)}
    return report


def main() -> int:
    import tempfile

    if sys.argv[1:] == ["--trace"]:
        assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
        sys.path.insert(0, str(REPO / "src"))
        print(json.dumps(traced(), indent=1))
        return 0

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: this compiles"
    sys.path.insert(0, str(REPO / "src"))
    report: dict = {"triton": triton.__version__, "kernels": {}}
    seen: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, calls in launches().items():
            for kernel, _grid, args, kwargs in calls:
                # a launch with a float argument is compiled as both launchers type it (see signature())
                for floats in ("fp32", "fp64") if any(isinstance(a, float) for a in args) else ("fp32",):
                    sig, consts, options = signature(kernel, args, kwargs, floats)
                    for arch, capability in ARCHS.items():
                        key = (kernel.__name__, json.dumps(sig), json.dumps(consts), json.dumps(options), arch)
                        if key not in seen:
                            try:
                                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                                          target=GPUTarget("cuda", capability, 32), options=options)
                                seen[key] = resources(compiled, Path(tmp))
                            except Exception as exc:  # the report says which launch does not compile, and why
                                seen[key] = {"error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
                        launcher = " | floats fp64 (Inductor)" if floats == "fp64" else ""
                        report["kernels"][f"{name} | {kernel.__name__}{launcher} | {arch}"] = {**seen[key], **options}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
