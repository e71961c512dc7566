"""The serve stage's start-up: the re-hash of the served files beside the load (a file whose bytes differ from
the export record is refused, whichever ends first, and /health never answers 200 for it), the phase breakdown,
the adapter loaded without a throw-away initialisation, and the hashing itself."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import httpx
import pytest
import torch
from serve_model import exported_run_dir, merged_folder, smoke

from birbal.errors import ServeError
from birbal.fsutil import sha256_file
from birbal.serve.startup import PHASES, BackgroundCheck, StartupPhases, process_age_s


def _flip_a_byte(path, offset_from_end: int = 16) -> None:
    """Change one byte of `path` in place (its size unchanged, so only the hash can tell)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _poll_health(run_dir, stop: threading.Event, seen: list[int]) -> None:
    url = None
    while not stop.is_set():
        if url is None:
            record = run_dir.latest("serve")
            url = record.details.get("url") if record is not None else None
        else:
            try:
                seen.append(httpx.get(f"{url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                pass
            if seen and seen[-1] == 200:  # served: the check did not hold it back; stop it, so the test fails
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler ends serve_stage gracefully
                return
        time.sleep(0.02)


@pytest.mark.parametrize("first", ["hash", "load"])
def test_changed_weights_are_refused_and_never_served(tmp_path, monkeypatch, first):
    """One byte of export/merged/model.safetensors changed after the export recorded it: the model still loads
    (the byte is in the weights, not the header), so only the re-hash can refuse it. `first`: which of the two
    ends first, the hash (it stops the server while the model loads) or the load (the warmed-up model waits for
    the hash at the gate, then is refused)."""
    from birbal.serve import stage

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run_dir = exported_run_dir(tmp_path / "run")
    _flip_a_byte(run_dir.stage_dir("export") / "merged" / "model.safetensors")
    started = PHASES.now()  # PHASES is this process's: earlier tests' phases are older than this
    if first == "load":
        def slow_sha256(path):  # the hash of the big file ends only after the model is warmed up
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                warm = PHASES.get("warm_up")
                if warm is not None and warm["at_s"] >= started and "s" in warm:
                    break
                time.sleep(0.02)
            return sha256_file(path)

        monkeypatch.setattr(stage, "sha256_file", slow_sha256)
    stop, seen = threading.Event(), []
    poller = threading.Thread(target=_poll_health, args=(run_dir, stop, seen), daemon=True)
    poller.start()
    try:
        with pytest.raises(ServeError, match=r"the model was refused: .*merged/model\.safetensors is not the file "
                                             r"the export stage recorded \(sha256 differs\)"):
            stage.serve_stage(smoke(), run_dir, host="127.0.0.1", port=0)
    finally:
        stop.set()
        poller.join(timeout=5)
    assert 200 not in seen
    attempt = run_dir.attempt("serve")
    assert attempt.status == "failed" and "sha256 differs" in attempt.error and run_dir.record("serve") is None
    phases = attempt.details["startup"]["phases"]
    assert "ready" not in phases or phases["ready"]["at_s"] < started
    assert phases["verify"]["at_s"] >= started
    if first == "load":  # the loaded, warmed-up model waited for the hash at the gate, and was refused by it
        warm, verify = phases["warm_up"], phases["verify"]
        slack = 2e-3  # each phase's start and length are rounded to the millisecond: two roundings a side
        assert phases["verify_wait"]["at_s"] >= warm["at_s"] + warm["s"] - slack
        assert verify["at_s"] + verify["s"] >= warm["at_s"] + warm["s"] - slack


def test_the_unchanged_export_is_served_after_the_hash(tmp_path, monkeypatch):
    """The same path with the bytes as recorded: served, and the record says the hash ran and was waited for."""
    from birbal.serve import stage
    from birbal.serve.app import EngineSlot

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run_dir = exported_run_dir(tmp_path / "run")
    plan = stage.plan_engine(smoke(), run_dir, tmp_path / "cache")
    check = BackgroundCheck(plan.check, "verify_test")
    slot = EngineSlot(plan.load, smoke().serve, gate=check)
    slot.start_loading()
    assert slot.loaded.wait(120) and slot.error is None and slot.engine is not None and check.done()


def test_an_unrecorded_file_in_the_served_folder_fails_at_once(tmp_path):
    from birbal.serve.stage import plan_engine

    run_dir = exported_run_dir(tmp_path / "run")
    (run_dir.stage_dir("export") / "merged" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ServeError, match=r"model\.safetensors\.index\.json is not the file the export stage "
                                         r"recorded \(not in the record\)"):
        plan_engine(smoke(), run_dir, tmp_path / "cache")


@pytest.mark.parametrize("adapter_dtype", ["base", "float32"])
def test_the_adapter_loads_the_same_weights_as_peft_ordinary_path(adapter_dtype):
    """`low_cpu_mem_usage` (no throw-away LoRA initialisation, for adapter_dtype base; float32 keeps peft's
    ordinary path, where the two differ: it rounds the file's fp32 values through bf16 first): every parameter of
    the served model, by name, in the same dtype, on the same device, with the same values as peft's ordinary
    load of the same files, and the same logits."""
    from peft import PeftModel
    from test_serve_upstream import adapter_folder
    from transformers import AutoModelForCausalLM

    from birbal.serve.loading import load_base_with_adapter

    ours = load_base_with_adapter(str(merged_folder()), adapter_folder(), "bfloat16", torch.device("cpu"),
                                  adapter_dtype=adapter_dtype)
    base = AutoModelForCausalLM.from_pretrained(merged_folder(), dtype=torch.bfloat16)
    theirs = PeftModel.from_pretrained(base, str(adapter_folder()), is_trainable=False,
                                       autocast_adapter_dtype=adapter_dtype == "float32", low_cpu_mem_usage=False)
    mine, reference = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == reference.keys() and any("lora_A" in name for name in mine)
    for name, value in reference.items():
        got = mine[name]
        assert (got.dtype, got.device) == (value.dtype, value.device), name
        assert torch.equal(got, value), name
    ids = torch.tensor([[1, 415, 5565, 302]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs.eval()(ids).logits)


def test_sha256_file_large_and_small_equal_hashlib(tmp_path):
    from birbal import fsutil

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * ((fsutil._MAPPED // 256) + 3))  # past the mapped threshold
    small = tmp_path / "small.bin"
    small.write_bytes(b"birbal")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    for path in (big, small, empty):
        assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_background_check_reports_its_failure_to_late_and_early_listeners():
    phases = StartupPhases()
    gate = threading.Event()
    early, late = [], []

    def failing():
        gate.wait(5)
        raise ServeError("bytes differ")

    check = BackgroundCheck(failing, "verify", phases=phases)
    check.when_failed(early.append)
    assert not check.done() and early == []
    gate.set()
    with pytest.raises(ServeError, match="bytes differ"):
        check.wait()
    check.when_failed(late.append)
    assert [str(e) for e in early] == [str(e) for e in late] == ["bytes differ"]
    recorded = phases.as_dict()["phases"]
    assert recorded["verify"]["s"] >= 0 and "verify_wait" in recorded


def test_the_clock_starts_at_the_process_creation():
    age = process_age_s()
    if age is None:
        pytest.skip("no /proc here")
    assert 0 < age < time.time()  # pytest has been running a while
    phases = StartupPhases()
    assert phases.process_clock and phases.now() >= age
