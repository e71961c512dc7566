"""The open suite: `helm-run` with the challenge's run specs against our server, then `helm-summarize`.

HELM fetches every scenario's data from the internet on first use. Offline, each run fails inside urllib with a
traceback that does not name the address, so a failure that looks like a download failure is reported with the
addresses the open run specs need (read from crfm-helm 0.5.16's scenario sources) and any address HELM printed.
"""

from __future__ import annotations

import os
import re
import shutil
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
_FAILED_RUNS = re.compile(r"Failed runs: \[(.*)\]")  # crfm-helm's RunnerError, when some run specs raised
_LOCAL = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")


def output_files(rel: str) -> bool:
    """Whether `rel` (relative to evaluate/) is an output of the open suite: HELM's runs of our suite and its log,
    not its scenarios cache (downloaded input data, which is kept between evaluations)."""
    return rel == "helm/helm.log" or rel.startswith(f"helm/benchmark_output/runs/{HELM_SUITE}/")


def failed_run_specs(lines: list[str]) -> list[str]:
    """The run spec names helm-run's `Failed runs: [...]` line lists (none when it has none)."""
    for line in reversed(lines):
        match = _FAILED_RUNS.search(line)
        if match:
            return re.findall(r'"([^"]+)"', match.group(1)) or [n.strip() for n in match.group(1).split(",") if n.strip()]
    return []


def run_specs_path(name: str = RUN_SPECS) -> Path:
    """A HELM run spec conf packaged under birbal/evaluate/data/ (evaluate.helm_run_specs names it)."""
    path = Path(str(resources.files("birbal.evaluate").joinpath("data", name)))
    if "/" in name or not name.endswith(".conf") or not path.is_file():
        packaged = sorted(p.name for p in path.parent.glob("*.conf"))
        raise EvaluateError(f"evaluate.helm_run_specs: no run spec file {name!r} in the package; "
                            f"packaged: {', '.join(packaged)}")
    return path


def run_spec_scenarios(conf: Path) -> list[str]:
    """Scenario names of the run spec entries in a HELM conf file, in order, without repeats."""
    names = re.findall(r'description:\s*"([a-z_0-9]+):', conf.read_text())
    return list(dict.fromkeys(names))


# helm-run requires -m/--max-eval-instances (crfm-helm 0.5.16, helm/benchmark/run.py), but uses it only for a run
# spec whose description sets no max_eval_instances of its own (run.py: `if max_eval_instances is not None and
# adapter_spec.max_eval_instances is None`); every entry of the challenge's list sets one. When the recipe sets none,
# the value of the challenge's own instructions (helm.md of llm-efficiency-challenge/neurips_llm_efficiency_challenge
# at 094f659e: `helm-run --conf-paths run_specs.conf --suite v1 --max-eval-instances 1000`), which is also HELM's
# own default (MaxEvalInstancesRunExpander, "default": 1000).
DEFAULT_MAX_EVAL_INSTANCES = 1000


def helm_run_command(helm_run: Path, conf: Path, output: Path, max_eval_instances: int | None,
                     suite: str = HELM_SUITE) -> list[str]:
    limit = DEFAULT_MAX_EVAL_INSTANCES if max_eval_instances is None else max_eval_instances
    return [str(helm_run), "--conf-paths", str(conf), "--suite", suite, "--output-path", str(output),
            "--local-path", str(output.parent / "prod_env"), "--models-to-run", MODEL, "--max-eval-instances",
            str(limit)]


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


def download_failure(lines: list[str], scenarios: list[str], cache: Path | None = None) -> str | None:
    """A message naming what HELM tried to reach, when its output shows a network failure; else None."""
    # errors that name our own server (refused, timed out) are not downloads
    failures = [line.strip() for line in lines if _NETWORK_ERRORS.search(line) and not any(h in line for h in _LOCAL)]
    if not failures:
        return None
    seen = list(dict.fromkeys(url for line in lines for url in _URL.findall(line)
                              if "localhost" not in url and "127.0.0.1" not in url))
    needed = [f"  {name}: {url}" for name in scenarios for url in DATASET_SOURCES.get(name, ())]
    message = [f"HELM could not download its datasets (no internet access?): {failures[-1]}"]
    if seen:
        message.append("addresses in HELM's output: " + ", ".join(seen))
    message.append("the open run specs fetch their data from:\n" + "\n".join(needed))
    where = f" into {cache}" if cache is not None else " into evaluate/helm/benchmark_output/scenarios/"
    message.append("run where these are reachable, or copy a filled HELM scenarios/ cache from such a machine"
                   f"{where} (evaluate keeps it); `--suite quick` runs offline")
    return "\n".join(message)


def helm_environment(url: str, out_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """helm-run's environment: our server's URL for HELM's HTTP client, and NLTK_DATA in the run dir.

    HELM's metrics fetch NLTK's punkt_tab on first use (helm.benchmark.metrics.nltk_helper) into NLTK's default
    folder, the first writable one of /usr/share/nltk_data ... ~/nltk_data. In the containers, as a --user with no
    passwd entry, HOME is / and none of those is writable, so the download fails even online. NLTK_DATA puts it
    beside HELM's scenarios cache (kept between evaluations like it); a caller's own NLTK_DATA is left alone.
    """
    env = dict(os.environ if environ is None else environ, HELM_HTTP_MODEL_BASE_URL=url)
    if not env.get("NLTK_DATA"):
        env["NLTK_DATA"] = str(out_dir / "nltk_data")
        (out_dir / "nltk_data").mkdir(parents=True, exist_ok=True)
    return env


def run_open(url: str, out_dir: Path, max_eval_instances: int | None,
             run_specs: str = RUN_SPECS) -> dict[str, Any]:
    """helm-run + helm-summarize into `out_dir/benchmark_output`; returns the winners' table rows.

    A run spec that fails (helm-run then exits 1 naming it) does not discard the others: what finished is
    summarised and the failures are listed in the summary (`failed_runs`). Only when nothing finished is the
    stage failed. The previous evaluation's runs and log stay in place until this one has runs of its own, and
    HELM's scenarios cache (`benchmark_output/scenarios/`, filled by hand for an offline machine) is never removed.
    """
    helm_run = helm_executable("helm-run")
    conf = run_specs_path(run_specs)
    output = out_dir / "benchmark_output"
    log = out_dir / "helm.log"
    suite_dir = output / "runs" / HELM_SUITE
    kept = [(path, path.with_name(f".{path.name}.previous")) for path in (suite_dir, log)]
    for path, aside in kept:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
        if path.exists():
            path.rename(aside)
    env = helm_environment(url, out_dir)
    command = helm_run_command(helm_run, conf, output, max_eval_instances)
    code, lines = _stream(command, log, env)
    finished = sorted(suite_dir.glob("*/stats.json")) if suite_dir.is_dir() else []
    failed = failed_run_specs(lines) if code != 0 else []
    if not finished:  # nothing new: the earlier evaluation's runs and log come back; this log is kept beside
        failed_log = log
        (suite_path, suite_aside), (_, log_aside) = kept
        if log_aside.exists():
            failed_log = log.with_name("helm.failed.log")
            if log.exists():
                log.replace(failed_log)
            log_aside.rename(log)
        if suite_aside.exists():
            shutil.rmtree(suite_path, ignore_errors=True)
            suite_aside.rename(suite_path)
        reason = download_failure(lines, run_spec_scenarios(conf), output / "scenarios")
        if reason:
            raise EvaluateError(f"{reason}\n(full log: {failed_log})")
        tail = "\n".join(lines[-15:])
        raise EvaluateError(f"helm-run exited {code} with no finished run"
                            + (f" ({len(failed)} run specs failed)" if failed else "")
                            + f"; last lines:\n{tail}\n(full log: {failed_log})")
    for _, aside in kept:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
    summarize = [str(helm_executable("helm-summarize")), "--suite", HELM_SUITE, "--output-path", str(output)]
    summarize_code, _ = _stream(summarize, log, env)
    summary = summarise_runs(suite_dir)
    # paths relative to the run dir, so two reproductions' summaries compare
    relative = ["helm-run", *(conf.name if arg == str(conf) else arg.replace(str(out_dir), "evaluate/helm")
                              for arg in command[1:])]
    summary.update({"client": "helm-run", "helm_run_exit": code, "helm_summarize_exit": summarize_code,
                    "failed_runs": failed, "command": relative,
                    "suite_dir": f"evaluate/helm/benchmark_output/runs/{HELM_SUITE}"})
    if code != 0:
        print(f"[birbal] evaluate: helm-run exited {code}: {len(finished)} run specs finished, {len(failed)} failed"
              + (f" ({', '.join(failed[:5])}{', …' if len(failed) > 5 else ''})" if failed else "")
              + f"; the summary holds what finished (full log: {log})", file=sys.stderr, flush=True)
    return summary
