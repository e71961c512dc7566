"""The serve stage: load the run's exported model, serve the challenge API until told to stop, record it.

`serve/stage.attempt.json` says `running` (with the URL, pid, run id and model digest) while the server is up;
`serve/stage.json` is written `complete` with outcome `stopped` and the request counts after a graceful
SIGTERM/SIGINT (uvicorn finishes the requests in flight). A port that cannot be bound, or a model that fails to
load, stops the stage and leaves the attempt `failed` with the reason.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from birbal.config import Recipe
from birbal.errors import ServeError
from birbal.fsutil import digest_of, sha256_file
from birbal.rundir import RECORD, RunDir, published_digest
from birbal.serve.startup import PHASES, BackgroundCheck

if TYPE_CHECKING:
    from birbal.serve.engine import Engine

# This module imports neither torch nor fastapi at the top: the re-hash of the served files starts before those
# imports (seconds each), on threads of its own (`BackgroundCheck`), and runs beside them and the model's load.

log = logging.getLogger("birbal.serve")

MERGED_FOLDER = "merged"
ADAPTER_FOLDER = "adapter"


@dataclass
class EnginePlan:
    """What the serve stage will load, found and checked against the records without hashing anything yet:
    `load()` builds the engine, `sources` is what the serve record names (`upstream`: the served model's digest,
    as the export record gives it), `check()` re-hashes every file that digest covers and raises ServeError
    naming the first one whose bytes are not the record's."""

    load: Callable[[], Engine]
    sources: dict[str, Any]
    check: Callable[[], None]


def engine_factory(recipe: Recipe, run_dir: RunDir, cache_dir: Path, hub_cache: Path | None = None):
    """(a function that loads the engine, the inputs it reads) for `recipe.serve`, after re-hashing what the
    records say it serves (`plan_engine`, then its check, here and now); the serve stage instead runs the check
    beside the load and withholds /health's 200 until it has passed."""
    plan = plan_engine(recipe, run_dir, cache_dir, hub_cache)
    plan.check()
    return plan.load, plan.sources


def plan_engine(recipe: Recipe, run_dir: RunDir, cache_dir: Path, hub_cache: Path | None = None) -> EnginePlan:
    """The plan for `recipe.serve`: the random base is materialised under `cache_dir`, hub downloads go to
    huggingface_hub's cache (`hub_cache`, default HF_HOME's). Everything but the hashing is checked here: a
    missing export, a record that is not complete or not consistent, a file missing or not in the record."""
    cfg = recipe.serve
    if cfg.published_adapter is not None:
        return _published_plan(recipe, cache_dir, hub_cache)
    if cfg.model == "merged":
        if cfg.quantize != "none":
            raise ServeError("serve.quantize: 4bit needs serve.model: adapter (the merged weights are served as is)")
        folder = run_dir.stage_dir("export") / MERGED_FOLDER
        if not (folder / "config.json").is_file():
            raise ServeError(f"{folder} holds no merged model: run the export stage first "
                             "(or set serve.model=adapter to serve the base plus the trained adapter)")
        record = _complete_record(run_dir)
        _check_listing(run_dir, record, folder, MERGED_FOLDER)

        def load_merged() -> Engine:
            from birbal.serve.engine import Engine

            return Engine.from_merged(folder, cfg)

        # every output of the export (the adapter's copy too): the digest /health reports covers them all
        return EnginePlan(load_merged, {"model": str(folder), "upstream": record.outputs_digest},
                          lambda: _check_bytes(run_dir, record, None))

    # The export's copy of the adapter: checked against the recipe's LoRA and hashed in export/SHA256SUMS.
    adapter = run_dir.stage_dir("export") / ADAPTER_FOLDER
    if not (adapter / "adapter_config.json").is_file():
        raise ServeError(f"{adapter} holds no adapter: run the export stage first (it checks the trained adapter "
                         "against the recipe and copies it there)")
    record = _complete_record(run_dir)
    _check_listing(run_dir, record, adapter, ADAPTER_FOLDER)
    upstream = digest_of({k: v for k, v in record.outputs.items() if k.startswith(f"{ADAPTER_FOLDER}/")})
    from birbal.models import base_model_location  # torch: after the plain checks, so that those fail fast

    base, revision = base_model_location(recipe.model, cache_dir)
    quantization = recipe.quantization if cfg.quantize == "4bit" else None

    def load() -> Engine:
        from birbal.models import load_tokenizer
        from birbal.serve.engine import Engine

        with PHASES.span("load.tokenizer"):
            tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir)
        return Engine.from_adapter(base, adapter, tokenizer, cfg, revision=revision, quantization=quantization)

    return EnginePlan(load, {"model": f"{base}@{revision}" if revision else base, "adapter": str(adapter),
                             "upstream": upstream},
                      lambda: _check_bytes(run_dir, record, f"{ADAPTER_FOLDER}/"))


def _published_plan(recipe: Recipe, cache_dir: Path, hub_cache: Path | None) -> EnginePlan:
    """The submission: `model.*` (the base, pinned) plus `serve.published_adapter` from the hub, unmerged."""
    from birbal.models import base_model_location
    from birbal.serve.loading import fetch_published_adapter

    cfg = recipe.serve
    published = cfg.published_adapter
    assert published is not None
    if cfg.model != "adapter":
        raise ServeError("serve.published_adapter needs serve.model: adapter (the published weights are an adapter)")
    base, revision = base_model_location(recipe.model, cache_dir)
    quantization = recipe.quantization if cfg.quantize == "4bit" else None
    where = f"{published.name_or_path}@{published.revision}"
    # Fetched now, before the server binds: without hub access the stage fails at once, in one line naming it.
    folder = fetch_published_adapter(published.name_or_path, published.revision, hub_cache)

    def load() -> Engine:
        from birbal.models import load_tokenizer
        from birbal.serve.engine import Engine

        with PHASES.span("load.tokenizer"):
            tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir)
        return Engine.from_adapter(base, folder, tokenizer, cfg, revision=revision, quantization=quantization,
                                   source=f"{base}@{revision} + {where}" if revision else f"{base} + {where}",
                                   allow_pickle_adapter=True)

    # a hub commit is immutable and names what is served; the files' hashes are recorded beside it
    return EnginePlan(load, {"model": f"{base}@{revision}" if revision else base, "adapter": where,
                             "adapter_files": {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                                               if p.is_file()},
                             "upstream": published_digest(recipe)}, lambda: None)


def _complete_record(run_dir: RunDir):
    """The export's complete record, consistent with itself; else the one-line error saying what to run."""
    record = run_dir.record("export")
    if record is None or record.status != "complete" or record.outputs_digest is None:
        raise ServeError(f"the export stage is not complete in {run_dir.path}: run the export stage first")
    if record.outputs_digest != digest_of(record.outputs):
        raise ServeError(f"export/{RECORD}: outputs_digest does not match its own outputs list; re-run the export "
                         "stage")
    return record


def _check_listing(run_dir: RunDir, record, folder: Path, prefix: str) -> None:
    """Every file of `folder` (the one the server loads) is one the export record lists under `prefix/`, and every
    file the record lists is present. Cheap (no hashing): done before the server binds, so it fails at once."""
    export = run_dir.stage_dir("export")
    listed = {rel[len(prefix) + 1:] for rel in record.outputs if rel.startswith(f"{prefix}/")}
    present = {p.name for p in folder.iterdir() if p.is_file()}
    for name in sorted(present - listed):
        raise ServeError(f"{folder / name} is not the file the export stage recorded (not in the record); "
                         "re-run the export stage")
    covered = record.outputs if prefix == MERGED_FOLDER else listed  # the merged digest covers every output
    for rel in sorted(covered):
        path = export / rel if prefix == MERGED_FOLDER else folder / rel
        if not path.is_file():
            raise ServeError(f"{path} is not the file the export stage recorded (missing); re-run the export stage")


def _check_bytes(run_dir: RunDir, record, only: str | None) -> None:
    """Re-hash the export outputs the served digest covers (those under `only`, or all), shards in parallel
    threads (`sha256_file` holds no GIL while it hashes); ServeError naming the first whose sha256 differs."""
    from concurrent.futures import ThreadPoolExecutor

    export = run_dir.stage_dir("export")
    items = sorted((rel, digest) for rel, digest in record.outputs.items() if only is None or rel.startswith(only))
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="birbal-verify") as pool:
        try:
            actual = list(pool.map(lambda item: sha256_file(export / item[0]), items))
        except OSError as err:  # removed or unreadable since the listing was checked
            raise ServeError(f"{err.filename or export} could not be read ({err.strerror}); re-run the export "
                             "stage") from None
    for (rel, recorded), digest in zip(items, actual, strict=True):
        if digest != recorded:
            raise ServeError(f"{export / rel} is not the file the export stage recorded (sha256 differs); "
                             "re-run the export stage")


def use_compile_cache(cache_dir: Path) -> str:
    """Where torch.compile keeps the kernels it builds for the decode step: `TORCHINDUCTOR_CACHE_DIR` when set,
    else `<cache_dir>/inductor`, set for this process.

    Inductor's default is under /tmp, which a container loses when it exits, so every start of the server would
    compile each cache length's step again (minutes on a 7B model). Kept with the run, a restart reuses the
    generated kernels; Dynamo still traces, which is the smaller part. Triton's own cache (`TRITON_CACHE_DIR`,
    unless set: the images point TRITON_HOME at /tmp) goes beside it, at Inductor's own place for it
    (`<inductor>/triton`): the kernels launched outside a compiled graph (serve.decode_gemv: triton's eager
    products, lm_head's) are kept too.
    """
    inductor = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(inductor) / "triton"))
    return inductor


def _server_class():
    import uvicorn

    class RecordingServer(uvicorn.Server):
        """uvicorn's server, except that SIGTERM/SIGINT end `run()` normally instead of being re-raised after the
        graceful shutdown (uvicorn >= 0.29 re-raises them, which would kill the process before the record is
        completed)."""

        stop_signal: str | None = None

        def handle_exit(self, sig: int, frame) -> None:
            self.stop_signal = signal.Signals(sig).name
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
            else:
                self.should_exit = True

    return RecordingServer


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening from here, before the record names the url: a client that reads it and connects at once is
        # queued until uvicorn accepts, not refused (bound but not yet listening, the port refuses connections,
        # and on Linux a second server could still bind it with SO_REUSEADDR). uvicorn's own backlog.
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror} (another server, perhaps another run's, "
                         f"holds it: stop it, or pass a free --port)") from None
    sock.set_inheritable(True)
    return sock


def serve_stage(recipe: Recipe, run_dir: RunDir, host: str | None = None, port: int | None = None,
                cache_dir: Path | None = None) -> None:
    """Serve `run_dir`'s exported model on host:port (default `serve.host`/`serve.port`; port 0: any free one).

    Blocks until SIGTERM/SIGINT; then records the stage complete. Raises ServeError when the model cannot load,
    or when a file it serves does not hash to the export record.

    The order of a start: the records are checked (no hashing) and the re-hash of the served files starts on
    threads of its own; then the imports, the bind, and the model's load and warm-up on the loading thread,
    beside the hash. /health answers 200 only once both have ended and the hash matched the record: a file whose
    bytes differ stops the server (at once if the hash ends first) and fails the stage, and nothing is served
    from it. `startup.PHASES` times every step; the breakdown goes to the log and to the record.
    """
    PHASES.mark("serve_stage")
    _log_to_stderr()
    cfg = recipe.serve
    host = cfg.host if host is None else host
    port = cfg.port if port is None else port
    cache_dir = cache_dir or run_dir.path / "cache"
    with PHASES.span("plan"):
        plan = plan_engine(recipe, run_dir, cache_dir)  # the records, the listing: one-line errors, at once
    check = BackgroundCheck(plan.check, "verify")
    sources = plan.sources
    compile_cache = use_compile_cache(cache_dir)
    with PHASES.span("imports.server"):
        import uvicorn

        from birbal.serve.app import create_app
    _start_cuda_early(cfg.device)
    record = run_dir.begin("serve", {"serve": recipe.section_digest("serve"), **sources})
    try:
        with PHASES.span("bind"):
            sock = _bind(host, port)
    except ServeError as err:  # another server holds the port: say so, and leave the failure on record
        run_dir.fail(record, str(err))
        raise
    bound_port = sock.getsockname()[1]
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{bound_port}"
    identity = {"run_id": run_dir.run_id, "model_digest": sources["upstream"],
                "model_stage": "published" if cfg.published_adapter is not None else "export"}
    app = create_app(plan.load, cfg, identity, gate=check)
    slot = app.state.slot
    slot.start_loading()  # now, not when uvicorn's lifespan starts
    # no access line per request (HELM sends thousands): the counts by path and status go to serve/stage.json
    server = _server_class()(uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=30))
    record.details.update({"url": url, "host": host, "port": bound_port, "postprocess": cfg.postprocess,
                           "compile_cache": compile_cache, **identity})
    run_dir.write_record(record)

    def stop_if_load_fails() -> None:
        slot.loaded.wait()
        if slot.error is not None:
            server.should_exit = True

    threading.Thread(target=stop_if_load_fails, name="birbal-load-watch", daemon=True).start()
    log.info("serving %s on %s (health: %s/health)", sources["model"], url, url)
    try:
        server.run(sockets=[sock])
    except BaseException as err:
        record.details["startup"] = startup_details(check)
        run_dir.fail(record, f"{type(err).__name__}: {err}")
        raise
    finally:
        sock.close()
    record.details["startup"] = startup_details(check)
    if slot.error is not None:
        what = "was refused" if slot.refused else "failed to load"
        run_dir.fail(record, f"the model {what}: {slot.error}")
        raise ServeError(f"the model {what}: {slot.error}")
    engine = slot.engine
    details = {"requests": dict(sorted(app.state.request_counts.items())), "url": url,
               "cancelled_for_gone_clients": dict(app.state.cancelled),
               "stopped_by": server.stop_signal, "verify_inputs_s": record.details["startup"]["verify_inputs_s"]}
    if engine is not None:
        details.update({"load_s": engine.load_s, "warmup_s": engine.warmup_s, "decode": engine.decode_mode,
                        "warmup_compiled_graphs": engine.warmup_compiled_graphs,
                        "generation_requests": engine.stats.requests,
                        "prompt_tokens": engine.stats.prompt_tokens,
                        "generated_tokens": engine.stats.generated_tokens,
                        "busy_s": round(engine.stats.busy_s, 3)})
    run_dir.finish(record, outputs={}, details=details, outcome="stopped")


def _start_cuda_early(device: str) -> None:
    """CUDA's start (the driver, the context: a second or more on a large GPU) on a thread of its own, beside the
    loading thread's imports, instead of on it; timed as `device_init`. Any failure is left to the loading thread,
    which names it (`serve.device`)."""
    if device == "cpu":
        return
    import torch

    def start() -> None:
        try:
            with PHASES.span("device_init"):
                if torch.cuda.is_available():
                    torch.zeros(1, device="cuda")  # the allocation makes the context; torch holds no GIL in it
        except Exception:  # noqa: BLE001 - the loading thread meets the same failure and reports it
            pass

    threading.Thread(target=start, name="birbal-cuda-init", daemon=True).start()


def _log_to_stderr() -> None:
    """The server's own lines (serving where, loaded in, the start-up breakdown, a refusal) on stderr beside
    uvicorn's, in its format; unless logging is configured already (an embedding program, pytest)."""
    root = logging.getLogger()
    if root.handlers or log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def startup_details(check: BackgroundCheck) -> dict[str, Any]:
    """The start's breakdown for the record: `PHASES` plus, for continuity with earlier records, `verify_inputs_s`
    (the re-hash's own duration; it ran beside the load, so it is not a part of the time to ready any more)."""
    out = PHASES.as_dict()
    verify = out["phases"].get(check.name, {})
    out["verify_inputs_s"] = verify.get("s")
    out["ready_at_s"] = out["phases"].get("ready", {}).get("at_s")
    return out
