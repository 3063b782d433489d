"""A paper's claims as tests over a study's results: effect, 95% interval, verdict.

A spec's `findings:` block declares claims over the evaluation networks of
the study, by their grid coordinates:

    findings:
      - id: clom-beats-none
        statement: CLoM guidance beats no guidance
        metric: acc                      # a per-network metric (METRICS)
        a: {guidance: "clom:*"}          # two groups of coordinates (values, or glob patterns for text)
        b: {guidance: none}
        expect: greater                  # a - b > 0
      - id: conflicting-falls
        statement: conflicting-test accuracy falls as the aligned ratio rises
        trend: aligned_ratio             # an ordered coordinate
        expect: decreasing
        per: [method]                    # one finding per method

How a claim is measured:
- Cells: the groups are compared only where they meet, on every coordinate
  the claim does not contrast (dataset variant, method, IPC, evaluation
  architecture, ...); the effect is the mean over cells of the cell's effect,
  in accuracy points.
- compare: mean(a) - mean(b). Where a cell's two groups share distillation
  seeds and network counts the design pairs them (distillation seed s starts
  both from the same images; network r has the same initialisation and data
  order in both), and the bootstrap resamples the pairs together.
  `best_of: COORD` takes, in group a, the level of COORD with the best mean
  (e.g. the best of several checkpoint epochs) - chosen again in every
  bootstrap replicate, so the interval pays for the choice.
- trend: the least-squares change across the ordered levels (slope on the
  level's rank x (levels - 1)): the fitted difference from the first level to
  the last, in points.
- Interval: a two-level bootstrap (distillation seeds, then networks within
  each), 2,000 replicates from a fixed seed, percentile 95% interval.
- Verdict: `greater`/`increasing` hold when the interval lies above 0 and are
  contradicted when it lies below; `less`/`decreasing` the other way round;
  `not_less` (no worse) holds when the interval lies above -margin and is
  contradicted when it lies below -margin. Anything else is inconclusive.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np

from orchestrator.spec.claims import COORDINATES, ClaimSpec, matches

REPLICATES = 2000


BOOTSTRAP_SEED = 0


PERCENT = 100.0


@dataclass
class Evaluation:
    """One evaluation stage's networks: coordinates, distillation seed, per-network metrics."""

    coords: dict
    seed: int
    networks: dict[str, list[float]]  # metric -> value per network (None where not measured)


@dataclass
class Finding:
    id: str
    statement: str
    verdict: str  # holds | contradicted | inconclusive
    effect: float | None  # points
    ci95: list[float] | None
    n: int  # networks read
    metric: str
    expect: str
    detail: dict = field(default_factory=dict)  # cells, paired, the best level, group means for plots

    def to_dict(self) -> dict:
        return {"id": self.id, "statement": self.statement, "verdict": self.verdict, "effect": self.effect,
                "ci95": self.ci95, "n": self.n, "metric": self.metric, "expect": self.expect, **self.detail}


def evaluation_of(result: dict) -> Evaluation:
    """An evaluation stage's stored result as the claims read it."""
    coords = result["coords"]
    nets = dict(result["summary"].get("networks") or {"acc": result["summary"]["accs"]})
    if "acc_aligned" in nets and "acc_conflicting" in nets:
        nets["gap"] = [None if a is None or c is None else a - c
                       for a, c in zip(nets["acc_aligned"], nets["acc_conflicting"])]
    return Evaluation(coords, int(coords.get("distill_seed") or 0), nets)


@dataclass
class Group:
    """One side of a cell: per distillation seed, its networks' values (seed -> values)."""

    by_seed: dict[int, np.ndarray]

    @property
    def n(self) -> int:
        return sum(len(v) for v in self.by_seed.values())

    def mean(self) -> float:
        return float(np.mean(np.concatenate(list(self.by_seed.values()))))

    def shape(self) -> tuple:
        return tuple((s, len(v)) for s, v in sorted(self.by_seed.items()))


def _groups(evals: list[Evaluation], metric: str, key) -> dict[tuple, Group]:
    """Evaluations gathered by `key(coords)`, their networks by distillation seed."""
    out: dict[tuple, dict[int, list[float]]] = {}
    for e in evals:
        vals = [v for v in e.networks.get(metric) or [] if v is not None and math.isfinite(v)]
        if vals:
            out.setdefault(key(e.coords), {}).setdefault(e.seed, []).extend(vals)
    return {k: Group({s: np.asarray(v, dtype=float) for s, v in seeds.items()}) for k, seeds in out.items()}


Draws = tuple[np.ndarray, list[np.ndarray]]  # per replicate: seed picks, and per seed its network picks


def _draws(shape: tuple, rng: np.random.Generator, replicates: int) -> Draws:
    """Two-level bootstrap indices for a group of this shape ((seed, networks) pairs): in every replicate,
    the seeds drawn with replacement, and for each drawn slot its seed's networks drawn with replacement."""
    seeds = [s for s, _ in shape]
    seed_picks = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    net_picks = [rng.integers(0, n, size=(replicates, len(seeds), n)) for _, n in shape]
    return seed_picks, net_picks


def _replicate_means(group: Group, draws: Draws) -> np.ndarray:
    """The group's mean in every bootstrap replicate (`draws` made for the group's shape)."""
    seed_picks, net_picks = draws
    totals = np.zeros(len(seed_picks))
    counts = np.zeros(len(seed_picks))
    for j, s in enumerate(sorted(group.by_seed)):
        values = group.by_seed[s]
        chosen = seed_picks == j  # (replicates, slots): the slots that drew seed s
        totals += (values[net_picks[j]].sum(axis=2) * chosen).sum(axis=1)
        counts += chosen.sum(axis=1) * len(values)
    return totals / counts


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [round(float(lo) * PERCENT, 3), round(float(hi) * PERCENT, 3)]


def verdict(expect: str, ci: list[float], margin: float) -> str:
    lo, hi = ci
    if expect in ("greater", "increasing"):
        return "holds" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"
    if expect in ("less", "decreasing"):
        return "holds" if hi < 0 else "contradicted" if lo > 0 else "inconclusive"
    return "holds" if lo > -margin else "contradicted" if hi < -margin else "inconclusive"  # not_less


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _cell_key(claim: ClaimSpec):
    """A cell: every coordinate the claim does not contrast (a `where` listing two methods gives each its cells)."""
    names = [c for c in COORDINATES if c not in claim.contrasted]
    return lambda coords: tuple(_label(coords.get(c)) for c in names)


def compare(claim: ClaimSpec, evals: list[Evaluation], rng: np.random.Generator,
            replicates: int = REPLICATES) -> tuple[float, np.ndarray, int, dict] | None:
    cell = _cell_key(claim)
    level = (lambda c: _label(c.get(claim.best_of))) if claim.best_of else (lambda c: "")
    a = _groups([e for e in evals if matches(e.coords, claim.a)], claim.metric, lambda c: (cell(c), level(c)))
    b = _groups([e for e in evals if matches(e.coords, claim.b) and not matches(e.coords, claim.a)],
                claim.metric, lambda c: (cell(c), ""))
    cells = sorted({c for c, _ in a} & {c for c, _ in b})
    levels = sorted({lv for c, lv in a if c in cells})
    cells = [c for c in cells if all((c, lv) in a for lv in levels)]  # a level must be in every cell it is compared in
    if not cells:
        return None
    point = {lv: [] for lv in levels}
    reps = {lv: [] for lv in levels}
    paired_cells = 0
    for c in cells:
        gb = b[(c, "")]
        paired = all(a[(c, lv)].shape() == gb.shape() for lv in levels)
        paired_cells += paired
        shared = _draws(gb.shape(), rng, replicates) if paired else None
        b_means = _replicate_means(gb, shared or _draws(gb.shape(), rng, replicates))
        for lv in levels:
            ga = a[(c, lv)]
            a_means = _replicate_means(ga, shared or _draws(ga.shape(), rng, replicates))
            point[lv].append(ga.mean() - gb.mean())
            reps[lv].append(a_means - b_means)
    per_level = {lv: float(np.mean(point[lv])) for lv in levels}
    rep_levels = np.stack([np.mean(reps[lv], axis=0) for lv in levels])  # (levels, replicates)
    best = max(per_level, key=per_level.get)
    samples = rep_levels.max(axis=0)  # the best level, chosen again in every replicate
    n = sum(a[(c, lv)].n for c in cells for lv in levels) + sum(b[(c, "")].n for c in cells)
    detail = {"cells": len(cells), "paired_cells": paired_cells,
              "groups": {**{f"a[{lv}]" if lv else "a": _mean_of(a, cells, lv) for lv in levels},
                         "b": _mean_of(b, cells, "")}}
    if claim.best_of:
        detail["best"] = {claim.best_of: best, "effects": {lv: round(v * PERCENT, 3) for lv, v in per_level.items()}}
    return per_level[best], samples, n, detail


def _mean_of(groups: dict, cells: list, level: str) -> float:
    return round(float(np.mean([groups[(c, level)].mean() for c in cells])) * PERCENT, 3)


def trend(claim: ClaimSpec, evals: list[Evaluation], rng: np.random.Generator,
          replicates: int = REPLICATES) -> tuple[float, np.ndarray, int, dict] | None:
    cell = _cell_key(claim)
    groups = _groups(evals, claim.metric, lambda c: (cell(c), c.get(claim.trend)))
    by_cell: dict[tuple, dict] = {}
    for (c, lv), g in groups.items():
        by_cell.setdefault(c, {})[lv] = g
    by_cell = {c: lv for c, lv in by_cell.items() if len(lv) >= 2}
    if not by_cell:
        return None
    point, reps, means = [], [], {}
    for c, levels in sorted(by_cell.items()):
        order = sorted(levels, key=_sort_key)
        x = np.arange(len(order), dtype=float)
        weights = (x - x.mean()) / ((x - x.mean()) ** 2).sum() * (len(order) - 1)  # slope x (levels - 1)
        point.append(float(sum(w * levels[lv].mean() for w, lv in zip(weights, order))))
        reps.append(sum(w * _replicate_means(levels[lv], _draws(levels[lv].shape(), rng, replicates))
                        for w, lv in zip(weights, order)))
        for lv in order:
            means.setdefault(_label(lv), []).append(levels[lv].mean())
    n = sum(g.n for levels in by_cell.values() for g in levels.values())
    detail = {"cells": len(by_cell), "paired_cells": 0,
              "levels": {lv: round(float(np.mean(v)) * PERCENT, 3) for lv, v in means.items()}}
    return float(np.mean(point)), np.mean(reps, axis=0), n, detail


def _sort_key(value: Any):
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def _both_groups(claim: ClaimSpec, evals: list[Evaluation]) -> bool:
    """Whether a comparison's two groups both have evaluations here (a trend: any evaluation)."""
    if claim.trend:
        return bool(evals)
    return any(matches(e.coords, claim.a) for e in evals) and any(matches(e.coords, claim.b) for e in evals)


def evaluate_claim(claim: ClaimSpec, evals: list[Evaluation], replicates: int = REPLICATES) -> list[Finding]:
    """The claim's findings: one, or one per level combination of `per`."""
    scoped = [e for e in evals if matches(e.coords, claim.where)]
    parts: list[tuple[str, list[Evaluation]]] = [(claim.id, scoped)]
    if claim.per:
        levels = [sorted({_label(e.coords.get(p)) for e in scoped}) for p in claim.per]
        parts = []
        for combo in product(*levels):
            chosen = [e for e in scoped if tuple(_label(e.coords.get(p)) for p in claim.per) == combo]
            if _both_groups(claim, chosen):  # a level only one side has (a baseline method, say) tests nothing
                parts.append((f"{claim.id}[{','.join(f'{p}={v}' for p, v in zip(claim.per, combo))}]", chosen))
        parts = parts or [(claim.id, [])]
    out = []
    for fid, part in parts:
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        measured = (trend if claim.trend else compare)(claim, part, rng, replicates)
        if measured is None:
            out.append(Finding(fid, claim.statement, "inconclusive", None, None, 0, claim.metric, claim.expect,
                               {"note": "no results to compare yet (the groups meet in no cell)"}))
            continue
        effect, samples, n, detail = measured
        ci = _interval(samples)
        out.append(Finding(fid, claim.statement, verdict(claim.expect, ci, claim.margin),
                           round(effect * PERCENT, 3), ci, n, claim.metric, claim.expect, detail))
    return out


def evaluate_findings(claims: list[ClaimSpec], evals: list[Evaluation], replicates: int = REPLICATES) -> list[dict]:
    return [f.to_dict() for claim in claims for f in evaluate_claim(claim, evals, replicates)]
