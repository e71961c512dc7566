"""Shared fixtures: the smoke recipe, its tokenizer, and one complete smoke run (prepare, train, export) made
once per session through the real CLI, which several tests read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' own helper modules

from triton_interpreter import interpret_on_cpu  # noqa: E402

interpret_on_cpu()  # birbal.serve's Triton kernels run through Triton's interpreter here, where there is no GPU


def free_port() -> int:
    """A port nothing listens on now (other test runs and servers share this machine: never assume serve.port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600):
    """`python -m birbal ...` in a subprocess, as a user (and a container) runs it."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                         os.environ.get("PYTHONPATH")])),
                **(env or {})}
    result = subprocess.run([sys.executable, "-m", "birbal", *args], capture_output=True, text=True,
                            env=full_env, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"birbal {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def smoke_recipe():
    from birbal.config import load_recipe

    return load_recipe("smoke")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tokenizer(smoke_recipe, shared_cache):
    from birbal.models import load_tokenizer

    return load_tokenizer(smoke_recipe.model.tokenizer, shared_cache)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The README's `invoke smoke`, run once: every stage through the real CLI, the server started, queried by
    the evaluate stage and stopped, the report written. Also the uninterrupted reference for the resume test.

    Once for the whole session, however many pytest-xdist workers run it: the first worker to need it builds it
    under a file lock in the folder the workers share, the others wait and read it (the tests only read it). Two
    workers each building it took 260 s apiece on the 2-core CI machine, each slowing the other."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base folder sits in the session's one
    run_dir = root / "shared-smoke-run" / "smoke"
    done = run_dir / "invoke-smoke.out"  # written last, once the chain passed
    with FileLock(str(root / "shared-smoke-run.lock")):
        if not done.is_file():
            if run_dir.exists():  # an earlier worker's attempt that failed: not a run to read
                shutil.rmtree(run_dir)
            (run_dir.parent / "hosts-asked.log").unlink(missing_ok=True)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            # tests/netprobe: every stage's name lookups of other hosts are refused and logged (test_smoke_chain)
            env = {**os.environ, "BIRBAL_NET_PROBE_LOG": str(run_dir.parent / "hosts-asked.log"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO / "tests" / "netprobe"),
                                                               os.environ.get("PYTHONPATH")]))}
            result = subprocess.run([sys.executable, "-m", "invoke", "smoke", "--run-dir", str(run_dir), "--port",
                                     str(free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise AssertionError(f"invoke smoke exited {result.returncode}:\n{result.stderr[-4000:]}")
            (run_dir / "invoke-smoke.err").write_text(result.stderr)
            done.write_text(result.stdout)
    return run_dir


def pytest_collection_modifyitems(session, config, items):
    """The container contract tests run last: on a cold machine .ci/run builds their image layers in the background
    while the rest of the suite runs (tests/container_replay.py waits on a layer's lock for its builder)."""
    items.sort(key=lambda item: item.path.name == "test_container_contract.py")
