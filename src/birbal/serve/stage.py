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
import time
from pathlib import Path

from birbal.config import Recipe
from birbal.errors import RunDirError, ServeError
from birbal.fsutil import sha256_file
from birbal.rundir import RunDir, published_digest
from birbal.serve.app import create_app
from birbal.serve.engine import Engine

log = logging.getLogger("birbal.serve")

MERGED_FOLDER = "merged"
ADAPTER_FOLDER = "adapter"


def engine_factory(recipe: Recipe, run_dir: RunDir, cache_dir: Path, hub_cache: Path | None = None):
    """(a function that loads the engine, the inputs it reads) for `recipe.serve`; the random base is materialised
    under `cache_dir`, hub downloads go to huggingface_hub's cache (`hub_cache`, default HF_HOME's)."""
    cfg = recipe.serve
    if cfg.published_adapter is not None:
        return _published_factory(recipe, cache_dir, hub_cache)
    if cfg.model == "merged":
        if cfg.quantize != "none":
            raise ServeError("serve.quantize: 4bit needs serve.model: adapter (the merged weights are served as is)")
        folder = run_dir.stage_dir("export") / MERGED_FOLDER
        if not (folder / "config.json").is_file():
            raise ServeError(f"{folder} holds no merged model: run the export stage first "
                             "(or set serve.model=adapter to serve the base plus the trained adapter)")
        return (lambda: Engine.from_merged(folder, cfg)), {"model": str(folder), "upstream": _digest(run_dir, "merged")}

    from birbal.models import base_model_location, load_tokenizer

    # The export's copy of the adapter: checked against the recipe's LoRA and hashed in export/SHA256SUMS.
    adapter = run_dir.stage_dir("export") / ADAPTER_FOLDER
    if not (adapter / "adapter_config.json").is_file():
        raise ServeError(f"{adapter} holds no adapter: run the export stage first (it checks the trained adapter "
                         "against the recipe and copies it there)")
    _check_against_record(run_dir, "export", adapter, ADAPTER_FOLDER)
    base, revision = base_model_location(recipe.model, cache_dir)
    quantization = recipe.quantization if cfg.quantize == "4bit" else None

    def load() -> Engine:
        tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir)
        return Engine.from_adapter(base, adapter, tokenizer, cfg, revision=revision, quantization=quantization)

    return load, {"model": f"{base}@{revision}" if revision else base, "adapter": str(adapter),
                  "upstream": _digest(run_dir, "adapter")}


def _published_factory(recipe: Recipe, cache_dir: Path, hub_cache: Path | None):
    """The submission: `model.*` (the base, pinned) plus `serve.published_adapter` from the hub, unmerged."""
    from birbal.models import base_model_location, load_tokenizer
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
        tokenizer = load_tokenizer(recipe.model.tokenizer, cache_dir)
        return Engine.from_adapter(base, folder, tokenizer, cfg, revision=revision, quantization=quantization,
                                   source=f"{base}@{revision} + {where}" if revision else f"{base} + {where}",
                                   allow_pickle_adapter=True)

    return load, {"model": f"{base}@{revision}" if revision else base, "adapter": where,
                  "adapter_files": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()},
                  "upstream": published_digest(recipe)}


def _check_against_record(run_dir: RunDir, stage: str, folder: Path, prefix: str) -> None:
    """Every file of `folder` must have the bytes `stage`'s complete record lists under `prefix/` (an adapter is
    small enough to hash at every start). Without a complete record there is nothing to check against."""
    record = run_dir.record(stage)
    if record is None or record.status != "complete":
        return
    listed = {name.split("/", 1)[1]: digest for name, digest in record.outputs.items()
              if name.startswith(f"{prefix}/")}
    present = {p.name for p in folder.iterdir() if p.is_file()}
    for name in sorted(present | set(listed)):
        if name not in present:
            reason = "missing"
        elif name not in listed:
            reason = "not in the record"
        elif sha256_file(folder / name) != listed[name]:
            reason = "sha256 differs"
        else:
            continue
        raise ServeError(f"{folder / name} is not the file the {stage} stage recorded ({reason}); "
                         f"re-run the {stage} stage")


def use_compile_cache(cache_dir: Path) -> str:
    """Where torch.compile keeps the kernels it builds for the decode step: `TORCHINDUCTOR_CACHE_DIR` when set,
    else `<cache_dir>/inductor`, set for this process.

    Inductor's default is under /tmp, which a container loses when it exits, so every start of the server would
    compile each cache length's step again (minutes on a 7B model). Kept with the run, a restart reuses the
    generated kernels; Dynamo still traces, which is the smaller part.
    """
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))


def _digest(run_dir: RunDir, serve_model: str) -> str:
    """The served model's digest, after re-hashing the files its stage recorded: the server reports it in /health
    and evaluate checks it. Files not recorded by a complete stage are not served."""
    try:
        return run_dir.model_digest(serve_model)[0]
    except RunDirError as err:
        stage = "export"
        raise ServeError(f"{err}" if "not complete" not in str(err) else
                         f"the {stage} stage is not complete in {run_dir.path}: run the {stage} stage first") from None


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
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror} (another server, perhaps another run's, "
                         f"holds it: stop it, or pass a free --port)") from None
    sock.set_inheritable(True)
    return sock


def serve_stage(recipe: Recipe, run_dir: RunDir, host: str | None = None, port: int | None = None,
                cache_dir: Path | None = None) -> None:
    """Serve `run_dir`'s exported model on host:port (default `serve.host`/`serve.port`; port 0: any free one).

    Blocks until SIGTERM/SIGINT; then records the stage complete. Raises ServeError when the model cannot load.
    """
    import uvicorn

    cfg = recipe.serve
    host = cfg.host if host is None else host
    port = cfg.port if port is None else port
    cache_dir = cache_dir or run_dir.path / "cache"
    t0 = time.perf_counter()
    factory, sources = engine_factory(recipe, run_dir, cache_dir)  # re-hashes what the records say it serves
    verify_s = round(time.perf_counter() - t0, 2)
    compile_cache = use_compile_cache(cache_dir)
    record = run_dir.begin("serve", {"serve": recipe.section_digest("serve"), **sources})
    try:
        sock = _bind(host, port)
    except ServeError as err:  # another server holds the port: say so, and leave the failure on record
        run_dir.fail(record, str(err))
        raise
    bound_port = sock.getsockname()[1]
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{bound_port}"
    identity = {"run_id": run_dir.run_id, "model_digest": sources["upstream"],
                "model_stage": "published" if cfg.published_adapter is not None else "export"}
    app = create_app(factory, cfg, identity)
    # no access line per request (HELM sends thousands): the counts by path and status go to serve/stage.json
    server = _server_class()(uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=30))
    record.details.update({"url": url, "host": host, "port": bound_port, "postprocess": cfg.postprocess,
                           "compile_cache": compile_cache, "verify_inputs_s": verify_s, **identity})
    run_dir.write_record(record)
    slot = app.state.slot

    def stop_if_load_fails() -> None:
        slot.loaded.wait()
        if slot.error is not None:
            server.should_exit = True

    threading.Thread(target=stop_if_load_fails, name="birbal-load-watch", daemon=True).start()
    log.info("serving %s on %s (health: %s/health)", sources["model"], url, url)
    try:
        server.run(sockets=[sock])
    except BaseException as err:
        run_dir.fail(record, f"{type(err).__name__}: {err}")
        raise
    finally:
        sock.close()
    if slot.error is not None:
        run_dir.fail(record, f"model failed to load: {slot.error}")
        raise ServeError(f"the model failed to load: {slot.error}")
    engine = slot.engine
    details = {"requests": dict(sorted(app.state.request_counts.items())), "url": url,
               "cancelled_for_gone_clients": dict(app.state.cancelled),
               "stopped_by": server.stop_signal}
    if engine is not None:
        details.update({"load_s": engine.load_s, "warmup_s": engine.warmup_s, "decode": engine.decode_mode,
                        "warmup_compiled_graphs": engine.warmup_compiled_graphs,
                        "generation_requests": engine.stats.requests,
                        "prompt_tokens": engine.stats.prompt_tokens,
                        "generated_tokens": engine.stats.generated_tokens,
                        "busy_s": round(engine.stats.busy_s, 3)})
    run_dir.finish(record, outputs={}, details=details, outcome="stopped")
