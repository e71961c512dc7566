"""The request schemas against the challenge's OpenAPI spec, and their limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from birbal.serve.schemas import DecodeRequest, ProcessRequest, ProcessResponse, TokenizeRequest

# The organisers' spec, kept verbatim in the package (it is what the server must stay compatible with).
SPEC = Path(__file__).resolve().parents[1] / "src" / "birbal" / "reference" / "challenge_open_api_spec.json"


def _spec() -> dict:
    return json.loads(SPEC.read_text())


def _types(prop: dict) -> set[str]:
    if "anyOf" in prop:
        return {t for sub in prop["anyOf"] for t in _types(sub)}
    return {prop["type"]} if "type" in prop else set()


@pytest.mark.parametrize("name, model", [("ProcessRequest", ProcessRequest), ("TokenizeRequest", TokenizeRequest)])
def test_request_schema_matches_the_challenge_spec(name, model):
    spec = _spec()["components"]["schemas"][name]
    ours = model.model_json_schema(by_alias=True)
    assert set(ours.get("required", [])) == set(spec.get("required", []))
    for field, prop in spec["properties"].items():
        assert field in ours["properties"], f"{name}.{field} from the spec is missing"
        assert prop["type"] in _types(ours["properties"][field]), f"{name}.{field}: type differs from the spec"
        if "default" in prop:
            assert ours["properties"][field].get("default") == prop["default"], f"{name}.{field}: default differs"


def test_spec_defaults_parse_to_the_spec_values():
    request = ProcessRequest.model_validate({"prompt": "Hi"})
    assert (request.num_samples, request.max_new_tokens, request.top_k, request.temperature, request.seed) == (
        1, 50, 200, 0.8, None)
    tokenize = TokenizeRequest.model_validate({"text": "Hi"})
    assert (tokenize.truncation, tokenize.max_length) == (True, 2048)


def test_helm_request_body_parses():
    # What helm.clients.http_model_client.HTTPModelClient sends (crfm-helm 0.5.x).
    body = {"prompt": "Q: 1+1?\nA:", "temperature": 1e-7, "num_return_sequences": 1, "max_new_tokens": 1,
            "top_p": 1, "echo_prompt": False, "top_k_per_token": 5, "stop_sequences": ["\n"]}
    request = ProcessRequest.model_validate(body)
    assert request.num_samples == 1 and request.stop_sequences == ["\n"] and request.top_k_per_token == 5


def test_helm_nulls_mean_defaults_and_unknown_fields_are_ignored():
    request = ProcessRequest.model_validate({"prompt": "x", "top_p": None, "stop_sequences": None,
                                             "echo_prompt": None, "top_k_per_token": None, "future": 1})
    assert (request.top_p, request.stop_sequences, request.echo_prompt, request.top_k_per_token) == (
        1.0, [], False, 1)


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**9}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "num_samples": 0}, "num_samples"),
    ({"prompt": "x", "num_return_sequences": 1000}, "num_return_sequences"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "top_k_per_token": 0}, "top_k_per_token"),
    ({"prompt": "x", "stop_sequences": [""]}, "stop_sequences"),
    ({"prompt": "x", "stop_sequences": ["a"] * 17}, "stop_sequences"),
])
def test_bad_process_values_are_rejected_naming_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        ProcessRequest.model_validate(body)
    assert field in {str(part) for err in caught.value.errors() for part in err["loc"]}


def test_bad_tokenize_and_decode_values_are_rejected():
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"text": "x", "max_length": 0})
    with pytest.raises(ValidationError):
        DecodeRequest.model_validate({"tokens": [1, -5]})
    with pytest.raises(ValidationError):
        DecodeRequest.model_validate({"tokens": "12"})


def test_response_shape():
    response = ProcessResponse.model_validate(
        {"text": "B", "tokens": [{"text": "B", "logprob": -0.1, "top_logprob": {"B": -0.1}}], "logprob": -0.1,
         "request_time": 0.01})
    assert response.tokens[0].top_logprob == {"B": -0.1}
