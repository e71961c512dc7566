"""Where a server's start goes: each phase from the process's creation to the first /health 200, timed.

`PHASES` is this process's clock. Every time in it is seconds since the kernel created the process (read from
/proc, so the interpreter's own start and the imports before `main` are counted too); where /proc is missing the
zero is this module's import instead, and `process_clock` says so. The serve stage logs the breakdown when the
server is ready and writes it to `serve/stage.json` (`details.startup`), where benchmarks/serve_latency.py reads it.

Names (a span: `at_s` when it began, `s` how long it took; a mark: `at_s` alone):
- `main`: `birbal.cli.main` entered (everything before it: the interpreter, `runpy`, `birbal.cli`'s imports);
- `serve_stage`: the serve stage entered (the recipe read and validated, the run dir opened);
- `plan`: the records checked and the inputs located (no hashing);
- `verify`: the re-hash of every file the records list, on its own threads beside everything below;
- `imports.server`: fastapi, uvicorn and the app (torch comes with the engine);
- `bind`, `uvicorn`: the port bound; uvicorn's loop up and the app's lifespan started;
- `load.device`, `load.tokenizer`, `load.imports`, `load.weights`, `load.adapter`, `load.engine`: on the loading
  thread, the device chosen (CUDA's start), the tokenizer, transformers/peft imported, the base or merged weights
  read onto the device, the adapter applied, the engine built (decoders, caches);
- `warm_up`: the engine's warm-up (graph captures, compiles or their cache);
- `verify_wait`: how long the ready model waited for `verify` to finish (0 when the hash ended first);
- `ready`: /health answers 200 from here on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("birbal.serve")


def process_age_s() -> float | None:
    """Seconds since the kernel created this process (Linux: /proc/self/stat's starttime against /proc/uptime, to
    the clock tick, 10 ms); None where /proc is not there."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22 of proc(5): starttime
    except (OSError, ValueError, IndexError):
        return None


class StartupPhases:
    """Named spans and marks on one clock whose zero is the process's creation. Thread-safe."""

    def __init__(self) -> None:
        age = process_age_s()
        self.process_clock = age is not None
        self._zero = time.perf_counter() - (age or 0.0)
        self._lock = threading.Lock()
        self._spans: dict[str, tuple[float, float | None]] = {}

    def now(self) -> float:
        return time.perf_counter() - self._zero

    def record(self, name: str, start: float, end: float | None) -> None:
        with self._lock:
            self._spans[name] = (start, end)

    def mark(self, name: str) -> float:
        at = self.now()
        self.record(name, at, None)
        return at

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.record(name, start, self.now())

    def get(self, name: str) -> dict[str, float] | None:
        with self._lock:
            item = self._spans.get(name)
        return None if item is None else self._entry(*item)

    @staticmethod
    def _entry(start: float, end: float | None) -> dict[str, float]:
        return {"at_s": round(start, 3)} if end is None else {"at_s": round(start, 3), "s": round(end - start, 3)}

    def as_dict(self) -> dict:
        """{"process_clock": bool, "phases": {name: {at_s[, s]}}} in the order they began."""
        with self._lock:
            items = sorted(self._spans.items(), key=lambda kv: kv[1][0])
        return {"process_clock": self.process_clock, "phases": {k: self._entry(*v) for k, v in items}}

    def summary(self) -> str:
        """One line for the log: each phase as name at_s(+s)."""
        parts = []
        for name, entry in self.as_dict()["phases"].items():
            parts.append(f"{name} {entry['at_s']:.2f}" + (f"+{entry['s']:.2f}" if "s" in entry else ""))
        return "start-up (s since the process began, +duration): " + ", ".join(parts)


PHASES = StartupPhases()


class BackgroundCheck:
    """`check` (a callable that raises on a problem) run at once on its own thread, timed as `name` in `PHASES`.

    `wait()` blocks until it has ended and re-raises its error. `when_failed(fn)` calls `fn(error)` as soon as it
    fails (at once if it has failed already): the serve stage stops a server whose files do not hash to their
    record while the model is still loading, instead of after."""

    def __init__(self, check: Callable[[], None], name: str = "verify", phases: StartupPhases = PHASES):
        self.name = name
        self.error: BaseException | None = None
        self._phases = phases
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[BaseException], None]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(check,), name=f"birbal-{name}", daemon=True)
        self._thread.start()

    def _run(self, check: Callable[[], None]) -> None:
        try:
            with self._phases.span(self.name):
                check()
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits, and to the callbacks
            with self._lock:
                self.error = err
                callbacks = list(self._callbacks)
            for callback in callbacks:
                callback(err)
        finally:
            self._done.set()

    def when_failed(self, callback: Callable[[BaseException], None]) -> None:
        with self._lock:
            error = self.error
            if error is None:
                self._callbacks.append(callback)
        if error is not None:
            callback(error)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        with self._phases.span(f"{self.name}_wait"):
            self._done.wait()
        if self.error is not None:
            raise self.error
