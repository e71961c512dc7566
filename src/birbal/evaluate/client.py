"""How evaluation requests reach the server: through HELM's own client classes where HELM is installed, else
through httpx with the very request shapes HELM's `HTTPModelClient` / `HTTPModelTokenizer` send.

HELM lives in its own environment (it pulls a CUDA torch): `BIRBAL_HELM_PYTHON` names that environment's python,
and `helm_bridge.py` runs there. Every result records which client was used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from birbal.errors import EvaluateError
from birbal.evaluate.helm_env import HELM_PYTHON_ENV

_BRIDGE = Path(__file__).with_name("helm_bridge.py")


class Transport(Protocol):
    description: str

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


def _short(digest: Any) -> str:
    return f"{digest[:12]}…" if isinstance(digest, str) else "unknown"


def check_identity(url: str, health: dict[str, Any], run_id: str, model_digest: str, model_stage: str) -> None:
    """Refuse a server that is not this run's: its GET /health must report this run's id and the digest of the
    model this run made (the export's outputs, or the train stage's adapter), as `serve` does."""
    their_run, their_model = health.get("run_id"), health.get("model_digest")
    if their_run == run_id and their_model == model_digest:
        return
    raise EvaluateError(
        f"the server at {url} is not this run's: it serves run {their_run or 'unknown'} (model "
        f"{_short(their_model)}), this run is {run_id} (model {_short(model_digest)} from its {model_stage} stage). "
        f"Another server holds that address? Stop it, or start this run's server on a free port (`serve --port N`) "
        f"and pass --url http://127.0.0.1:N")


def check_server(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Fail now, with the fix, when nothing answers at `url` (rather than once per request later). Returns the
    body of GET /health."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise EvaluateError(
            f"the model server at {url} is not reachable ({type(err).__name__}: {err}); start it first "
            f"(`invoke serve --run-dir DIR`) or pass the address of a running one with --url") from None
    if response.status_code != 200:
        raise EvaluateError(f"the model server at {url} is not ready: GET /health answered {response.status_code} "
                            f"{response.text[:200]!r}")
    try:
        body = response.json()
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


def wait_until_healthy(url: str, timeout_s: float, process=None, poll_s: float = 0.5,
                       run_id: str | None = None) -> None:
    """Poll GET /health until it answers 200 (for `run_id`, when given: a server of another run answering at `url`
    is not ours); fail when `timeout_s` passes or `process` (the server) exits first."""
    deadline = time.monotonic() + timeout_s
    foreign = None
    while True:
        if process is not None and process.poll() is not None:
            other = f"; meanwhile {url} is answered by the server of another run ({foreign})" if foreign else ""
            raise EvaluateError(f"the model server exited ({process.returncode}) before {url} became healthy{other}")
        try:
            health = check_server(url, timeout_s=min(5.0, timeout_s))
            if run_id is None or health.get("run_id") == run_id:
                return
            foreign = health.get("run_id") or "unknown"
            raise EvaluateError(f"{url} is answered by the server of another run ({foreign}), not {run_id}")
        except EvaluateError as err:
            if time.monotonic() >= deadline:
                raise EvaluateError(f"the model server at {url} was not healthy within {timeout_s:.0f} s: {err}") \
                    from None
        time.sleep(poll_s)


def helm_raw_request(item: dict[str, Any]) -> dict[str, Any]:
    """The JSON body HELM's HTTPModelClient posts to /process for a Request (crfm-helm 0.5.x)."""
    return {
        "prompt": item["prompt"],
        "temperature": 1e-7 if item["temperature"] == 0 else item["temperature"],
        "num_return_sequences": item["num_completions"],
        "max_new_tokens": item["max_tokens"],
        "top_p": item["top_p"],
        "echo_prompt": item["echo_prompt"],
        "top_k_per_token": item["top_k_per_token"],
        "stop_sequences": item["stop_sequences"],
    }


@dataclass
class HttpxTransport:
    url: str
    timeout_s: float = 600.0
    description: str = "httpx with HELM HTTPModelClient's request shapes (crfm-helm not installed)"

    def _post(self, client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = client.post(f"{self.url.rstrip('/')}{path}", json=body)
        response.raise_for_status()
        return response.json()

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        with httpx.Client(timeout=self.timeout_s) as client:
            for item in items:
                try:
                    if item["kind"] == "process":
                        data = self._post(client, "/process", helm_raw_request(item))
                        results.append({"success": True, "error": None, "text": data["text"],
                                        "logprob": data["logprob"], "request_time": data.get("request_time"),
                                        "tokens": [{"text": t["text"], "logprob": t["logprob"]}
                                                   for t in data["tokens"]]})
                    elif item["kind"] == "tokenize":
                        data = self._post(client, "/tokenize", {"text": item["text"],
                                                                "truncation": item.get("truncation", False),
                                                                "max_length": item.get("max_length", 2048)})
                        results.append({"success": True, "error": None, "tokens": data["tokens"]})
                    else:
                        data = self._post(client, "/decode", {"tokens": item["tokens"]})
                        results.append({"success": True, "error": None, "text": data["text"]})
                except httpx.HTTPStatusError as err:
                    results.append({"success": False, "error": f"Request error: {err}: {err.response.text[:300]}"})
                except (httpx.HTTPError, KeyError, ValueError) as err:
                    results.append({"success": False, "error": f"Request error: {type(err).__name__}: {err}"})
        return results


@dataclass
class HelmInProcess:
    url: str
    description: str = ""

    def __post_init__(self) -> None:
        from birbal.evaluate import helm_bridge

        self.description = (f"HELM HTTPModelClient/HTTPModelTokenizer (crfm-helm {helm_bridge.helm_version()}, "
                            f"in process)")

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from birbal.evaluate import helm_bridge

        return helm_bridge.run_items(self.url, items)


@dataclass
class HelmSubprocess:
    """HELM's client classes in HELM's own environment: one subprocess per batch of requests."""

    url: str
    python: Path
    timeout_s: float = 3600.0
    description: str = ""

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        payload = json.dumps({"base_url": self.url, "items": items})
        env = dict(os.environ, HELM_HTTP_MODEL_BASE_URL=self.url)
        try:
            done = subprocess.run([str(self.python), str(_BRIDGE)], input=payload, capture_output=True, text=True,
                                  timeout=self.timeout_s, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise EvaluateError(f"HELM's client bridge could not run with {self.python} ({HELM_PYTHON_ENV}): "
                                f"{err}") from None
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise EvaluateError(f"HELM's client bridge failed under {self.python} ({HELM_PYTHON_ENV}), exit "
                                f"{done.returncode}:\n{tail}")
        out = json.loads(done.stdout)
        self.description = (f"HELM HTTPModelClient/HTTPModelTokenizer (crfm-helm {out['helm_version']}, "
                            f"{self.python})")
        return out["results"]


def choose_transport(url: str, timeout_s: float = 600.0) -> Transport:
    """HELM's client classes when they can be had (its venv via BIRBAL_HELM_PYTHON, or importable here)."""
    helm_python = os.environ.get(HELM_PYTHON_ENV)
    if helm_python:
        path = Path(helm_python).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EvaluateError(f"{HELM_PYTHON_ENV}={helm_python} is not an executable python; create HELM's "
                                f"environment first (`python -m birbal.evaluate.helm_env` prints the commands)")
        # venv pythons are symlinks to one interpreter: compare the paths themselves, not their targets
        if os.path.abspath(path) != os.path.abspath(sys.executable):
            return HelmSubprocess(url=url, python=path, timeout_s=max(timeout_s, 60.0))
    if importlib.util.find_spec("helm") is not None and importlib.util.find_spec("helm.clients") is not None:
        return HelmInProcess(url=url)
    return HttpxTransport(url=url, timeout_s=timeout_s)
