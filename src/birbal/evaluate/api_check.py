"""A contract check of the submission API, run before any scoring: /tokenize, /decode and /process must agree
with each other. Cheap (four requests), so both suites run it; a failure stops the stage with what differed."""

from __future__ import annotations

import math
from typing import Any

import httpx

from birbal.errors import EvaluateError

PROBE = "The capital of France is "  # the organisers' own health probe


def check_api(url: str, timeout_s: float) -> dict[str, Any]:
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        def post(path: str, body: dict) -> dict:
            response = client.post(path, json=body)
            if response.status_code != 200:
                raise EvaluateError(f"{url}{path} answered {response.status_code}: {response.text[:300]}")
            return response.json()

        tokens = post("/tokenize", {"text": PROBE})["tokens"]
        decoded = post("/decode", {"tokens": tokens})["text"]
        if decoded.strip().removeprefix("<s>").strip() != PROBE.strip():
            problems.append(f"/decode(/tokenize(text)) gave {decoded!r}, expected {PROBE!r}")
        # A seed: the winners' server (serve.request_policy=upstream) samples even at 1e-7, and draws among
        # tied top logits; with the same seed both requests draw the same.
        greedy = {"prompt": PROBE, "max_new_tokens": 8, "temperature": 1e-7, "top_k_per_token": 3,
                  "echo_prompt": False, "seed": 0}
        first, second = post("/process", greedy), post("/process", greedy)
        summed = sum(t["logprob"] for t in first["tokens"])
        if not math.isclose(summed, first["logprob"], rel_tol=1e-5, abs_tol=1e-4):
            problems.append(f"/process: token logprobs sum to {summed}, response says logprob {first['logprob']}")
        if first["text"] != second["text"]:
            problems.append(f"/process greedy is not deterministic: {first['text']!r} then {second['text']!r}")
        if any(not t["top_logprob"] for t in first["tokens"]):
            problems.append("/process: a token came back without top_logprob")
    result = {"url": url, "tokens": len(tokens), "generated_tokens": len(first["tokens"]),
              "logprob": first["logprob"], "token_logprob_sum": summed, "problems": problems}
    if problems:
        raise EvaluateError("the server breaks the challenge API contract: " + "; ".join(problems))
    return result
