"""The open suite: `helm-run` with the challenge's run specs against our server, then `helm-summarize`.

HELM fetches every scenario's data from the internet on first use. Offline, each run fails inside urllib with a
traceback that does not name the address, so a failure that looks like a download failure is reported with the
addresses the open run specs need (read from crfm-helm 0.5.16's scenario sources) and any address HELM printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from birbal.errors import EvaluateError
from birbal.evaluate.helm_env import helm_executable
from birbal.evaluate.helm_output import summarise_runs

RUN_SPECS = "run_specs_full_coarse_600_budget.conf"
HELM_SUITE = "birbal-open"
MODEL = "neurips/local"

# Where crfm-helm 0.5.16 downloads each open scenario's data from (its scenarios/*.py).
DATASET_SOURCES: dict[str, tuple[str, ...]] = {
    "mmlu": ("https://people.eecs.berkeley.edu/~hendrycks/data.tar",),
    "truthful_qa": ("https://raw.githubusercontent.com/sylinrl/TruthfulQA/"
                    "d71c110897f5d31c5d7f309e7bc316c152f6f031/data/v1/TruthfulQA.csv",),
    "gsm": ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/",),
    "bbq": ("https://raw.githubusercontent.com/nyu-mll/BBQ/main/data/",),
    "big_bench": ("https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks/",),
    "summarization_cnndm": ("https://storage.googleapis.com/crfm-helm-public/source_datasets/scenarios/"
                            "summarization_scenario/cnndm.pk",),
}
_NETWORK_ERRORS = re.compile(
    r"urlopen error|Name or service not known|Temporary failure in name resolution|Failed to establish a new "
    r"connection|Network is unreachable|Couldn't reach|Max retries exceeded|ConnectionError|getaddrinfo failed|"
    r"Connection refused|timed out", re.IGNORECASE)
_URL = re.compile(r"https?://[^\s'\"<>)\]]+")


def run_specs_path() -> Path:
    return Path(str(resources.files("birbal.evaluate").joinpath("data", RUN_SPECS)))


def run_spec_scenarios(conf: Path) -> list[str]:
    """Scenario names of the run spec entries in a HELM conf file, in order, without repeats."""
    names = re.findall(r'description:\s*"([a-z_0-9]+):', conf.read_text())
    return list(dict.fromkeys(names))


def helm_run_command(helm_run: Path, conf: Path, output: Path, max_eval_instances: int | None,
                     suite: str = HELM_SUITE) -> list[str]:
    command = [str(helm_run), "--conf-paths", str(conf), "--suite", suite, "--output-path", str(output),
               "--local-path", str(output.parent / "prod_env"), "--models-to-run", MODEL]
    if max_eval_instances is not None:
        command += ["--max-eval-instances", str(max_eval_instances)]
    return command


def _stream(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run, copying output to the log and stderr as it comes; keep the lines to read the failure from."""
    lines: list[str] = []
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   bufsize=1)
    except OSError as err:
        raise EvaluateError(f"could not start {command[0]}: {err}") from None
    assert process.stdout is not None
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        for line in process.stdout:
            handle.write(line)
            sys.stderr.write(line)
            lines.append(line.rstrip("\n"))
    return process.wait(), lines


def download_failure(lines: list[str], scenarios: list[str]) -> str | None:
    """A message naming what HELM tried to reach, when its output shows a network failure; else None."""
    failures = [line.strip() for line in lines if _NETWORK_ERRORS.search(line)]
    if not failures:
        return None
    seen = list(dict.fromkeys(url for line in lines for url in _URL.findall(line)
                              if "localhost" not in url and "127.0.0.1" not in url))
    needed = [f"  {name}: {url}" for name in scenarios for url in DATASET_SOURCES.get(name, ())]
    message = [f"HELM could not download its datasets (no internet access?): {failures[-1]}"]
    if seen:
        message.append("addresses in HELM's output: " + ", ".join(seen))
    message.append("the open run specs fetch their data from:\n" + "\n".join(needed))
    message.append("run where these are reachable, or copy a filled HELM scenarios/ cache from such a machine "
                   "into the output folder; `--suite quick` runs offline")
    return "\n".join(message)


def run_open(url: str, out_dir: Path, max_eval_instances: int | None) -> dict[str, Any]:
    """helm-run + helm-summarize into `out_dir/benchmark_output`; returns the winners' table rows."""
    helm_run = helm_executable("helm-run")
    conf = run_specs_path()
    output = out_dir / "benchmark_output"
    log = out_dir / "helm.log"
    env = dict(os.environ, HELM_HTTP_MODEL_BASE_URL=url)
    command = helm_run_command(helm_run, conf, output, max_eval_instances)
    code, lines = _stream(command, log, env)
    suite_dir = output / "runs" / HELM_SUITE
    finished = list(suite_dir.glob("*/stats.json")) if suite_dir.is_dir() else []
    if code != 0 or not finished:
        reason = download_failure(lines, run_spec_scenarios(conf))
        if reason:
            raise EvaluateError(f"{reason}\n(full log: {log})")
        tail = "\n".join(lines[-15:])
        raise EvaluateError(f"helm-run exited {code} with {len(finished)} finished runs; last lines:\n{tail}\n"
                            f"(full log: {log})")
    summarize = [str(helm_executable("helm-summarize")), "--suite", HELM_SUITE, "--output-path", str(output)]
    summarize_code, _ = _stream(summarize, log, env)
    summary = summarise_runs(suite_dir)
    summary.update({"client": f"helm-run ({helm_run})", "helm_summarize_exit": summarize_code,
                    "command": command})
    return summary
