"""Importing the training stack asks no server anything.

bitsandbytes 0.50's CPU backend, on a CPU with AVX512-BF16, calls the `kernels` package at import to fetch
`kernels-community/quantization-bitsandbytes` from the hub (unpinned, compiled code) for its 4-bit CPU product.
The images have no `kernels` (requirements/train.txt, serve.txt), so they use bitsandbytes' own kernel; transformers
5.25 requires `kernels`, which the CPU install would then carry, and the tiny profile would run hub code that
depends on the machine's network. This runs in a fresh interpreter, as a stage does, with name resolution recorded
and refused."""

import json
import subprocess
import sys

from conftest import REPO

PROBE = r"""
import json, socket, sys
asked = []
def refuse(host, *args, **kwargs):
    asked.append(str(host))
    raise socket.gaierror("name resolution refused by the test")
socket.getaddrinfo = refuse

import torch
import birbal  # noqa: F401
import bitsandbytes as bnb
import bitsandbytes.functional as F
import peft  # noqa: F401
import transformers  # noqa: F401

weight = torch.randn(64, 128, dtype=torch.bfloat16)
packed, state = F.quantize_4bit(weight, quant_type="nf4", blocksize=64)
x = torch.randn(1, 128, dtype=torch.bfloat16)
with torch.no_grad():
    out = bnb.matmul_4bit(x, packed.t(), quant_state=state)  # one row: the CPU gemv_4bit op
reference = x.float() @ F.dequantize_4bit(packed, state).float().t()
print(json.dumps({"asked": asked, "error": float((out.float() - reference).abs().max()),
                  "scale": float(reference.abs().max()), "transformers": transformers.__version__}))
"""


def test_the_stack_imports_and_runs_a_4bit_product_without_asking_the_network():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["asked"] == [], found  # e.g. ['huggingface.co', ...]: the hub asked for a kernel
    assert found["error"] <= 0.02 * found["scale"], found  # the product is right (bf16 rounding)
