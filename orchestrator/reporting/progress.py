"""A running study as the live view shows it: stages by kind and state, the ETA, the study log's transitions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.stages import KINDS
from orchestrator.storage.studies import STATES, transitions

ACTIVE = ("pending", "running")


@dataclass
class StudyProgress:
    """Folds a submit's events (start, stage, progress) into counts per kind and state and the run times.

    The start event carries counts only (its size does not grow with the study); each stage event names
    its stage's kind and label, so `stages` holds the stages heard of so far (all of them when `load`ed
    from a study's record)."""

    stages: dict[str, dict] = field(default_factory=dict)  # key -> kind, label, state (of the stages known)
    tally: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> state -> how many stages
    run_s: dict[str, list[float]] = field(default_factory=dict)  # kind -> run times of stages executed so far
    started: float = field(default_factory=time.time)

    def start(self, counts: dict[str, dict[str, int]]) -> None:
        """A start event's counts: kind -> state -> n."""
        self.tally = {kind: {s: int(by_state.get(s, 0)) for s in STATES} for kind, by_state in counts.items()}
        self.stages = {}
        self.started = time.time()

    def load(self, stages: dict[str, dict]) -> None:
        """Every stage of a study's record (key -> kind, label, state)."""
        self.stages = {k: dict(v) for k, v in stages.items()}
        self.tally = tally(self.stages.values())

    def stage(self, key: str, state: str, run_s: float | None = None, kind: str | None = None,
              label: str | None = None) -> dict | None:
        st = self.stages.get(key)
        if st is None:
            if kind is None:
                return None
            st = self.stages[key] = {"kind": kind, "label": label or key, "state": "pending"}  # pending at start
        by_state = self.tally.setdefault(st["kind"], dict.fromkeys(STATES, 0))
        if by_state.get(st["state"], 0) > 0:
            by_state[st["state"]] -= 1
        by_state[state] = by_state.get(state, 0) + 1
        st["state"] = state
        if state == "executed" and run_s is not None:
            self.run_s.setdefault(st["kind"], []).append(run_s)
        return st

    def total(self) -> int:
        return sum(sum(v.values()) for v in self.tally.values())

    def finished(self) -> int:
        return sum(n for v in self.tally.values() for s, n in v.items() if s not in ACTIVE)

    def state_counts(self) -> dict[str, int]:
        """`{"total": n, state: n, ...}`, as `studies.count_states` gives."""
        return {"total": self.total(), **{s: sum(v.get(s, 0) for v in self.tally.values()) for s in STATES}}

    def counts(self) -> list[tuple[str, list[int]]]:
        """(kind, count per state in STATES), registered kinds first, for kinds the study has."""
        kinds = [*KINDS, *sorted(set(self.tally) - set(KINDS))]
        return [(kind, [self.tally[kind].get(s, 0) for s in STATES]) for kind in kinds
                if kind in self.tally and sum(self.tally[kind].values())]

    def eta_seconds(self, now: float | None = None) -> tuple[float, bool] | None:
        """Time left and whether kinds not yet timed remain: each kind's remaining stages x its mean run
        time so far, over the concurrency seen so far. None before any stage has run."""
        return eta_seconds(self.tally, self.run_s, self.started, time.time() if now is None else now)


def tally(stages) -> dict[str, dict[str, int]]:
    """kind -> state -> how many of `stages` (dicts with kind and state)."""
    out: dict[str, dict[str, int]] = {}
    for st in stages:
        by_state = out.setdefault(st["kind"], dict.fromkeys(STATES, 0))
        by_state[st["state"]] = by_state.get(st["state"], 0) + 1
    return out


def eta_seconds(tally: dict[str, dict[str, int]], run_s: dict[str, list[float]], started: float,
                now: float) -> tuple[float, bool] | None:
    done = sum(len(v) for v in run_s.values())
    if not done:
        return None
    busy = sum(sum(v) for v in run_s.values())
    concurrency = max(1.0, busy / max(1e-6, now - started))
    active = {kind: sum(by_state.get(s, 0) for s in ACTIVE) for kind, by_state in tally.items()}
    left = sum(active.get(kind, 0) * sum(times) / len(times) for kind, times in run_s.items())
    unknown = any(n and kind not in run_s for kind, n in active.items())
    return left / concurrency, unknown


def study_transitions(record: dict, tail: int) -> list[dict]:
    """The study's latest stage transitions, each with its stage's label (`ddray study status --log`)."""
    return [{**e, "label": record["stages"].get(e["key"], {}).get("label", e["key"])}
            for e in transitions(Path(record["dir"]), record, tail)]
