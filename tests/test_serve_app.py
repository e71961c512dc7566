"""The HTTP layer through FastAPI's TestClient: endpoints, the error table, /health while loading, body limit."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from serve_model import engine, serve_cfg

from birbal.errors import ServeError
from birbal.serve.app import create_app
from birbal.serve.engine import Engine


@pytest.fixture(scope="module")
def client():
    cfg = serve_cfg(max_context=64, max_body_bytes=4096)
    shared = engine("birbal")
    with TestClient(create_app(Engine(shared.model, shared.tokenizer, cfg), cfg)) as c:
        yield c


def test_app_and_engine_must_share_the_serve_config():
    with pytest.raises(ServeError, match="another ServeConfig"):
        create_app(engine("birbal"), serve_cfg(max_context=64))


def _assert_error(response, status: int, error_type: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    for word in words:
        assert word in body["error"], (word, body["error"])


def test_process_returns_the_challenge_response(client):
    response = client.post("/process", json={"prompt": "The capital of France is ", "max_new_tokens": 4,
                                             "temperature": 1e-7, "top_k_per_token": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"text", "tokens", "logprob", "request_time"}
    assert 1 <= len(body["tokens"]) <= 4 and body["request_time"] > 0
    assert all(set(t) == {"text", "logprob", "top_logprob"} and len(t["top_logprob"]) >= 1 for t in body["tokens"])


def test_tokenize_and_decode(client):
    tokens = client.post("/tokenize", json={"text": "Hello world"}).json()["tokens"]
    assert tokens == [1, 22557, 1526]
    assert client.post("/tokenize", json={"text": "Hello world", "max_length": 2}).json()["tokens"] == [1, 22557]
    assert client.post("/tokenize", json={"text": "Hello world", "truncation": False,
                                          "max_length": 2}).json()["tokens"] == tokens
    assert client.post("/decode", json={"tokens": tokens}).json()["text"] == "Hello world"


@pytest.mark.parametrize("body, words", [
    ({"prompt": ""}, ["prompt", "at least 1 character"]),
    ({"prompt": 42}, ["prompt", "valid string", "42"]),
    ({"prompt": ["a"]}, ["prompt", "valid string"]),
    ({}, ["prompt", "Field required"]),
    ({"prompt": "x", "max_new_tokens": -1}, ["max_new_tokens", "greater than or equal to 0", "-1"]),
    ({"prompt": "x", "max_new_tokens": 10**12}, ["max_new_tokens", "less than or equal to 1000000"]),
    ({"prompt": "x", "temperature": -1}, ["temperature", "greater than or equal to 0"]),
    ({"prompt": "x", "top_p": 2}, ["top_p", "less than or equal to 1"]),
    ({"prompt": "x", "top_k_per_token": 1000}, ["top_k_per_token", "less than or equal to 100"]),
    ({"prompt": "x", "seed": -3}, ["seed", "greater than or equal to 0"]),
    ({"prompt": "x", "num_return_sequences": 99}, ["num_return_sequences", "less than or equal to 16"]),
])
def test_bad_process_input_is_a_422_naming_field_and_limit(client, body, words):
    response = client.post("/process", json=body)
    _assert_error(response, 422, "validation", *words)
    assert response.json()["detail"]  # FastAPI's HTTPValidationError list, as the spec declares


def test_prompt_plus_max_new_tokens_over_the_context_is_a_422(client):
    response = client.post("/process", json={"prompt": "word " * 30, "max_new_tokens": 40})
    _assert_error(response, 422, "validation", "max_new_tokens", "<= 64", "serve.max_context")
    response = client.post("/process", json={"prompt": "word " * 80, "max_new_tokens": 0})
    _assert_error(response, 422, "validation", "prompt", "at most 64 tokens")


def test_unknown_token_ids_are_a_422(client):
    _assert_error(client.post("/decode", json={"tokens": [1, 99999]}), 422, "validation", "tokens[1]", "31999")
    _assert_error(client.post("/decode", json={"tokens": [-1]}), 422, "validation", "tokens.0")


def test_not_json_is_a_422(client):
    response = client.post("/process", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(response, 422, "validation", "not valid JSON")


def test_body_over_the_limit_is_a_413(client):
    big = json.dumps({"prompt": "x" * 5000}).encode()
    response = client.post("/process", content=big, headers={"content-type": "application/json"})
    _assert_error(response, 413, "payload_too_large", "at most 4096 bytes", "serve.max_body_bytes")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    response = client.post("/process", content=chunks(), headers={"content-type": "application/json"})
    _assert_error(response, 413, "payload_too_large", "serve.max_body_bytes")
    assert client.get("/health").status_code == 200  # and the server carries on


def test_unknown_path_and_method_use_the_error_body(client):
    _assert_error(client.get("/nope"), 404, "not_found")
    _assert_error(client.get("/process"), 405, "method_not_allowed")


def test_openapi_page_lists_the_challenge_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/process", "/tokenize", "/decode", "/health"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_health_is_503_until_the_model_is_loaded():
    release = threading.Event()

    def slow_factory():
        release.wait(timeout=30)
        return engine("none")

    with TestClient(create_app(slow_factory, serve_cfg(postprocess="none"))) as c:
        _assert_error(c.get("/health"), 503, "loading", "still loading")
        _assert_error(c.post("/process", json={"prompt": "x"}), 503, "loading")
        release.set()
        app_slot = c.app.state.slot
        assert app_slot.loaded.wait(timeout=30)
        health = c.get("/health").json()
        assert health["status"] == "ready" and health["decode"] == "eager"  # serve.decode auto, on CPU


def test_a_failed_load_is_reported_by_health():
    def broken_factory():
        raise OSError("weights missing")

    with TestClient(create_app(broken_factory, serve_cfg())) as c:
        assert c.app.state.slot.loaded.wait(timeout=10)
        _assert_error(c.get("/health"), 503, "loading", "failed to load", "weights missing")


def test_response_counts_are_kept(client):
    counts = client.app.state.request_counts
    before = counts["/tokenize 200"]
    client.post("/tokenize", json={"text": "a"})
    assert counts["/tokenize 200"] == before + 1
