"""GPU end-to-end: birbal-4090's chain through the real CLI at the Mistral-7B shape, then a burst at the server.

prepare-data -> train (the profile's kernels: 4-bit NF4 base, flex_attention, compiled layers, the 24 GiB cap;
ONE optimiser step, eval and checkpoint at it: the fewest the profile allows, to fit one 10-minute command) ->
export (merge in bf16, checked) -> serve (the profile's path: bf16 base + export/adapter unmerged, serve.decode
auto = compiled CUDA-graph decode, every cache length compiled in the warm-up before /health says 200) -> a
concurrent burst of HELM-shaped /process requests (HELM's own body, `helm_raw_request`), with prompts that fill
each static cache exactly (prompt tokens + max_new_tokens == each of serve.decode_cache_lengths and max_context),
one token past each smaller cache, and two past the context. Every stage's stage.json must be complete, no answer
a 5xx, the past-context ones a 422. The server's cold start (launch to /health 200) is measured.

The weights are random (built on the GPU, as tests/test_gpu_train.py does). The tokenizer: the profile's maths need
SentencePiece's model file (train.tokenization=upstream); where `mistral_common` and `sentencepiece` import, the
real tokenizer.model from the mistral-common wheel is used and train.tokenization stays upstream; elsewhere the
saved Mistral-7B-v0.1 tokenizer.json of the carry (.whl/tok or .cache/whl3/tok) is used with
train.tokenization=joint (the JSON result says which). `BIRBAL_E2E_SET` adds `--set` overrides (';'-separated), e.g.
`serve.decode_cache_lengths=[2048]` to compile one cache fewer when time is short; the boundaries follow whatever
the resolved recipe says.

Time: every stage's timeout is the smaller of its cap and what is left of BUDGET_S, so the test fails (naming the
stage, with its log's tail) before the 10-minute command is killed. Measured on an H200 (2026-12-01, eighth session,
transformers 5.17, benchmarks/results): checkpoint 24 s, prepare 15 s, train 288 s with an empty compile cache
(4-bit load, the layer's three compiled graphs, 1 step, eval, checkpoint) and 56 s on a warm one, export 85 s,
server cold start 42 s (its 3 cache lengths compiled), burst 3 s: about 460 s on a cold machine. Under transformers
5.24 (the images' pin; fourteenth session, 2026-12-02) the cold first step alone took 258 s and eval 16 s, so the
train stage hit its old 300 s cap in the checkpoint save after the eval: the caps are now 360 s for train and
555 s for the whole body. With them it passed (fifteenth session, 2026-12-02, gpu_e2e_h200_2026-12-02_passed.json):
checkpoint 30 s, prepare 6 s, train 274 s (its cold step 230 s), export 71 s, cold start 37 s (both cache lengths
and the rest regions compiled), burst 2 s: 422 s of the 555, the command 450 s of its 600.
Run it alone in a command (no compileall first), with nothing else's timeout shorter than BUDGET_S.

With OUT set, $OUT/gpu_e2e.json (rewritten after every stage, so a run cut short still reports where the time
went) holds each stage's duration from its stage.json, the wall time of each subprocess, the cold start, every
request's status and latency, and the train record's peak GPU memory; $OUT/e2e-logs/ the stages' logs.

Run: PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_e2e.py -s
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROFILE = "birbal-4090"
BUDGET_S = 555.0  # the whole test body (9.25 min less start-up); the device command is killed at 600 s
CAPS_S = {"prepare-data": 120.0, "train": 360.0, "export": 200.0}
SERVE_READY_CAP_S = 330.0
# The decode path the profile serves with (birbal-4090: serve.decode compiled_layers); BIRBAL_E2E_DECODE names another
# when a run overrides serve.decode through BIRBAL_E2E_SET
EXPECTED_DECODE = os.environ.get("BIRBAL_E2E_DECODE", "compiled_layers")
RESERVE_AFTER_READY_S = 45.0  # the burst, the shutdown and the checks
# The saved tokenizer folder of the GPU box's carry: BIRBAL_E2E_TOKENIZER, else the first of the old carry's and
# benchmarks/device_carry.py's (.cache/whl3/tok) that exists
TOKENIZER_FOLDER = Path(os.environ.get("BIRBAL_E2E_TOKENIZER") or next(
    (folder for folder in (REPO / ".whl" / "tok", REPO / ".cache" / "whl3" / "tok") if folder.is_dir()),
    REPO / ".whl" / "tok"))
MISTRAL_COMMON_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"  # as test_gpu_train.py
WORDS = ["river", "stone", "apple", "paper", "silver", "table", "bread", "cloud", "seven", "green", "house", "water",
         "light", "music", "garden", "window", "yellow", "winter", "market", "letter"]


def _log(message: str) -> None:
    print(f"[gpu-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Result:
    """The JSON result, rewritten after every step when OUT is set."""

    def __init__(self):
        self.data: dict = {"profile": PROFILE, "stages": {}, "subprocess_wall_s": {}, "requests": []}
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu_e2e.json" if out else None
        self.logs = Path(out) / "e2e-logs" if out else None
        if self.logs:
            self.logs.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def keep_log(self, log: Path) -> None:
        if self.logs and log.is_file():
            (self.logs / log.name).write_bytes(log.read_bytes()[-2_000_000:])


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def _record(run: Path, folder: str) -> dict:
    path = run / folder / "stage.json"
    assert path.is_file(), f"{path} is missing"
    return json.loads(path.read_text())


def _tokenizer_overrides(result: Result) -> list[str]:
    try:
        import mistral_common  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError:
        assert (TOKENIZER_FOLDER / "tokenizer.json").is_file(), \
            f"neither mistral-common + sentencepiece nor {TOKENIZER_FOLDER}/tokenizer.json: no Mistral tokenizer"
        result.data["tokenizer"] = f"{TOKENIZER_FOLDER} (tokenizer.json); train.tokenization=joint"
        return [f"model.tokenizer={{source: hub, name_or_path: {TOKENIZER_FOLDER}, revision: null}}",
                "train.tokenization=joint"]
    result.data["tokenizer"] = "mistral-common tokenizer.model.v1; train.tokenization=upstream (the profile's)"
    return [f"model.tokenizer={{source: mistral-common, name_or_path: null, revision: null, "
            f"sha256: {MISTRAL_COMMON_SHA256}}}"]


def _long_rows(path: Path) -> None:
    """test_gpu_train.py's rows: answers of ~2,000-3,000 tokens, so bins fill past 8,192 tokens."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(14):
            f.write(json.dumps({"instruction": "Repeat the words in the input, then continue the pattern.",
                                "input": f"Words number {i}: " + " ".join(rng.choices(WORDS[:10], k=12)),
                                "output": " ".join(rng.choices(WORDS[:10], k=rng.randint(1800, 2600)))}) + "\n")


def prompt_of(tokens: int, count, seed: int) -> str:
    """A HELM-shaped one-passage prompt whose token count after the server's prompt policy (`count`) is exactly
    `tokens`: filler words added or removed until it is."""
    rng = random.Random(seed)
    pool = rng.choices(WORDS, k=tokens + 64)
    head, tail = "Passage: ", "\nQuestion: Which word comes up most often in the passage?\nAnswer:"

    def make(k: int) -> str:
        return head + " ".join(pool[:k]) + tail

    k = max(1, tokens - count(make(1)))
    seen = set()
    for _ in range(60):
        k = min(max(k, 1), len(pool))
        n = count(make(k))
        if n == tokens:
            return make(k)
        seen.add(k)
        step = tokens - n
        k = k + step if k + step not in seen else k + (1 if step > 0 else -1)
    raise AssertionError(f"could not build a prompt of exactly {tokens} tokens")


def _helm_requests() -> list[tuple[str, dict, int]]:
    """(name, HELM's body, expected status) for the open suite's shapes."""
    from birbal.evaluate.client import helm_raw_request

    def helm(prompt: str, max_tokens: int, stop=()) -> dict:
        return helm_raw_request({"prompt": prompt, "temperature": 0, "num_completions": 1, "max_tokens": max_tokens,
                                 "top_p": 1, "echo_prompt": False, "top_k_per_token": 1, "stop_sequences": list(stop)})

    shot = "Question: Which is a fruit?\nA. stone\nB. apple\nC. river\nD. paper\nAnswer: B"
    mmlu = ("The following are multiple choice questions (with answers) about everyday objects.\n\n"
            + "\n\n".join([shot] * 4) + "\n\nQuestion: Which is a colour?\nA. bread\nB. table\nC. green\nD. seven"
            "\nAnswer:")
    gsm = ("Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA: 3 + 4 = 7. The answer is 7.\n\n"
           "Q: A box holds 6 stones and another holds 9. How many stones in all?\nA: 6 + 9 = 15. The answer is 15.\n\n"
           "Q: Ann reads 12 pages a day for 5 days. How many pages does she read?\nA:")
    article = " ".join(random.Random(7).choices(WORDS, k=600))
    cnn = f"###\nArticle: {article}\n\nSummarize the above article in 3 sentences.\n"
    bbq = ("The following are multiple choice questions (with answers).\n\nContext: Two friends met at the market.\n"
           "Question: Who bought bread?\nA. The first friend\nB. The second friend\nC. Unknown\nAnswer: C\n\n"
           "Context: A neighbour and a teacher talked by the window.\nQuestion: Who was late?\nA. The neighbour\n"
           "B. The teacher\nC. Unknown\nAnswer:")
    truthful = "Question: What colour is the sky on a clear day?\nA. Blue\nB. Green\nAnswer:"
    bigbench = "Repeat the word cloud three times.\nOutput:"
    rows = [("mmlu", helm(mmlu, 1), 200), ("gsm8k", helm(gsm, 32, ["\n\n"]), 200),
            ("cnn_dm", helm(cnn, 32, ["###"]), 200), ("bbq", helm(bbq, 1), 200),
            ("truthful_qa", helm(truthful, 1), 200), ("big_bench", helm(bigbench, 16), 200)]
    return rows


def _boundary_requests(count, cache_lengths: list[int], max_context: int) -> list[tuple[str, dict, int]]:
    """Prompts that fill each static cache exactly, one token past each smaller one, and two past the context."""
    from birbal.evaluate.client import helm_raw_request

    def body(prompt: str, max_tokens: int) -> dict:
        return helm_raw_request({"prompt": prompt, "temperature": 0, "num_completions": 1, "max_tokens": max_tokens,
                                 "top_p": 1, "echo_prompt": False, "top_k_per_token": 1, "stop_sequences": []})

    new = 8
    rows = []
    lengths = sorted({n for n in cache_lengths if n < max_context} | {max_context})
    for i, length in enumerate(lengths):
        rows.append((f"fills_cache_{length}", body(prompt_of(length - new, count, 100 + i), new), 200))
        if length < max_context:
            rows.append((f"past_cache_{length}_by_1", body(prompt_of(length - new + 1, count, 200 + i), new), 200))
    rows.append((f"past_context_{max_context}_by_1", body(prompt_of(max_context - new + 1, count, 300), new), 422))
    rows.append((f"prompt_over_context_{max_context}", body(prompt_of(max_context + 1, count, 301), 1), 422))
    return rows


def _post(client, url: str, name: str, body: dict, expected: int) -> dict:
    t0 = time.perf_counter()
    try:
        response = client.post(f"{url}/process", json=body)
        status, text = response.status_code, response.text
        tokens = len(response.json()["tokens"]) if status == 200 else None
    except Exception as err:  # noqa: BLE001 - a transport failure is reported as such, not raised in a thread
        status, text, tokens = None, f"{type(err).__name__}: {err}", None
    return {"name": name, "status": status, "expected": expected, "latency_s": round(time.perf_counter() - t0, 3),
            "max_new_tokens": body["max_new_tokens"], "tokens": tokens, "answer": text[:300]}


def test_birbal_4090_end_to_end_at_the_7b_shape(tmp_path):
    import httpx

    from birbal.config import load_recipe
    from birbal.models import load_tokenizer
    from birbal.serve.postprocess import get_policy

    t_start = time.monotonic()
    deadline = t_start + BUDGET_S
    result = Result()

    def left() -> float:
        return deadline - time.monotonic()

    sys.path.insert(0, str(REPO / "benchmarks"))
    from shapes import MISTRAL_7B
    from train_throughput import build_checkpoint

    _log("building the random Mistral-7B-shape bf16 checkpoint on the GPU")
    t0 = time.monotonic()
    checkpoint = build_checkpoint(tmp_path / "mistral-7b-random-bf16", MISTRAL_7B, "cuda")["checkpoint"]
    torch.cuda.empty_cache()
    result.data["checkpoint_build_s"] = round(time.monotonic() - t0, 1)
    _log(f"checkpoint built in {result.data['checkpoint_build_s']} s")
    rows = tmp_path / "long_rows.jsonl"
    _long_rows(rows)
    overrides = [
        f"model.name_or_path={checkpoint}", *_tokenizer_overrides(result),
        "data.mode=rebuild", "data.eval_fraction=0.15", "data.contamination.benchmarks=[]",
        f"data.rebuild.sources=[{{name: long, kind: instruction_rows, origin: {{path: {rows}}}}}]",
        "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1", "train.budget_hours=1",
        "train.max_gpu_memory_gib=24", "export.dtype=bfloat16",
        *[o.strip() for o in os.environ.get("BIRBAL_E2E_SET", "").split(";") if o.strip()]]
    result.data["overrides"] = overrides
    recipe = load_recipe(PROFILE, overrides)
    assert recipe.serve.model == "adapter" and recipe.export.dtype == "bfloat16"
    assert recipe.serve.decode == EXPECTED_DECODE or (recipe.serve.decode == "auto" and EXPECTED_DECODE == "compiled_layers")
    args = [a for o in overrides for a in ("--set", o)]
    run = tmp_path / "run"

    for stage, folder in (("prepare-data", "data"), ("train", "train"), ("export", "export")):
        timeout = min(CAPS_S[stage], left() - 60)
        assert timeout > 10, f"no time left for {stage} ({left():.0f} s of the budget left)"
        log = tmp_path / f"{stage}.log"
        _log(f"{stage} started (timeout {timeout:.0f} s, {left():.0f} s of the budget left)")
        t0 = time.monotonic()
        with open(log, "wb") as sink:
            try:
                proc = subprocess.run([sys.executable, "-m", "birbal", stage, "--profile", PROFILE, "--run-dir",
                                       str(run), *args], cwd=REPO, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        wall = round(time.monotonic() - t0, 1)
        result.data["subprocess_wall_s"][stage] = wall
        result.keep_log(log)
        _log(f"{stage} finished in {wall} s (exit {code})")
        if code != 0:
            result.data["failed"] = f"{stage}: exit {code}"
            result.save()
            raise AssertionError(f"birbal {stage} exited {code} after {wall} s:\n{_tail(log)}")
        record = _record(run, folder)
        result.data["stages"][stage] = {"status": record["status"], "duration_s": record.get("duration_s")}
        if stage == "train":
            details = record["details"]
            result.data["peak_gpu_memory_gib"] = details.get("peak_gpu_memory_gib")
            result.data["train"] = {k: details.get(k) for k in ("global_step", "device", "first_train_loss",
                                                                 "final_train_loss", "packing_efficiency_estimate")}
        result.save()
        assert record["status"] == "complete", f"{stage}/stage.json is {record['status']}: {record.get('error')}"

    train = _record(run, "train")["details"]
    assert train["global_step"] == 1 and str(train["device"]).startswith("cuda")
    assert 0 < train["peak_gpu_memory_gib"] < 24
    assert _record(run, "export")["details"]["dtype"] == "bfloat16"
    assert (run / "export" / "adapter" / "adapter_config.json").is_file()

    # The burst's prompts, built with the server's own tokenizer and prompt policy (before the server starts).
    tokenizer = load_tokenizer(recipe.model.tokenizer, tmp_path / "tok-cache")
    policy = get_policy(recipe.serve.postprocess)

    def count(prompt: str) -> int:
        return len(tokenizer(policy.prompt(prompt), add_special_tokens=True)["input_ids"])

    max_context = recipe.serve.max_context
    requests = _helm_requests() + _boundary_requests(count, list(recipe.serve.decode_cache_lengths), max_context)
    result.data["max_context"], result.data["decode_cache_lengths"] = max_context, recipe.serve.decode_cache_lengths

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    ready_timeout = min(SERVE_READY_CAP_S, left() - RESERVE_AFTER_READY_S)
    assert ready_timeout > 30, f"no time left to serve ({left():.0f} s of the budget left)"
    _log(f"serve started on {url} (ready timeout {ready_timeout:.0f} s)")
    sink = open(log, "wb")
    t_launch = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "birbal", "serve", "--profile", PROFILE, "--run-dir", str(run),
                               *args, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=_env(),
                              stdout=sink, stderr=subprocess.STDOUT)
    try:
        health = None
        with httpx.Client(timeout=5.0) as poll:
            while time.monotonic() - t_launch < ready_timeout:
                if server.poll() is not None:
                    break
                try:
                    answer = poll.get(f"{url}/health")
                    if answer.status_code == 200:
                        health = answer.json()
                        break
                    assert answer.status_code == 503, f"/health answered {answer.status_code}: {answer.text[:500]}"
                except httpx.TransportError:
                    pass
                time.sleep(1.0)
        cold_start = round(time.monotonic() - t_launch, 1)
        result.data["serve_cold_start_s"], result.data["health"] = cold_start, health
        result.save()
        if health is None:
            result.data["failed"] = f"serve: not ready after {cold_start} s (exit {server.poll()})"
            result.save()
            raise AssertionError(f"the server was not ready after {cold_start} s (exit {server.poll()}):\n{_tail(log)}")
        _log(f"serve ready after {cold_start} s (cold start: load + warm-up); decode {health.get('decode')}")
        assert health["decode"] == EXPECTED_DECODE

        with httpx.Client(timeout=120.0) as client:
            # the server's own /tokenize agrees with the counts the boundaries were built from
            mismatched = []
            for name, body, _ in requests:
                if name.startswith("fills_cache"):
                    ids = client.post(f"{url}/tokenize", json={"text": policy.prompt(body["prompt"]),
                                                               "truncation": False}).json()["tokens"]
                    if len(ids) + body["max_new_tokens"] != int(name.rsplit("_", 1)[1]):
                        mismatched.append((name, len(ids), body["max_new_tokens"]))
            result.data["boundary_count_mismatches"] = mismatched
            _log(f"burst of {len(requests)} concurrent requests")
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                answers = list(pool.map(lambda r: _post(client, url, *r), requests))
            result.data["burst_wall_s"] = round(time.monotonic() - t0, 2)
        result.data["requests"] = answers
        result.save()
        for a in answers:
            _log(f"  {a['name']}: {a['status']} in {a['latency_s']} s")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60 if health is not None else 30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        sink.close()
        result.keep_log(log)

    serve_record = _record(run, "serve")
    result.data["stages"]["serve"] = {"status": serve_record["status"], "duration_s": serve_record.get("duration_s"),
                                      **{k: serve_record["details"].get(k) for k in ("load_s", "warmup_s", "decode",
                                                                                     "requests")}}
    result.data["total_s"] = round(time.monotonic() - t_start, 1)
    result.save()
    _log(f"done in {result.data['total_s']} s")
    assert not [a for a in answers if a["status"] is None or a["status"] >= 500], answers
    wrong = [a for a in answers if a["status"] != a["expected"]]
    assert not wrong, wrong
    assert serve_record["status"] == "complete" and serve_record["outcome"] == "stopped"
    assert serve_record["details"]["decode"] == EXPECTED_DECODE
    assert not mismatched, f"the server counts these boundary prompts differently: {mismatched}"
    for a in answers:
        if a["status"] == 200:
            assert 0 <= a["tokens"] <= a["max_new_tokens"], a
