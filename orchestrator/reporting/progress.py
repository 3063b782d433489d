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
    """Folds a submit's events (start, stage, search) into the stages' states and their run times."""

    stages: dict[str, dict] = field(default_factory=dict)
    run_s: dict[str, list[float]] = field(default_factory=dict)  # kind -> run times of stages executed so far
    started: float = field(default_factory=time.time)

    def start(self, stages: dict[str, dict]) -> None:
        self.stages = {k: dict(v) for k, v in stages.items()}
        self.started = time.time()

    def stage(self, key: str, state: str, run_s: float | None = None) -> dict | None:
        st = self.stages.get(key)
        if st is None:
            return None
        st["state"] = state
        if state == "executed" and run_s is not None:
            self.run_s.setdefault(st["kind"], []).append(run_s)
        return st

    def finished(self) -> int:
        return sum(1 for v in self.stages.values() if v["state"] not in ACTIVE)

    def counts(self) -> list[tuple[str, list[int]]]:
        """(kind, count per state in STATES), registered kinds first, for kinds the study has."""
        kinds = [*KINDS, *sorted({v["kind"] for v in self.stages.values()} - set(KINDS))]
        out = []
        for kind in kinds:
            states = [v["state"] for v in self.stages.values() if v["kind"] == kind]
            if states:
                out.append((kind, [states.count(s) for s in STATES]))
        return out

    def eta_seconds(self, now: float | None = None) -> tuple[float, bool] | None:
        """Time left and whether kinds not yet timed remain: each kind's remaining stages x its mean run
        time so far, over the concurrency seen so far. None before any stage has run."""
        return eta_seconds(self.stages, self.run_s, self.started, time.time() if now is None else now)


def eta_seconds(stages: dict[str, dict], run_s: dict[str, list[float]], started: float,
                now: float) -> tuple[float, bool] | None:
    done = sum(len(v) for v in run_s.values())
    if not done:
        return None
    busy = sum(sum(v) for v in run_s.values())
    concurrency = max(1.0, busy / max(1e-6, now - started))
    left = 0.0
    for kind, times in run_s.items():
        remaining = sum(1 for st in stages.values() if st["kind"] == kind and st["state"] in ACTIVE)
        left += remaining * sum(times) / len(times)
    unknown = any(st["state"] in ACTIVE and st["kind"] not in run_s for st in stages.values())
    return left / concurrency, unknown


def study_transitions(record: dict, tail: int) -> list[dict]:
    """The study's latest stage transitions, each with its stage's label (`ddray study status --log`)."""
    return [{**e, "label": record["stages"].get(e["key"], {}).get("label", e["key"])}
            for e in transitions(Path(record["dir"]), record, tail)]
