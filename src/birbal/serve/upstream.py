"""`serve.request_policy: upstream`: /process as the winners' server answered it (birbal-4090's default).

Upaya's scored server is inference/submission_2/ of their repository (commit 6b2bb5d; the same files the
organisers' final_contenders repository holds for the team). What it did with a request, line by line:

- api.py:6-13: `ProcessRequest` has prompt, num_samples=1, max_new_tokens=50, top_k=200, temperature=1e-7
  (the challenge spec says 0.8; a request without one gets 1e-7 here), seed=None, echo_prompt. pydantic 1 ignores every other field, so HELM's `stop_sequences`, `top_p`,
  `top_k_per_token` and `num_return_sequences` never reached the model; HELM sends no `top_k`, so it was 200.
  `num_samples` is parsed and never used.
- main.py:54-55: a seed, when sent, is `torch.manual_seed(seed)`: the process-wide generators, not a per-request
  one. Without a seed sampling continues the process's random stream.
- main.py:57-61: the prompt wrapping (`birbal.serve.postprocess.wrap_prompt`), echo requests included.
- main.py:73-81: `model.generate(max_new_tokens, do_sample=True, temperature, top_k, output_scores=True)`:
  always sampling, also at HELM's temperature 1e-7. transformers applies temperature, then top-k (ties at the
  k-th value kept), and draws with `torch.multinomial(softmax(scores))`. At 1e-7 that is the argmax, except where
  two or more tokens tie for the largest logit: bf16 logits tie often enough, and then the draw picks among them
  at random, where greedy takes the lowest id. Generation runs to end-of-sequence or max_new_tokens (no stop at
  a blank line: the cut happens afterwards, on the text).
- main.py:88-95: the text is the decoded new tokens (special tokens skipped), cut at the first blank line, and the
  "the answer is" rule; with echo_prompt the decoded prompt as sent to the model plus the new tokens, uncut.
- main.py:103-122: `tokens` holds every generated token, end-of-sequence included, each with `decode(id)` as its
  text, the log of the processed distribution's probability (`log(softmax(scores))`: 0.0 for the drawn token at
  1e-7) as its logprob, and `top_logprob` one entry, the argmax's. `logprob` is their float32 sum. With echo no
  prompt tokens are returned.

Kept from the kit (no score can see them): the 422 for a prompt over the context (they asserted: a 500), and
`request_time` covering the whole request, not the generate call alone. Not reproduced: `max_new_tokens: 0`,
which transformers of the time handled in its own way (HELM's open run specs never send it); here it returns no
tokens.
"""

from __future__ import annotations

import torch

DEFAULT_TEMPERATURE = 1e-7  # api.py:11 (the challenge spec's default is 0.8)
# transformers' TopKLogitsWarper and generate's sampling step, as of the 4.3x releases the winners' Dockerfile
# installed unpinned: scores / temperature; mask below the k-th value; softmax; multinomial.


def processed_scores(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """TemperatureLogitsWarper then TopKLogitsWarper(top_k, min_tokens_to_keep=1), on one row of fp32 logits."""
    scores = logits / temperature
    if top_k != 0:
        k = min(max(top_k, 1), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return scores


def choose(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """One sampling step as `generate(do_sample=True)` takes it, on the process's default generator; returns, on
    the device, [token id, log p(token), argmax id, log p(argmax)] in float64 (ids exact), p the processed
    distribution as main.py:105 computes it (`torch.log(softmax)`)."""
    probs = torch.softmax(processed_scores(logits, temperature, top_k), dim=-1)
    token = torch.multinomial(probs.view(1, -1), num_samples=1).view(())
    log_probs = torch.log(probs)
    best = torch.argmax(log_probs)
    # gather, not log_probs[token]: indexing with a 0-d CUDA tensor would sync (see Engine._choose)
    picked = torch.stack([token, best]).view(2)
    values = log_probs.gather(0, picked)
    return torch.stack([picked[0].to(torch.float64), values[0].to(torch.float64),
                        picked[1].to(torch.float64), values[1].to(torch.float64)]), token
