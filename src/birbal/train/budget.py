"""The wall-clock budget of training, kept across restarts in an append-only ledger.

Counting rule (stated in docs and the report): each session counts from just before its first training step to
its last recorded event; the sessions are summed. Model loading before the first step and the gap between a crash
and the restart are not training and are not counted; the work a crash throws away (from the last checkpoint to
the last heartbeat) is counted, and reported as `time_lost_to_crashes_s`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Session:
    number: int
    start: float
    start_step: int
    last_time: float
    last_step: int
    last_checkpoint_time: float | None = None
    ended: str | None = None  # None when the process died without saying goodbye
    last_plan: dict | None = None  # the plan the session's last step started under (`end_session`)


@dataclass
class BudgetLedger:
    path: Path
    budget_s: float
    sessions: list[Session] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, budget_hours: float) -> BudgetLedger:
        ledger = cls(path=path, budget_s=budget_hours * 3600.0)
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash; the events before it still count
                ledger._replay(event)
        return ledger

    def _replay(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "session_start":
            self.sessions.append(Session(event["session"], event["time"], event["step"], event["time"],
                                         event["step"]))
            return
        if not self.sessions:
            return
        current = self.sessions[-1]
        current.last_time = max(current.last_time, event.get("time", current.last_time))
        current.last_step = event.get("step", current.last_step)
        if kind == "checkpoint":
            current.last_checkpoint_time = event["time"]
        elif kind == "session_end":
            current.ended = event.get("reason", "ended")
            current.last_plan = event.get("last_plan")

    def _append(self, event: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._replay(event)

    def start_session(self, step: int) -> None:
        self._append({"event": "session_start", "session": len(self.sessions) + 1, "step": step,
                      "time": time.time(), "budget_s": self.budget_s, "used_before_s": round(self.used_s(), 3)})

    def heartbeat(self, step: int, **fields) -> None:
        self._append({"event": "heartbeat", "step": step, "time": time.time(), **fields})

    def checkpoint(self, step: int) -> None:
        self._append({"event": "checkpoint", "step": step, "time": time.time()})

    def end_session(self, step: int, reason: str, plan: dict | None = None) -> None:
        """`plan`: what the session's last step was started under ({"step", "planned_s", "left_s", "at"}): the
        record keeps it with `took_s`, the time from that decision to this end, so a run that ends past its budget
        says which step's plan a stall outran and by how much (`summary`'s `budget_overrun_s`)."""
        now = time.time()
        event = {"event": "session_end", "step": step, "time": now, "reason": reason,
                 "used_s": round(self.used_s(now), 3)}
        if plan is not None:
            event["last_plan"] = {"step": plan["step"], "planned_s": round(plan["planned_s"], 3),
                                  "left_s": round(plan["left_s"], 3), "took_s": round(now - plan["at"], 3)}
        self._append(event)

    def used_s(self, now: float | None = None) -> float:
        total = 0.0
        for i, session in enumerate(self.sessions):
            live = i == len(self.sessions) - 1 and session.ended is None and now is not None
            total += (now if live else session.last_time) - session.start
        return total

    def left_s(self, now: float | None = None) -> float:
        return self.budget_s - self.used_s(now if now is not None else time.time())

    def time_lost_to_crashes_s(self) -> float:
        lost = 0.0
        for session in self.sessions[:-1]:
            if session.ended is None:
                since = session.last_checkpoint_time or session.start
                lost += session.last_time - since
        return lost

    def summary(self) -> dict:
        """`budget_overrun_s` is what the sessions used past the budget (0 when within it); `last_plan` is the plan
        the last session's last step started under, with what it took: an overrun is a stall that outran that
        plan's margin (a step, eval or save far slower than the ones before it), never a step started without a
        fitting plan, and the record says which."""
        used = self.used_s()
        return {"budget_s": self.budget_s, "used_s": round(used, 3), "sessions": len(self.sessions),
                "crashed_sessions": sum(1 for s in self.sessions[:-1] if s.ended is None),
                "time_lost_to_crashes_s": round(self.time_lost_to_crashes_s(), 3),
                "budget_overrun_s": round(max(0.0, used - self.budget_s), 3),
                "last_plan": self.sessions[-1].last_plan if self.sessions else None}


def describe_plan(plan: dict) -> str:
    """A `last_plan` (`BudgetLedger.end_session`) in words, as the stage's last line, verify and the report name the
    plan an overrun outran."""
    return (f"step {plan['step']} was started with {plan['left_s']} s left and {plan['planned_s']} s planned, and "
            f"took {plan['took_s']} s")


def spike_held(previous: float | None, latest: float) -> float:
    """The estimate of a step's, an eval's or a save's time that the budget plans with: a slower one is taken at
    once, a faster one only slowly (0.8 of the old estimate kept), so a spike in what else the machine runs is not
    forgotten by the next prediction. Steps were planned so already; evals and saves used their last time alone
    when a run under CI load ended 1.3 s past its 20 s budget (tests/test_train_budget.py)."""
    return latest if previous is None else max(latest, 0.8 * previous + 0.2 * latest)


def predicted_next_s(next_step: int, *, step_s: float, eval_s: float, save_s: float, eval_steps: int,
                     eval_at_end: bool, budget_s: float) -> float:
    """Seconds the next step needs before the budget may run out: the step, its eval when one is due at
    `next_step`, what ending after it costs (the last checkpoint, and a final eval only with `eval_at_end`: HF
    Trainer 4.35 evaluated only at multiples of eval_steps, so birbal-4090 reserves none), and a margin for the
    estimates' error: 1% of the budget, at most 5 minutes, and never less than one more step (a step's time
    varies with its bins and with what else the machine runs)."""
    due = eval_s if next_step % eval_steps == 0 else 0.0
    final_eval = eval_s if eval_at_end and not due else 0.0
    margin = max(min(0.01 * budget_s, 300.0), step_s)
    return step_s + due + final_eval + save_s + margin

