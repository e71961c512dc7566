"""The server's imports, phase by phase, as `python -m birbal serve` makes them before its model is ready: the
largest part of a restart (eleventh session, H200: about 18 of the 29.9 s to ready).

Run from the repository root, with `src` on PYTHONPATH:

    python3 benchmarks/serve_imports.py --out serve_imports.json [--tokenizer-folder DIR]

Each arm runs the imports in a fresh interpreter, `--repeats` times (the first run after an install may write the
bytecode; the median is reported):
- `as installed`: the interpreter as it is (the serving image compiles every module's bytecode at `pip install`);
- `no bytecode` (the baseline of the other direction): every module compiled from source on import and nothing
  written (`PYTHONPYCACHEPREFIX` at an empty folder, `PYTHONDONTWRITEBYTECODE=1`), what an install without bytecode
  costs at every start.
The run also counts the imported modules whose source has no bytecode beside it (`bytecode_missing`): on a machine
where that is large, `as installed` is close to `no bytecode`, and a start-up measured there overstates the image's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the serve stage's order (birbal.serve.stage.serve_stage, then the loading thread: birbal.serve.loading)
CHILD = r"""
import importlib.util, json, sys, time
from pathlib import Path
times, t = {}, time.perf_counter()
def lap(name):
    global t
    now = time.perf_counter(); times[name] = round(now - t, 3); t = now
import torch; lap("torch")
from birbal.models import base_model_location; lap("birbal.models (plan)")
import uvicorn; from birbal.serve.app import create_app; lap("imports.server")
from transformers import AutoTokenizer; lap("transformers' tokenizer")
if sys.argv[1]:
    AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True); lap("tokenizer load")
from peft import PeftModel; from transformers import AutoModelForCausalLM, BitsAndBytesConfig; lap("load.imports")
from transformers.models.mistral import modeling_mistral; lap("modeling_mistral")
import birbal.serve.engine; lap("birbal.serve.engine")
missing = with_source = 0
for module in list(sys.modules.values()):
    source = getattr(module, "__file__", None) or ""
    if source.endswith(".py"):
        with_source += 1
        missing += not Path(importlib.util.cache_from_source(source)).is_file()
print(json.dumps({"phases": times, "modules": with_source, "bytecode_missing": missing}))
"""


def run(env: dict, tokenizer: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, tokenizer], capture_output=True, text=True, env=env,
                          timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the imports failed: {done.stderr.strip().splitlines()[-1:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = round(time.perf_counter() - start, 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer-folder", default="", help="a saved tokenizer to load between the imports")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers

    report: dict = {"benchmark": "serve_imports", "argv": sys.argv[1:], "python": sys.version.split()[0],
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                    "cpus": os.cpu_count(), "arms": {}}
    with tempfile.TemporaryDirectory() as empty:
        arms = {"as installed": dict(os.environ),
                "no bytecode": {**os.environ, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}}
        for name, env in arms.items():
            rows = [run(env, args.tokenizer_folder) for _ in range(args.repeats)]
            phases = {k: round(statistics.median(r["phases"][k] for r in rows), 3) for k in rows[0]["phases"]}
            report["arms"][name] = {"phases_s": phases, "imports_s": round(sum(phases.values()), 3),
                                    "process_s": statistics.median(r["process_s"] for r in rows),
                                    "modules": rows[-1]["modules"], "bytecode_missing": rows[-1]["bytecode_missing"],
                                    "runs": rows}
            print(f"{name}: {report['arms'][name]['imports_s']} s of imports", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(report, indent=1))
    names = list(report["arms"])
    print("| phase | " + " | ".join(f"{n} s" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for phase in report["arms"][names[0]]["phases_s"]:
        print(f"| {phase} | " + " | ".join(str(report["arms"][n]["phases_s"][phase]) for n in names) + " |")
    for key in ("imports_s", "process_s", "modules", "bytecode_missing"):
        print(f"| {key} | " + " | ".join(str(report["arms"][n][key]) for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
