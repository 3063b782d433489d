"""A study's stages counted from its spec, arithmetically, before any stage is built.

`count_stages(spec)` multiplies the grid's axes the way `build_stage_graph` crosses them
(dataset variants x methods x IPCs x iterations x lr_img x the guidance entries that apply x
the debias entries x the option product x seeds; weights per variant x debias entry; PTMs per pool source x architectures x seeds; evaluations per
produced set x architectures, plus the random baseline's; a search's trials as num_samples x
the points of its grid domains), in time and memory that depend on the lengths of the spec's
lists, never on their product. `check_stage_limit(spec, max_stages)` refuses a study whose
stages and search trials exceed the limit with one line naming the field that makes it big;
`build_stage_graph` calls it before it builds anything.

The count is an upper bound of what the graph holds. It is exact whenever the only stages that
coincide (one key reached twice) are the ones the graph shares by construction: repeated values
in one list, a pool's source variant shared by several targets, PTMs of two pools that train the
same network (enumerated while there are at most `EXACT_PTMS` of them), the random baseline when
the study lists the random method itself, baseline evaluations sharing one protocol. Two spec
entries that differ only by name (two datasets, or two guidance entries on two pools, with the
same settings) are counted as two: the graph makes them one stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from distill_core.data.sources import SOURCES
from distill_core.guidance import GuidanceConfig
from distill_core.methods import METHODS
from distill_core.methods.registry import evaluation_augment, reference_method
from distill_core.ptm import PTMConfig
from orchestrator.errors import UserError
from orchestrator.spec.base import as_list, shared
from orchestrator.spec.models import DatasetSpec, PTMPoolSpec, StudySpec
from orchestrator.spec.search import applies
from orchestrator.stages.base import KINDS

TRIALS = "trials"  # the key of a search's trials in `count_stages` (not a stage kind: Tune runs them)


EXACT_PTMS = 1_000_000  # PTM stages enumerated (to find pools training the same network) up to this many


def _sig(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _distinct(values) -> int:
    return len({_sig(v) for v in values})


@dataclass
class StageCount:
    """Stages per kind (and search trials), and the fields that multiply them, for the refusal's line."""

    counts: dict[str, int] = field(default_factory=lambda: {**dict.fromkeys(KINDS, 0), TRIALS: 0})
    # (field, what it holds, how many it multiplies the study by: the product of the field's own lists)
    factors: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_stages(spec: StudySpec) -> dict[str, int]:
    """Stages of each kind the study's graph holds (`StageGraph.counts()`), and under `trials` the search
    trials its search stages run; an upper bound (see the module's docstring for when it is exact)."""
    return _count(spec).counts


def check_stage_limit(spec: StudySpec, max_stages: int | None) -> dict[str, int]:
    """`count_stages(spec)`, refusing (one line naming the biggest field) a study whose stages and search
    trials together exceed `max_stages`."""
    c = _count(spec)
    if max_stages is not None and c.total > max_stages:
        where, what = _biggest(c)
        trials = f" and {c.counts[TRIALS]:,} search trials" if c.counts[TRIALS] else ""
        raise UserError(f"{where}: {what}; the study would have {c.total - c.counts[TRIALS]:,} stages{trials}, "
                        f"more than --max-stages {max_stages:,}")
    return c.counts


def _biggest(c: StageCount) -> tuple[str, str]:
    """The field to name: the one multiplying the study the most (by the product of its own lists)."""
    if not c.factors:
        return "distillation", f"the grid expands to {c.total:,} stages"
    where, what, _ = max(c.factors, key=lambda f: f[2])
    return where, what


def _variants(ds: DatasetSpec) -> int:
    return 1 if ds.bias == "none" else _distinct(ds.aligned_ratios) * _distinct(ds.severities)


def _first_variant(ds: DatasetSpec) -> tuple[float, int]:
    return (1.0, 0) if ds.bias == "none" else (ds.aligned_ratios[0], ds.severities[0])


def _count(spec: StudySpec) -> StageCount:
    c = StageCount()
    d, e = spec.distillation, spec.evaluation
    datasets = {ds.name: ds for ds in spec.datasets}  # as the graph's `variants`: the last of a name wins
    targets = [ds for ds in spec.datasets if ds.distill]
    n_targets = sum(_variants(ds) for ds in targets)
    for i, ds in enumerate(spec.datasets):
        if ds.distill and ds.bias != "none" and _variants(ds) > 1:
            what = f"{len(ds.aligned_ratios)} aligned_ratios x {len(ds.severities)} severities"
            c.factors.append((f"datasets[{i}]", what, _variants(ds)))
    methods = list(dict.fromkeys(d.methods))
    ipcs = list(dict.fromkeys(d.ipc))
    n_seeds = _distinct(d.seeds)
    n_arch = _distinct((a.name, a.options) for a in e.architectures)
    n_debias = _distinct(entry.model_dump(mode="json") for entry in d.debias)
    weighted = False  # some method of the study reads debiasing weights: one weights stage per variant x entry

    # guidance entries by what reaches a key (the guidance config and its pool), each with where its entries
    # run: (methods, IPCs) rectangles, None for every one (kept as given: memory as the spec's lists)
    guides: dict[str, tuple[str | None, list[tuple[set | None, set | None]]]] = {}
    for guide in d.guidance:
        sig = "none" if guide.kind == "none" else _sig([guide.pool, GuidanceConfig(**shared(guide, GuidanceConfig),
                                                                                   kind=guide.kind).to_dict()])
        where = guides.setdefault(sig, (None if guide.kind == "none" else guide.pool, []))[1]
        where.append((None if guide.methods is None else set(guide.methods),
                      None if guide.ipc is None else set(guide.ipc)))

    s = d.search
    produced = distills = searches = trials = 0  # per target
    most_trials = 0  # of one search
    used_pools: set[str] = set()
    coinciding_baseline = False  # the study's own random stage at seeds[0] is the baseline
    reference = reference_method("random_subset")
    for name in methods:
        method = METHODS[name]
        cells = ipcs[:1] if method.reference == "whole_dataset" else ipcs
        if method.optimises_images:
            n_iter = _distinct(d.iterations) if d.iterations else 1
            n_lr = _distinct(d.lr_img) if d.lr_img else 1
            axes = {k: as_list(v) for k, v in d.options.get(name, {}).items()}
            n_opts = math.prod(_distinct(v) for v in axes.values())
            if n_opts > 1:
                what = f"the option grid has {n_opts:,} points ({' x '.join(str(len(v)) for v in axes.values())})"
                c.factors.append((f"distillation.options.{name}", what, n_opts))
            per_guided = {False: 0, True: 0}
            for sig, (pool, where) in guides.items():
                n_cells = _cells(where, name, cells)
                if n_cells and pool is not None:
                    used_pools.add(pool)
                per_guided[pool is not None] += n_cells
            if sum(per_guided.values()) and method.needs_experts and d.trajectories:
                used_pools.add(d.trajectories)
            settings = {k: v * n_iter * n_lr * n_opts * n_debias * n_seeds for k, v in per_guided.items()}
            weighted |= method.takes_weights and any(per_guided.values())
        else:
            settings = {False: len(cells) * n_seeds, True: 0}
            if method.needs_experts and d.trajectories:
                used_pools.add(d.trajectories)
        for guided, n in settings.items():
            space = [p for p in (s.space if s else {}) if applies(p, name, guided)]
            produced += n
            if not space:
                distills += n
                if reference is not None and name == reference.name and not guided:
                    coinciding_baseline = True
                continue
            searches += n
            grids = math.prod(len(s.space[p].grid) for p in space if s.space[p].grid is not None)
            trials += n * s.num_samples * grids
            most_trials = max(most_trials, s.num_samples * grids)
    c.counts["distill"] = n_targets * distills
    c.counts["search"] = n_targets * searches
    c.counts[TRIALS] = n_targets * trials
    c.counts["evaluate"] = n_targets * produced * n_arch
    weights: set[tuple] = set()  # (dataset, aligned ratio, severity, entry): the weights stages' keys
    if weighted:
        entries = [entry for entry in d.debias if entry.kind != "none"]
        weights |= {(ds.name, *v, _sig(entry.model_dump(mode="json")))
                    for ds in targets for v in ds.variants() for entry in entries}
        used_pools.update(entry.pool for entry in entries if entry.pool)
    if searches:
        what = (f"{c.counts['search']:,} searches of up to {most_trials:,} trials each (num_samples x grid points), "
                f"{c.counts[TRIALS]:,} in all")
        c.factors.append(("distillation.search", what, most_trials))
    for where, values in (("distillation.seeds", d.seeds), ("distillation.ipc", d.ipc),
                          ("distillation.iterations", d.iterations or []), ("distillation.lr_img", d.lr_img or []),
                          ("distillation.guidance", d.guidance), ("distillation.debias", d.debias),
                          ("distillation.methods", d.methods),
                          ("evaluation.architectures", e.architectures)):
        if len(values) > 1:
            c.factors.append((where, f"{len(values):,} entries", len(values)))

    if e.random_baseline and reference is not None:
        by_source: dict[str, int] = {}  # a protocol depends on the target's source only
        for ds in targets:
            if ds.source not in by_source:
                by_source[ds.source] = len({_sig([a.name, a.options, _protocol(spec, m, ds, a)])
                                            for m in dict.fromkeys([*methods, reference.name])
                                            for a in e.architectures})
            per_ipc = by_source[ds.source] - (n_arch if coinciding_baseline else 0)
            c.counts["evaluate"] += _variants(ds) * len(ipcs) * per_ipc
            if not coinciding_baseline:
                c.counts["distill"] += _variants(ds) * len(ipcs)

    _count_sources(c, spec, datasets, targets, n_targets, used_pools, weights)
    c.counts["weights"] = len(weights)
    return c


def _cells(where: list[tuple[set | None, set | None]], method: str, ipcs: list) -> int:
    """The IPCs of `ipcs` at which some entry of `where` runs for `method`."""
    covering = [i for m, i in where if m is None or method in m]
    if any(i is None for i in covering):
        return len(ipcs)
    at = set().union(*covering)
    return sum(1 for ipc in ipcs if ipc in at)


def _protocol(spec: StudySpec, method: str, ds: DatasetSpec, arch) -> tuple:
    e = spec.evaluation
    source = SOURCES[ds.source]
    protocol = METHODS[method].protocol(source, arch.name)
    return e.epochs or protocol.epochs, evaluation_augment(e.augmentation, protocol, source)


def _count_sources(c: StageCount, spec: StudySpec, datasets: dict[str, DatasetSpec], targets: list[DatasetSpec],
                   n_targets: int, used: set[str], weights: set[tuple]) -> None:
    """Dataset stages (the targets and the pool sources that are not targets) and PTM stages; `weights` gains
    the weights stages of pools trained on reweighted data (one per source variant, shared with a
    distillation's weights of the same entry on the same variant)."""
    pools = {p.name: p for p in spec.ptm_pools if p.name in used and p.dataset in datasets}
    index = {p.name: i for i, p in enumerate(spec.ptm_pools)}
    target_names = {ds.name for ds in targets}

    def source_of(pool: PTMPoolSpec) -> tuple[list[tuple] | None, int]:
        """(the pool's source variants, or None for every variant of a target dataset; how many)."""
        ds = datasets[pool.dataset]
        if pool.aligned_ratio is not None or pool.severity is not None:
            variants = [(1.0, 0)] if ds.bias == "none" else \
                [(p, sv) for p in ds.aligned_ratios for sv in ds.severities
                 if (pool.aligned_ratio is None or p == pool.aligned_ratio)
                 and (pool.severity is None or sv == pool.severity)][:1]
            return [(ds.name, *v) for v in variants], len(variants)
        if ds.name in target_names:
            return None, _variants(ds)  # each target of the pool's dataset trains its own (matched)
        return [(ds.name, *_first_variant(ds))], 1

    extra: set[tuple] = set()
    upper = 0
    sources: dict[str, tuple[list[tuple] | None, int]] = {}
    for name, pool in pools.items():
        sources[name] = source_of(pool)
        networks = _distinct((a.name, a.options) for a in pool.architectures) * _distinct(pool.seeds)
        n = sources[name][1] * networks
        upper += n
        what = (f"{len(pool.architectures)} architectures x {len(pool.seeds)} seeds x {sources[name][1]} source "
                f"variants = {n:,} PTMs")
        c.factors.append((f"ptm_pools[{index[name]}]", what, networks))
        if pool.debias.kind != "none":
            ds = datasets[pool.dataset]
            variants = sources[name][0] or [(ds.name, *v) for v in ds.variants()]
            weights |= {(*v, _sig(pool.debias.model_dump(mode="json"))) for v in variants}
        for v in sources[name][0] or []:
            ds = datasets[v[0]]
            is_target = ds.distill and (ds.bias == "none" or (v[1] in ds.aligned_ratios and v[2] in ds.severities))
            if not is_target:
                extra.add(v)
    c.counts["dataset"] = n_targets + len(extra)
    c.counts["ptm"] = upper if upper > EXACT_PTMS else _exact_ptms(pools, sources, datasets)


def _exact_ptms(pools: dict[str, PTMPoolSpec], sources: dict, datasets: dict[str, DatasetSpec]) -> int:
    """PTM stages as distinct (source variant, training config): two pools training the same network on the
    same data are one stage (the pool's name is not part of a key)."""
    seen: set[tuple] = set()
    for name, pool in pools.items():
        ds = datasets[pool.dataset]
        variants = sources[name][0]
        if variants is None:
            variants = [(ds.name, *v) for v in dict.fromkeys(ds.variants())]
        training = _sig({**shared(pool, PTMConfig), "epochs": pool.train_epochs, "recipe": pool.recipe,
                         "debias": pool.debias.model_dump(mode="json")})
        networks = {_sig([a.name, a.options, seed]) for a in pool.architectures for seed in pool.seeds}
        seen.update((v, training, n) for v in variants for n in networks)
    return len(seen)
