"""Issue 14, the server: a lone surrogate is a 422 on /tokenize as on /process; a 500 is counted and logged
once; a client that disconnects has its generation cancelled, queued ones included (real uvicorn, real sockets)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from conftest import free_port
from fastapi.testclient import TestClient
from serve_model import engine, serve_cfg

from birbal.serve.app import create_app


def _post(client, path: str, raw: str):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def test_a_lone_surrogate_is_a_422_on_tokenize_as_on_process():
    with TestClient(create_app(engine("none"), serve_cfg(postprocess="none"))) as c:
        for path, body in (("/tokenize", '{"text": "x\\ud800"}'), ("/process", '{"prompt": "x\\ud800"}')):
            response = _post(c, path, body)
            assert response.status_code == 422, (path, response.text)
            assert response.json()["error_type"] == "validation"


def test_a_500_is_counted_and_logged_once(monkeypatch, caplog):
    eng = engine("none")

    def bug(request):
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(eng, "tokenize", bug)  # the fault is injected; the app and its middleware are the real ones
    app = create_app(eng, serve_cfg(postprocess="none"))
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as c:
        response = c.post("/tokenize", json={"text": "a"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error: RuntimeError: a bug in the engine",
                                   "error_type": "internal"}
        assert c.post("/decode", json={"tokens": [1]}).status_code == 200  # still serving
    assert app.state.request_counts["/tokenize 500"] == 1
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug in the engine" in str(tracebacks[0].exc_info[1])


def _send_without_reading(port: int, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_generations_of_clients_that_went_away_are_cancelled_queued_ones_included():
    import uvicorn

    eng = engine("none")
    running, release, started = threading.Event(), threading.Event(), []
    app = create_app(eng, serve_cfg(postprocess="none"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        before = eng.stats.requests
        # long generations (sampled, so the random model does not end at once): one runs, two queue behind it
        long = {"prompt": "Once upon a time", "max_new_tokens": 2000, "temperature": 1.0, "top_k": 0, "seed": 1}
        real_process = eng.process

        def held_until_released(*args, **kwargs):
            # the real engine, held at its start: the first generation keeps the generation thread busy for as
            # long as the test needs (a sampled generation of this tiny model ends in under a second, so on a
            # loaded machine it could end, and a queued one start, before the test's clients left)
            started.append(kwargs.get("request", args[0] if args else None))
            running.set()
            release.wait(30)
            return real_process(*args, **kwargs)

        eng.process = held_until_released
        socks = [_send_without_reading(port, long)]
        assert running.wait(30)  # the first is running before the others arrive
        socks += [_send_without_reading(port, long) for _ in range(2)]
        time.sleep(1.0)  # both read and queued behind it
        for sock in socks[1:]:  # the queued clients leave first
            sock.close()
        while app.state.cancelled["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dict(app.state.cancelled) == {"queued": 2}  # neither ever started
        socks[0].close()
        while app.state.cancelled["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()  # the running generation, its client gone, stops at its first token
        assert dict(app.state.cancelled) == {"running": 1, "queued": 2}
        t0 = time.monotonic()
        answer = httpx.post(f"http://127.0.0.1:{port}/process", json={"prompt": "Hi", "max_new_tokens": 2},
                            timeout=30)
        assert answer.status_code == 200 and time.monotonic() - t0 < 10  # nothing left running ahead of it
        assert eng.stats.requests == before + 1  # the cancelled ones never completed
        assert len(started) == 2  # and the queued ones never reached the engine: the first and "Hi" did
        assert app.state.request_counts["/process 499"] == 3
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _quiet_uvicorn():
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
