"""The serve stage as a real process: uvicorn on a free port, many clients at once, HELM's own client classes,
and the stage record from `running` to `complete` on SIGTERM. Also a model that fails to load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_model import exported_run_dir, smoke

from birbal.errors import ServeError
from birbal.fsutil import sha256_file
from birbal.rundir import RunDir

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
PROMPT = "The capital of France is"


def _exported_run_dir(root: Path) -> RunDir:
    return exported_run_dir(root)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    run_dir = _exported_run_dir(tmp_path_factory.mktemp("live") / "run")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    log = open(run_dir.path / "server.log", "w")  # noqa: SIM115 - closed in the finaliser
    launched = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "birbal", "serve", "--profile", "smoke", "--run-dir",
                             str(run_dir.path), "--host", "127.0.0.1", "--port", "0"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)

    def url():
        record = run_dir.latest("serve")
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {(run_dir.path / 'server.log').read_text()[-3000:]}")
        return record and record.status == "running" and record.details.get("url")

    try:
        base = _wait_for(url, 60, "serve/stage.json to hold the url")
        _wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, 60, "/health to answer 200")
    except BaseException:  # a setup that fails must not leave the server running
        proc.kill()
        proc.wait()
        log.close()
        raise
    yield {"url": base, "proc": proc, "run_dir": run_dir, "ready_within_s": time.monotonic() - launched}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_many_concurrent_clients_all_succeed(live):
    url = live["url"]

    def client_session(worker: int) -> list[tuple[int, str]]:
        out = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for round_ in range(3):
                if (worker + round_) % 3 == 0:
                    response = client.post("/tokenize", json={"text": PROMPT})
                    out.append((response.status_code, json.dumps(response.json()["tokens"])))
                else:
                    response = client.post("/process", json={"prompt": PROMPT, "max_new_tokens": 4,
                                                             "temperature": 1e-7})
                    out.append((response.status_code, response.json()["text"]))
        return out

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = [r for session in pool.map(client_session, range(16)) for r in session]
    assert len(results) == 48 and all(status == 200 for status, _ in results)
    texts = {text for status, text in results if not text.startswith("[")}
    assert len(texts) == 1  # greedy: every client got the same completion


def test_compiled_kernels_are_kept_with_the_run(live, monkeypatch):
    """torch.compile's cache goes under the run (a container's /tmp is lost at exit), unless the user chose one."""
    from birbal.serve.stage import use_compile_cache

    run_dir = live["run_dir"]
    assert run_dir.latest("serve").details["compile_cache"] == str(run_dir.path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert use_compile_cache(run_dir.path / "cache") == "/somewhere/chosen"
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/chosen/triton"  # Triton's own kernels beside Inductor's
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    use_compile_cache(run_dir.path / "cache")
    assert os.environ["TRITON_CACHE_DIR"] == "/mine"


def test_bad_input_does_not_hurt_the_live_server(live):
    url = live["url"]
    assert httpx.post(f"{url}/process", json={"prompt": 5}).status_code == 422
    assert httpx.post(f"{url}/process", content=b"x" * 2_000_000).status_code == 413
    assert httpx.post(f"{url}/process", json={"prompt": "word " * 5000}).status_code == 422
    assert httpx.post(f"{url}/process", json={"prompt": PROMPT, "max_new_tokens": 1}).status_code == 200


@pytest.mark.helm
def test_helm_http_client_and_tokenizer_get_what_they_expect(live):
    helm_python = os.environ.get("BIRBAL_HELM_PYTHON")
    if not helm_python or not Path(helm_python).is_file():
        pytest.skip("BIRBAL_HELM_PYTHON (a python with crfm-helm installed client-only) is not set")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HELM_HTTP_MODEL_BASE_URL"] = live["url"]
    done = subprocess.run([helm_python, str(TESTS / "helm_client_check.py")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    direct = httpx.post(f"{live['url']}/process", json={"prompt": PROMPT, "max_new_tokens": 5,
                                                       "temperature": 1e-7}).json()
    assert got["greedy"]["text"] == direct["text"]
    assert got["greedy"]["logprob"] == pytest.approx(direct["logprob"], abs=1e-6)
    assert len(got["greedy"]["tokens"]) == len(direct["tokens"])
    assert got["echo"]["text"] == PROMPT  # echo, max_tokens 0: the prompt scored, as HELM's LM metrics ask
    assert "".join(text for text, _ in got["echo"]["tokens"]) == PROMPT
    assert got["echo"]["logprob"] == pytest.approx(sum(lp for _, lp in got["echo"]["tokens"]), abs=1e-6)
    assert got["tokens"] == [1, 415, 5565]  # "<s> The capital", truncated to max_length 3
    assert got["decoded"] == "Hello world"


def test_sigterm_stops_gracefully_and_completes_the_record(live):
    proc, run_dir = live["proc"], live["run_dir"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    record = run_dir.record("serve")
    assert record.status == "complete" and record.outcome == "stopped"
    assert record.details["requests"]["/process 200"] >= 32
    assert record.details["requests"]["/process 422"] >= 1
    assert record.details["generation_requests"] >= 32 and record.details["load_s"] > 0
    assert record.details["stopped_by"] == "SIGTERM"
    assert run_dir.manifest()["stages"]["serve"]["status"] == "complete"


def test_the_record_and_the_log_break_the_start_down(live):
    """`python -m birbal serve` as a judge runs it: serve/stage.json's details.startup times every phase on one
    clock from the process's creation, in the order a start takes them, and the log says the same in one line."""
    run_dir = live["run_dir"]
    if live["proc"].poll() is None:  # run alone (-k): stop it here
        live["proc"].send_signal(signal.SIGTERM)
        live["proc"].wait(timeout=60)
    startup = run_dir.record("serve").details["startup"]
    phases = startup["phases"]
    order = ["main", "serve_stage", "plan", "verify", "imports.server", "bind", "load.device", "load.imports",
             "load.weights", "load.tokenizer", "load.engine", "warm_up", "verify_wait", "ready"]
    assert set(order) <= set(phases), sorted(phases)
    at = [phases[name]["at_s"] for name in order]
    assert at == sorted(at), dict(zip(order, at, strict=True))
    assert 0 < phases["main"]["at_s"] < phases["ready"]["at_s"] == startup["ready_at_s"]
    assert startup["ready_at_s"] < live["ready_within_s"] + 1  # the clock starts at the process, not later
    assert phases["verify"]["at_s"] < phases["load.weights"]["at_s"]  # the hash starts before the load
    assert startup["verify_inputs_s"] == phases["verify"]["s"] == run_dir.record("serve").details["verify_inputs_s"]
    for name in order:
        assert phases[name].get("s", 0) >= 0
    assert startup["process_clock"] is True
    log = (run_dir.path / "server.log").read_text()
    assert "start-up (s since the process began, +duration): main " in log


def test_a_model_that_fails_to_load_fails_the_stage(tmp_path, monkeypatch):
    from birbal.serve.stage import serve_stage

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # serve_stage sets it if unset
    run_dir = RunDir(tmp_path / "run")
    merged = run_dir.stage_dir("export") / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text('{"model_type": "mistral"}')
    (merged / "model.safetensors").write_bytes(b"not safetensors")
    run_dir.finish(run_dir.begin("export", {"test": "broken"}),
                   {f"merged/{p.name}": sha256_file(p) for p in sorted(merged.iterdir())})
    with pytest.raises(ServeError, match="failed to load"):
        serve_stage(smoke(), run_dir, host="127.0.0.1", port=0)
    record = run_dir.attempt("serve")
    assert record.status == "failed" and "failed to load" in record.error


def test_serving_without_an_export_says_what_to_run(tmp_path):
    from birbal.serve.stage import serve_stage

    with pytest.raises(ServeError, match="run the export stage first"):
        serve_stage(smoke(), RunDir(tmp_path / "run"), host="127.0.0.1", port=0)
