"""Run under the HELM client venv (BIRBAL_HELM_PYTHON), not the project's: HELM's own HTTP classes against a live
server at HELM_HTTP_MODEL_BASE_URL. Prints one JSON object with what HELM got back; tests/test_serve_live.py
checks it. Uses only crfm-helm's client side (no torch), as the challenge's evaluator did.
"""

import json

from helm.clients.http_model_client import HTTPModelClient
from helm.common.cache import BlackHoleCacheConfig
from helm.common.request import Request
from helm.common.tokenization_request import DecodeRequest, TokenizationRequest
from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

PROMPT = "The capital of France is"


def completion(result):
    assert result.success, result.error
    (only,) = result.completions
    return {"text": only.text, "logprob": only.logprob, "tokens": [[t.text, t.logprob] for t in only.tokens]}


client = HTTPModelClient(cache_config=BlackHoleCacheConfig())
tokenizer = HTTPModelTokenizer(cache_config=BlackHoleCacheConfig())
greedy = client.make_request(Request(model="neurips/local", model_deployment="neurips/local", prompt=PROMPT,
                                     temperature=0.0, max_tokens=5, top_k_per_token=3, stop_sequences=[]))
echo = client.make_request(Request(model="neurips/local", model_deployment="neurips/local", prompt=PROMPT,
                                   temperature=0.0, max_tokens=0, echo_prompt=True))
tokens = tokenizer.tokenize(TokenizationRequest(text=PROMPT, tokenizer="neurips/local", truncation=True,
                                                max_length=3))
decoded = tokenizer.decode(DecodeRequest(tokens=[1, 22557, 1526], tokenizer="neurips/local"))
assert tokens.success and decoded.success, (tokens.error, decoded.error)
print(json.dumps({"greedy": completion(greedy), "echo": completion(echo),
                  "tokens": [t.value for t in tokens.tokens], "decoded": decoded.text}))
