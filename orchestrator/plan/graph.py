"""Expanding a study spec into its stage graph.

dataset build -> PTM training (architecture x seed, per pool variant)
             -> debiasing weights (variant x debias entry), shared by every distillation that uses them
             -> distillation (variant x method x IPC x iterations x lr x guidance x debias x options x seed),
                or a search around it when `distillation.search` has fields for that setting
                (a guidance entry with `methods` / `ipc` only at those methods and IPCs)
             -> evaluation (synthetic set x architecture)

Each stage's config is its kind's config type (`orchestrator.stages`: `DatasetConfig`,
`PTMConfig`, `DistillConfig`, `SearchConfig`, `EvalConfig`, ...) stored as its own dict;
the stage rebuilds it with `stage.typed_config()`. Defaults, option models and evaluation
protocols come from the method registry. A stage's key hashes its kind, its
code version, its config and its named inputs' keys, so an unchanged stage
keeps its key across submissions (and across studies) and is reused from the
store; anything upstream that changes changes every key downstream. How a
stage runs (the spec's `runtime`, data locations) is never part of a key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Iterator

from distill_core.data.biased import DatasetConfig
from distill_core.data.sources import SOURCES
from distill_core.debias import DebiasConfig
from distill_core.evaluation import EvalConfig
from distill_core.guidance import GuidanceConfig
from distill_core.methods import METHODS, DistillConfig, Method
from distill_core.methods.registry import (
    dsa_strategy,
    evaluation_augment,
    reference_method,
)
from distill_core.ptm import PTMConfig, recipe
from orchestrator.errors import UserError
from orchestrator.plan.count import check_stage_limit
from orchestrator.spec.base import shared
from orchestrator.spec.checks import option_points
from orchestrator.spec.claims import unmatched_filters
from orchestrator.spec.models import (DatasetSpec, DebiasSpec, DistillationSpec, GuidanceSpec, PTMPoolSpec,
                                      StudySpec)
from orchestrator.spec.search import SearchConfig, applies
from orchestrator.stages.base import KINDS, Inputs, Stage
from orchestrator.stages.search_space import max_iterations

MAX_STAGES = 100_000  # a larger grid is refused (override: --max-stages); the graph is built in memory


@dataclass
class StageGraph:
    stages: dict[str, Stage] = field(default_factory=dict)  # key -> stage, in topological order
    max_stages: int | None = None
    _dependents: dict[str, list[str]] = field(default_factory=dict)

    def add(self, stage: Stage) -> Stage:
        # the same stage reached twice (e.g. a shared PTM) is one stage
        if stage.key in self.stages:
            return self.stages[stage.key]
        if self.max_stages is not None and len(self.stages) >= self.max_stages:
            raise UserError(f"distillation: the study's grid expands to more than {self.max_stages:,} stages "
                            "(the limit; a larger study needs --max-stages)")
        self.stages[stage.key] = stage
        for k in stage.input_keys:
            self._dependents.setdefault(k, []).append(stage.key)
        return stage

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages.values() if s.kind == kind]

    def dependents(self, key: str) -> list[str]:
        return self._dependents.get(key, [])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for s in self.stages.values():
            out[s.kind] += 1
        return out


def dataset_stage(ds: DatasetSpec, ratio: float, severity: int, holdout: float) -> Stage:
    config = DatasetConfig(**shared(ds, DatasetConfig), aligned_ratio=ratio, severity=severity,
                           val_fraction=holdout)
    coords = {"dataset": ds.name, "source": ds.source, "aligned_ratio": ratio if ds.bias != "none" else None,
              "severity": severity if ds.bias != "none" else None,
              "val_split": (ds.val_split if ds.bias != "none" else "biased") if holdout > 0 else None}
    label = ds.name if ds.bias == "none" else f"{ds.name}[p={ratio:g},s={severity}]"
    return Stage("dataset", config.to_dict(), {}, label, coords, runtime={"data_root": ds.data_root})


def ptm_stages(pool: PTMPoolSpec, data: Stage, weights: Stage | None = None) -> list[Stage]:
    """The pool's PTMs on one source variant, trained on `weights`' reweighting of it when the pool has them."""
    epochs = pool.train_epochs
    training = recipe(pool.recipe, epochs, dsa_strategy(SOURCES[data.coords["source"]]))
    out = []
    for arch, seed in product(pool.architectures, pool.seeds):
        config = PTMConfig(**shared(pool, PTMConfig), arch=arch.name, arch_options=arch.options, seed=seed,
                           epochs=epochs, **training)
        coords = {**data.coords, "pool": pool.name, "arch": arch.label, "seed": seed, "recipe": pool.recipe,
                  "debias": pool.debias.label}
        inputs: Inputs = {"dataset": data.key, **({"weights": weights.key} if weights is not None else {})}
        out.append(Stage("ptm", config.to_dict(), inputs,
                         f"{pool.name}/{arch.label}/s{seed} on {data.label}", coords))
    return out


def evaluation_stages(spec: StudySpec, method: Method, distill: Stage, target: Stage) -> list[Stage]:
    e = spec.evaluation
    source = target.coords["source"]
    out = []
    for arch in e.architectures:
        protocol = method.protocol(SOURCES[source], arch.name)
        config = EvalConfig(**shared(e, EvalConfig), arch=arch.name, arch_options=arch.options,
                            epochs=e.epochs or protocol.epochs, seed=spec.seed,
                            augment=evaluation_augment(e.augmentation, protocol, SOURCES[source]))
        coords = {**distill.coords, "eval_arch": arch.label,
                  "eval_protocol": f"{config.augment or 'none'}/{config.epochs}ep", "selection": e.selection}
        out.append(Stage("evaluate", config.to_dict(), {"synthetic": distill.key, "dataset": target.key},
                         f"eval {arch.label} <- {distill.label}", coords))
    return out


def build_stage_graph(spec: StudySpec, max_stages: int | None = MAX_STAGES) -> StageGraph:
    check_stage_limit(spec, max_stages)  # counted from the spec first: a study over the limit builds nothing
    graph = StageGraph(max_stages=max_stages)
    # PTM-source-only datasets (distill: false) enter the graph only when a pool uses them
    variants: dict[str, list[Stage]] = {
        ds.name: [dataset_stage(ds, p, s, ds.holdout(spec.needs_holdout)) for p, s in ds.variants()]
        for ds in spec.datasets}
    targets = [graph.add(v) for ds in spec.datasets if ds.distill for v in variants[ds.name]]
    pools = {p.name: p for p in spec.ptm_pools}

    def pool_source(pool: PTMPoolSpec, target: Stage) -> Stage:
        """The dataset variant a pool trains on for a given distillation target."""
        candidates = variants[pool.dataset]
        if pool.aligned_ratio is not None or pool.severity is not None:
            return next(v for v in candidates
                        if (pool.aligned_ratio is None or v.config["aligned_ratio"] == pool.aligned_ratio)
                        and (pool.severity is None or v.config["severity"] == pool.severity))
        if pool.dataset == target.coords["dataset"]:
            return target  # matched: the PTM sees the same (biased) data as the distillation
        return candidates[0]  # a single-variant source (validation refuses several unpinned)

    def pool_stages(name: str, target: Stage) -> list[Stage]:
        pool = pools[name]
        source = graph.add(pool_source(pool, target))
        weights = graph.add(weights_stage(pool.debias, source, [])) if pool.debias.kind != "none" else None
        return [graph.add(s) for s in ptm_stages(pool, source, weights)]

    d = spec.distillation
    for target in targets:
        source = SOURCES[target.coords["source"]]
        strategy = {"auto": dsa_strategy(source), "none": None}.get(d.augmentation, d.augmentation)
        for name, ipc in product(d.methods, d.ipc):
            method = METHODS[name]
            if method.reference == "whole_dataset" and ipc != d.ipc[0]:
                continue  # the whole training split has no IPC: one stage per variant
            axes = d.options.get(name, {})  # the method's option grids, validated when the spec was read
            for (iters, lr, guide, debias, options), seed in product_lazily(settings(method, d, axes), d.seeds):
                if not guide.applies(name, ipc):
                    continue  # an entry restricted to other methods / IPCs (e.g. a published alpha's cells)
                inputs: Inputs = {"dataset": target.key}
                guidance = None
                if guide.kind != "none":
                    inputs["ptms"] = [s.key for s in pool_stages(guide.pool, target)]
                    guidance = GuidanceConfig(**shared(guide, GuidanceConfig), kind=guide.kind)
                if method.needs_experts:
                    inputs["experts"] = [s.key for s in pool_stages(d.trajectories, target)]
                if debias.kind != "none":
                    pool = pool_stages(debias.pool, target) if debias.pool else []
                    inputs["weights"] = graph.add(weights_stage(debias, target, pool)).key
                config = DistillConfig(
                    **shared(d, DistillConfig), method=name, ipc=ipc, iterations=iters, lr_img=lr, arch=d.arch.name,
                    arch_options=d.arch.options, init=d.init or method.init,
                    augment=strategy if method.augment else None, seed=seed + spec.seed, options=options,
                    guidance=guidance)
                coords = {**target.coords, "method": name, "ipc": None if method.reference == "whole_dataset" else ipc,
                          "iterations": iters, "lr_img": lr,
                          "guidance": guide.label, "debias": debias.label, "debias_oracle": debias.oracle,
                          "distill_seed": seed, "options": options or None}
                varied = {k: v for k, v in options.items() if len(axes[k]) > 1}
                label = distill_label(spec, config, guide, debias, target, varied)
                search = search_stage(spec, method, config, guide, target, inputs, label, coords)
                distill = graph.add(search or Stage("distill", config.to_dict(), inputs, label, coords))
                for stage in evaluation_stages(spec, method, distill, target):
                    graph.add(stage)
        if spec.evaluation.random_baseline:
            random_baseline_stages(graph, spec, target)
    check_claims(spec, graph)
    return graph


def settings(method: Method, d: DistillationSpec, axes: dict[str, list]) -> Iterator[tuple]:
    """(iterations, lr_img, guidance, debias, options) of each distillation of `method`, one at a time."""
    if not method.optimises_images:  # coreset baselines: no iterations, no lr, no guidance, no weights, no options
        yield 0, 0.0, GuidanceSpec(), DebiasSpec(), {}
        return
    for iters, lr, guide, debias in product(d.iterations or [method.iterations], d.lr_img or [method.lr_img],
                                            d.guidance, d.debias):
        for options in option_points(axes):
            yield iters, lr, guide, debias, options


def weights_stage(debias: DebiasSpec, target: Stage, pool: list[Stage]) -> Stage:
    """The debiasing weights of one variant's distillation split (`orchestrator.stages.weights`): one stage per
    (variant, entry), whatever the methods, IPCs, guidance and seeds that read it."""
    config = DebiasConfig(**shared(debias, DebiasConfig))
    inputs: Inputs = {"dataset": target.key, **({"ptms": [s.key for s in pool]} if pool else {})}
    coords = {**target.coords, "debias": debias.label, "debias_oracle": debias.oracle}
    return Stage("weights", config.to_dict(), inputs, f"weights {debias.label} on {target.label}", coords)


def product_lazily(first: Iterator, second: list) -> Iterator[tuple]:
    """`product(first, second)` without materialising `first` (itertools.product would)."""
    for a in first:
        for b in second:
            yield a, b


def check_claims(spec: StudySpec, graph: StageGraph) -> None:
    """Every claim's groups select evaluations of the study (a misspelt label would test nothing)."""
    if not spec.findings:
        return
    coords = [s.coords for s in graph.of_kind("evaluate")]
    problems = [f"findings[{i}].{p}" for i, claim in enumerate(spec.findings) for p in unmatched_filters(claim, coords)]
    if problems:
        raise UserError(*problems)


def random_baseline_stages(graph: StageGraph, spec: StudySpec, target: Stage) -> None:
    """The random real subset at each IPC, evaluated with the protocol of every method of the study, so each
    row is scored against a baseline evaluated exactly as it was (DD-Ranking's improvement over random).
    A study that lists the random method already has these stages: they are the same keys."""
    reference = reference_method("random_subset")
    d = spec.distillation
    if reference is None:
        return
    for ipc in d.ipc:
        config = DistillConfig(
            **shared(d, DistillConfig), method=reference.name, ipc=ipc, iterations=0, lr_img=0.0, arch=d.arch.name,
            arch_options=d.arch.options, init=d.init or reference.init, augment=None, seed=d.seeds[0] + spec.seed,
            options={}, guidance=None)
        coords = {**target.coords, "method": reference.name, "ipc": ipc, "iterations": 0, "lr_img": 0.0,
                  "guidance": "none", "debias": "none", "debias_oracle": False, "distill_seed": d.seeds[0],
                  "options": None, "reference": "random_subset"}
        baseline = graph.add(Stage("distill", config.to_dict(), {"dataset": target.key},
                                   f"{reference.name} ipc{ipc} none on {target.label}", coords))
        for name in dict.fromkeys([*d.methods, reference.name]):
            for stage in evaluation_stages(spec, METHODS[name], baseline, target):
                graph.add(stage)


def search_stage(spec: StudySpec, method: Method, config: DistillConfig, guide: GuidanceSpec, target: Stage,
                 inputs: Inputs, label: str, coords: dict) -> Stage | None:
    """A search around one distillation setting, or None when no field of the space applies to it."""
    s = spec.distillation.search
    if s is None:
        return None
    space = {path: d.model_dump(exclude_none=True, mode="json") for path, d in s.space.items()
             if applies(path, method.name, guide.kind != "none")}
    if not space:
        return None
    protocol = method.protocol(SOURCES[target.coords["source"]], spec.distillation.arch.name)
    e = spec.evaluation
    # the study's evaluation settings, with the proxy's own budget: one check, the final epoch's score
    proxy = EvalConfig(**{**shared(e, EvalConfig), "checkpoints": 1, "repeats": s.proxy.repeats, "selection": "last"},
                       arch=config.arch, arch_options=config.arch_options, epochs=s.proxy.epochs,
                       augment=protocol.augment if s.proxy.augmentation == "auto" else None, seed=spec.seed)
    every = s.proxy.every or max(1, max_iterations(space, config.iterations) // 4)
    cfg = SearchConfig(**shared(s, SearchConfig), distill=config, space=space, grace_period=s.grace_period or every,
                       every=every, proxy=proxy)
    trial = spec.resources.trial
    return Stage("search", cfg.to_dict(), inputs, f"search {label}", {**coords, "search": ",".join(space)},
                 runtime={"trial": {"cpus": trial.cpus, "gpus": trial.gpus}, "max_failures": s.max_failures})


def distill_label(spec: StudySpec, cfg: DistillConfig, guide: GuidanceSpec, debias: DebiasSpec, target: Stage,
                  varied: dict) -> str:
    """`dm ipc10 none on cdigits[p=0.1,s=1]` (`dm ipc10 none debias=kde on ...` with weights), plus whatever
    the grid varies (`varied`: option values)."""
    d = spec.distillation
    weighted = "" if debias.kind == "none" else f" debias={debias.label}"
    label = f"{cfg.method} ipc{cfg.ipc} {guide.label}{weighted} on {target.label}"
    if cfg.iterations and d.iterations and len(d.iterations) > 1:
        label += f" it{cfg.iterations}"
    if cfg.lr_img and d.lr_img and len(d.lr_img) > 1:
        label += f" lr{cfg.lr_img:g}"
    label += "".join(f" {k}={v}" for k, v in varied.items())
    if len(d.seeds) > 1:
        label += f" s{cfg.seed - spec.seed}"
    return label
