"""The serve container's lifecycle in `invoke reproduce --runtime docker` (issue 13 item 5): its log outlives it,
the health wait ends as soon as it exits and prints that log, and cleanup never hides the real error.

No Docker engine exists here, so the engine is faked at the subprocess boundary only: a fake `run` that answers
the real command strings birbal.containers writes, as the docker CLI answers them (texts taken from its output).
"""

from __future__ import annotations

import subprocess

import pytest

from birbal import containers as c

NAME = "birbal-serve-r1"
CRASH_LOG = "[birbal] serve: loading /runs/r1/export/merged\nbirbal: error: CUDA out of memory\n"


class FakeEngine:
    """Answers `docker run/container inspect/logs/stop/rm` for one container, recording every command."""

    def __init__(self, states):
        self.states = list(states)  # what successive `inspect` calls see: "running 0", "exited 8", or None
        self.exists = False
        self.commands: list[list[str]] = []

    def __call__(self, command, **kwargs):
        assert kwargs.get("check") is False and kwargs.get("capture_output") is True
        self.commands.append(command)
        verb = command[1] if command[1] != "container" else command[2]

        def done(code=0, out="", err=""):
            return subprocess.CompletedProcess(command, code, out, err)

        missing = done(1, "", f"Error response from daemon: No such container: {NAME}\n")
        if verb == "run":
            self.exists = True
            return done(0, "3f1c0ffee\n")
        if not self.exists:
            return missing if verb != "inspect" else done(1, "", f"Error: No such object: {NAME}\n")
        if verb == "inspect":
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return done(0, state + "\n")
        if verb == "logs":
            return done(0, CRASH_LOG)
        if verb == "stop":
            self.states = ["exited 0"]
            return done(0, NAME + "\n")
        if verb == "rm":
            self.exists = False
            return done(0, NAME + "\n")
        raise AssertionError(command)


def never_healthy(url):
    raise ConnectionError(f"{url}: connection refused")


def serve_argv():
    return c.reproduce_stage_command("serve", profile="smoke", run_dir="/srv/runs/r1", hub_cache="/hf", user="5:5",
                                     version="0.1.0", revision=None)


def test_the_wait_ends_when_the_container_exits_and_prints_its_log(tmp_path):
    engine = FakeEngine(["running 0", "running 0", "exited 8"])
    server = c.ServeContainer("r1", tmp_path / "serve-container.log", run=engine, echo=lambda _: None)
    server.start(serve_argv())
    clock = iter(range(1000))
    with pytest.raises(c.ServeContainerError) as err:
        server.wait_healthy("http://127.0.0.1:8080", 600, never_healthy, clock=lambda: next(clock),
                            sleep=lambda _: None)
    message = str(err.value)
    assert f"{NAME} exited (8) before http://127.0.0.1:8080 became healthy" in message
    assert "CUDA out of memory" in message  # the container's own log says why
    assert len([cmd for cmd in engine.commands if cmd[:3] == ["docker", "container", "inspect"]]) == 3  # not 600 s
    # Cleanup: no `docker stop` of an exited container, the whole log kept, the container removed, nothing raised.
    assert server.close() == []
    assert ["docker", "stop", "--time", "30", NAME] not in engine.commands
    assert engine.commands[-1] == ["docker", "rm", "--force", NAME] and not engine.exists
    assert (tmp_path / "serve-container.log").read_text() == CRASH_LOG


def test_a_leftover_container_is_removed_first_and_the_server_is_not_rm(tmp_path):
    engine = FakeEngine(["running 0"])
    server = c.ServeContainer("r1", tmp_path / "log", run=engine, echo=lambda _: None)
    server.start(serve_argv())
    assert engine.commands[0] == ["docker", "rm", "--force", NAME]
    assert engine.commands[1][:2] == ["docker", "run"] and "--rm" not in engine.commands[1]


def test_a_healthy_server_is_stopped_then_its_log_kept_then_removed(tmp_path):
    engine = FakeEngine(["running 0"])
    server = c.ServeContainer("r1", tmp_path / "log", run=engine, echo=lambda _: None)
    server.start(serve_argv())
    server.wait_healthy("http://127.0.0.1:8080", 600, lambda url: None)
    assert server.close() == []
    tail = engine.commands[-3:]
    assert tail == [["docker", "stop", "--time", "30", NAME], ["docker", "logs", NAME], ["docker", "rm", "--force", NAME]]


def test_timeout_reports_the_last_probe_and_the_log(tmp_path):
    engine = FakeEngine(["running 0"])
    server = c.ServeContainer("r1", tmp_path / "log", run=engine, echo=lambda _: None)
    server.start(serve_argv())
    clock = iter([0, 5, 10, 700])
    with pytest.raises(c.ServeContainerError, match=r"not healthy within 600 s \(http://127.0.0.1:8080: connection "
                                                    r"refused\); its log ends:\n\[birbal\] serve: loading"):
        server.wait_healthy("http://127.0.0.1:8080", 600, never_healthy, clock=lambda: next(clock),
                            sleep=lambda _: None)


def test_cleanup_failures_are_printed_never_raised(tmp_path):
    printed = []
    engine = FakeEngine(["running 0"])
    server = c.ServeContainer("r1", tmp_path / "log", run=engine, echo=printed.append)
    server.start(serve_argv())

    def flaky(command, **kwargs):
        if command[1] == "stop":
            return subprocess.CompletedProcess(command, 1, "", "Error response from daemon: cannot stop container: "
                                                              f"{NAME}: permission denied\n")
        return engine(command, **kwargs)

    server._run = flaky
    problems = server.close()
    assert problems == [f"docker stop: Error response from daemon: cannot stop container: {NAME}: permission denied"]
    assert printed == [f"warning: server container cleanup: {problems[0]}"]
    # A container that is already gone: nothing to do, nothing printed ("No such container" hid errors before).
    assert c.ServeContainer("r1", tmp_path / "log", run=FakeEngine([None]), echo=printed.append).close() == []
