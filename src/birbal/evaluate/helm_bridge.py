"""Send requests through HELM's own client classes; runs inside HELM's environment, so it imports no birbal code.

Input (stdin, JSON): {"base_url": str, "items": [item, ...]} where an item is
  {"kind": "process", "prompt", "temperature", "num_completions", "max_tokens", "top_p", "echo_prompt",
   "top_k_per_token", "stop_sequences"}  (the fields of helm.common.request.Request), or
  {"kind": "tokenize", "text", "truncation", "max_length"}, or {"kind": "decode", "tokens"}.
Output (stdout, JSON): {"client": str, "helm_version": str, "results": [result, ...]} where a process result is
  {"success", "error", "text", "logprob", "tokens": [{"text", "logprob"}], "request_time"} (what
  HTTPModelClient keeps of the server's answer) and a tokenize/decode result {"success", "error", "tokens"|"text"}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

MODEL = "neurips/local"  # HELM's deployment for the challenge's HTTP server


def helm_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("crfm-helm")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_items(base_url: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from helm.clients.http_model_client import HTTPModelClient
    from helm.common.cache import BlackHoleCacheConfig
    from helm.common.request import Request
    from helm.common.tokenization_request import DecodeRequest, TokenizationRequest
    from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

    client = HTTPModelClient(cache_config=BlackHoleCacheConfig(), base_url=base_url)
    tokenizer = HTTPModelTokenizer(cache_config=BlackHoleCacheConfig(), base_url=base_url)
    results: list[dict[str, Any]] = []
    for item in items:
        kind = item["kind"]
        if kind == "process":
            fields = {k: v for k, v in item.items() if k != "kind"}
            result = client.make_request(Request(model=MODEL, model_deployment=MODEL, **fields))
            completion = result.completions[0] if result.completions else None
            results.append({
                "success": result.success, "error": result.error,
                "text": completion.text if completion else None,
                "logprob": completion.logprob if completion else None,
                "tokens": [{"text": t.text, "logprob": t.logprob} for t in completion.tokens] if completion else [],
                "request_time": result.request_time,
            })
        elif kind == "tokenize":
            out = tokenizer.tokenize(TokenizationRequest(text=item["text"], tokenizer=MODEL,
                                                         truncation=item.get("truncation", False),
                                                         max_length=item.get("max_length", 2048)))
            results.append({"success": out.success, "error": out.error,
                            "tokens": [t.value for t in out.tokens]})
        elif kind == "decode":
            decoded = tokenizer.decode(DecodeRequest(tokens=item["tokens"], tokenizer=MODEL))
            results.append({"success": decoded.success, "error": decoded.error, "text": decoded.text})
        else:
            raise ValueError(f"unknown item kind {kind!r}")
    return results


def main() -> int:
    payload = json.load(sys.stdin)
    results = run_items(payload["base_url"], payload["items"])
    json.dump({"client": "helm.clients.http_model_client.HTTPModelClient + "
                         "helm.tokenizers.http_model_tokenizer.HTTPModelTokenizer",
               "helm_version": helm_version(), "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
