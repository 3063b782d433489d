"""Checks across fields of a validated spec, each a `Problem` naming its path.

- references resolve: pools name datasets, guidance and trajectories name pools,
  pinned pool variants exist, a method's needs (expert trajectories) are met;
- each method's options are valid grids of its own typed options model;
- every architecture can be built for the images it will see (on the meta
  device: a ResNet with `width`, a ConvNet too deep for 28x28 are refused here,
  not in a worker), guidance PTMs see the targets' image shape (after a
  source's `image_size` / `channels` adaptation), CLoM's PTMs predict the
  targets' classes, an alpha mapping covers its pool;
- a guidance entry's `methods` / `ipc` restriction names methods and IPCs of
  the study and leaves it somewhere to run;
- augmentation names parse.
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import islice, product
from typing import Annotated, Any, Iterator

from pydantic import BeforeValidator, Field, ValidationError, create_model

from distill_core.augment import SiameseAugment
from distill_core.data.biased import DatasetConfig
from distill_core.data.sources import SOURCES
from distill_core.debias import DEBIAS_KINDS, DebiasKind
from distill_core.guidance import missing_alpha
from distill_core.methods import METHODS, EvalProtocol, Options
from distill_core.methods.registry import evaluation_augment
from distill_core.networks import ARCHITECTURES, check_network, unknown_options
from orchestrator.errors import suggest
from orchestrator.spec.base import Strict, as_list
from orchestrator.spec.models import (MAX_GRID, ArchSpec, DatasetSpec, DebiasSpec, DistillationSpec, GuidanceSpec,
                                      StudySpec)
from orchestrator.spec.problems import Problem, problems_from
from orchestrator.spec.search import GUIDANCE_FIELDS, SHARED_FIELDS, Domain, applies


def check_spec(spec: StudySpec) -> list[Problem]:
    return [*_references(spec), *_restrictions(spec), *_options(spec), *_debias(spec), *_augmentations(spec),
            *_networks(spec), *check_search(spec), *_holdout(spec)]


def debias_reads_pool(kind: DebiasKind, options: Options) -> bool:
    """Whether a debias entry reads a ptm pool: a kind scored by a PTM (lff), or an embedding taken from a
    network (`embedding: network`, kde's option)."""
    return kind.needs_scores or getattr(options, "embedding", None) == "network"


def _debias_options(entry: DebiasSpec, loc: tuple, out: list[Problem]) -> Options | None:
    """A weighted entry's options as its kind's model, or None (for `none`, or with the problems added to `out`)."""
    if entry.kind == "none":
        if entry.pool is not None or entry.options:
            out.append(Problem(loc, "kind 'none' weights nothing: it takes no pool and no options"))
        return None
    kind = DEBIAS_KINDS[entry.kind]
    try:
        return kind.options(**entry.options)
    except ValidationError as exc:
        out += problems_from(exc, kind.options, loc, unknown="option")
        return None


def _debias(spec: StudySpec) -> list[Problem]:
    """Each `distillation.debias` entry: its kind's options, the pool it reads, data it can weight (attribute
    labels for an oracle kind), and methods of the study that take weights."""
    d = spec.distillation
    pools = {p.name: p for p in spec.ptm_pools}
    datasets = {ds.name: ds for ds in spec.datasets}
    targets = [ds for ds in spec.datasets if ds.distill]
    out: list[Problem] = []
    for i, pool in enumerate(spec.ptm_pools):  # a pool trained on reweighted data
        entry, loc = pool.debias, ("ptm_pools", i, "debias")
        kind, options = DEBIAS_KINDS[entry.kind], _debias_options(entry, loc, out)
        if options is None:
            continue
        if pool.recipe == "lff":
            out.append(Problem(loc, "recipe lff reweights its own debiased model; train it on unweighted data"))
        elif debias_reads_pool(kind, options) or entry.pool is not None:
            out.append(Problem(loc, f"a pool's weights read no other ptm pool (kind '{entry.kind}' with these "
                                    "options does): use kde on pixels, or groups"))
        elif kind.needs_attributes and pool.dataset in datasets and datasets[pool.dataset].bias == "none":
            out.append(Problem(loc, f"kind '{entry.kind}' weights by attribute (bias) labels, but dataset "
                                    f"'{pool.dataset}' has none (bias: none)"))
    for i, entry in enumerate(d.debias):
        loc = ("distillation", "debias", i)
        kind, options = DEBIAS_KINDS[entry.kind], _debias_options(entry, loc, out)
        if options is None:
            continue
        if debias_reads_pool(kind, options):
            pool = pools.get(entry.pool or "")
            if pool is None:
                what = "its scores come from an lff ptm pool" if kind.needs_scores else "it embeds with a ptm pool"
                out.append(Problem((*loc, "pool"), f"unknown ptm pool '{entry.pool}'{suggest(entry.pool or '', pools)}"
                                   if entry.pool else f"kind '{entry.kind}' needs pool: NAME ({what})"))
            elif kind.needs_scores and pool.recipe != "lff":
                out.append(Problem((*loc, "pool"), f"pool '{pool.name}' trains with recipe '{pool.recipe}'; kind "
                                                   f"'{entry.kind}' reads the scores of recipe: lff"))
            elif pool.debias.kind != "none":
                out.append(Problem((*loc, "pool"), f"pool '{pool.name}' trains on reweighted data itself; weights "
                                                   "read an unweighted pool"))
            elif kind.needs_scores and (pool.aligned_ratio is not None or pool.severity is not None
                                        or any(t.name != pool.dataset for t in targets)):
                out.append(Problem((*loc, "pool"), f"pool '{pool.name}' must train on each target's own variant "
                                                   "(the target dataset, aligned_ratio and severity unset): its "
                                                   "scores weight that variant's samples"))
        elif entry.pool is not None:
            out.append(Problem((*loc, "pool"), f"kind '{entry.kind}' reads no ptm pool with these options"))
        if kind.needs_attributes:
            for ds in targets:
                if ds.bias == "none":
                    out.append(Problem(loc, f"kind '{entry.kind}' weights by attribute (bias) labels, but dataset "
                                            f"'{ds.name}' has none (bias: none)"))
        for m in d.methods:
            if METHODS[m].optimises_images and not METHODS[m].takes_weights:
                takers = [n for n, r in METHODS.items() if r.takes_weights]
                out.append(Problem(loc, f"method '{m}' takes no sample weights, so it cannot be crossed with kind "
                                        f"'{entry.kind}' (methods that do: {', '.join(sorted(takers))}); distil it "
                                        "in a study of its own"))
    return out


def _holdout(spec: StudySpec) -> list[Problem]:
    """A held-out split set to 0 where the study reads one (val selection, a search's proxy)."""
    why = "evaluation.selection 'val'" if spec.evaluation.selection == "val" else "distillation.search's proxy"
    return [Problem(("datasets", i, "val_fraction"), f"is 0, but {why} needs a held-out split (leave it unset "
                    "for 0.1)") for i, ds in enumerate(spec.datasets)
            if ds.distill and spec.needs_holdout and ds.val_fraction == 0]


@lru_cache(maxsize=None)
def options_grid_model(options: type[Options]) -> type[Strict]:
    """A model with every option of `options` as an optional grid axis of the same constrained type."""
    fields: dict[str, Any] = {}
    for name, info in options.model_fields.items():
        item = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        axis = Annotated[list[item], BeforeValidator(as_list), Field(min_length=1, max_length=MAX_GRID)]
        fields[name] = (axis | None, None)
    return create_model(f"{options.__name__}Grid", __base__=Strict, **fields)


def option_grid(method: str, raw: dict) -> dict[str, list]:
    """The spec's option axes for `method` (validated; unset options are left to the method's defaults)."""
    model = options_grid_model(METHODS[method].options)
    return {k: v for k, v in model.model_validate(raw).model_dump().items() if v is not None}


def option_points(axes: dict[str, list]) -> Iterator[dict]:
    """Every combination of a method's option axes (validated grids), one at a time: a large grid stops at
    the first problem or at the stage limit instead of filling memory first."""
    for values in product(*axes.values()):
        yield dict(zip(axes, values))


def _options(spec: StudySpec) -> list[Problem]:
    out: list[Problem] = []
    for method, raw in spec.distillation.options.items():
        loc = ("distillation", "options", method)
        model = options_grid_model(METHODS[method].options)
        try:
            model.model_validate(raw)
        except ValidationError as exc:
            out += problems_from(exc, model, loc, unknown="option")
            continue
        if method not in spec.distillation.methods:
            out.append(Problem(loc, f"method '{method}' is not in distillation.methods"))
        # the method's own model on every value of every axis (the first MAX_CHECKED_POINTS points of the
        # product where the model checks across fields), never the whole product: see checked_points
        for point in checked_points(METHODS[method].options, option_grid(method, raw)):
            try:
                METHODS[method].options(**point)
            except ValidationError as exc:
                out += problems_from(exc, METHODS[method].options, loc, unknown="option")
                break
    return out


MAX_CHECKED_POINTS = 10_000  # option points a cross-field validator of a method's options model is run on


def checked_points(options: type[Options], axes: dict[str, list]) -> Iterator[dict]:
    """The option points whose validation can still refuse something, never more than MAX_CHECKED_POINTS.

    The grid model has already checked every value on its own axis with the option's type and bounds.
    A model with no validator across fields (`model_validator`, none today) can refuse only per value, so
    checking each axis once is the whole check: one point per value (the others at their first value),
    the sum of the axes' lengths instead of their product. A model with one is run on the first
    MAX_CHECKED_POINTS points of the product (a larger grid is refused by the stage limit, counted from
    the spec before the graph is built)."""
    if options.__pydantic_decorators__.model_validators:
        yield from islice(option_points(axes), MAX_CHECKED_POINTS)
        return
    first = {k: v[0] for k, v in axes.items()}
    yield first
    for name, values in axes.items():
        for value in values[1:]:
            yield {**first, name: value}


def _restrictions(spec: StudySpec) -> list[Problem]:
    """A guidance entry's `methods` / `ipc` name methods and IPCs of the study, and leave it a cell to run at."""
    d = spec.distillation
    guided = [m for m in d.methods if METHODS[m].optimises_images]  # coreset baselines take no guidance
    out: list[Problem] = []
    for i, g in enumerate(d.guidance):
        loc = ("distillation", "guidance", i)
        for m in g.methods or []:
            if m not in d.methods:
                out.append(Problem((*loc, "methods"), f"'{m}' is not a method of the study (its methods: "
                                                      f"{', '.join(d.methods)})"))
            elif m not in guided:
                out.append(Problem((*loc, "methods"), f"'{m}' takes no guidance (it distils no images)"))
        for ipc in g.ipc or []:
            if ipc not in d.ipc:
                out.append(Problem((*loc, "ipc"), f"{ipc} is not an IPC of the study (its IPCs: "
                                                  f"{', '.join(map(str, d.ipc))})"))
        restricted = g.methods is not None or g.ipc is not None
        if restricted and not any(g.applies(m, ipc) for m in guided for ipc in d.ipc):
            out.append(Problem(loc, "applies to no (method, IPC) of the study, so it never runs (methods taking "
                                    f"guidance: {', '.join(guided) or 'none'}; IPCs: {', '.join(map(str, d.ipc))})"))
    return out


def _references(spec: StudySpec) -> list[Problem]:
    out: list[Problem] = []
    datasets = {d.name: d for d in spec.datasets}
    pools = {p.name: p for p in spec.ptm_pools}
    if len(datasets) != len(spec.datasets):
        out.append(Problem(("datasets",), "names must be unique"))
    if len(pools) != len(spec.ptm_pools):
        out.append(Problem(("ptm_pools",), "names must be unique"))
    if not any(d.distill for d in spec.datasets):
        out.append(Problem(("datasets",), "at least one dataset must have distill: true"))
    folders: dict[str, int] = {}
    for i, ds in enumerate(spec.datasets):
        if SOURCES[ds.source].num_classes is not None:
            continue
        # a local folder (imagefolder) is named only by data_root, which is not part of a stage's key
        same = json.dumps(ds.model_dump(include=set(DatasetConfig.model_fields), mode="json"), sort_keys=True)
        j = folders.setdefault(same, i)
        if j != i and spec.datasets[j].data_root != ds.data_root:
            out.append(Problem(("datasets", i), f"the same settings as datasets[{j}] on another data_root: a "
                                                "stage's key does not include data_root, so both would be one stage"))
    for i, pool in enumerate(spec.ptm_pools):
        loc = ("ptm_pools", i)
        ds = datasets.get(pool.dataset)
        if ds is None:
            out.append(Problem((*loc, "dataset"), f"unknown dataset '{pool.dataset}'{suggest(pool.dataset, datasets)}"))
            continue
        for j, e in enumerate(pool.checkpoint_epochs or []):
            if e > pool.train_epochs:
                out.append(Problem((*loc, "checkpoint_epochs", j), f"must be within [0, epochs={pool.train_epochs}], got {e}"))
        if ds.bias == "none":
            continue
        if pool.aligned_ratio is not None and pool.aligned_ratio not in ds.aligned_ratios:
            out.append(Problem((*loc, "aligned_ratio"), f"{pool.aligned_ratio} is not among datasets '{ds.name}' aligned_ratios"))
        if pool.severity is not None and pool.severity not in ds.severities:
            out.append(Problem((*loc, "severity"), f"{pool.severity} is not among datasets '{ds.name}' severities"))
        pinned = pool.aligned_ratio is not None or pool.severity is not None
        if pinned and ((pool.aligned_ratio is None and len(ds.aligned_ratios) > 1)
                       or (pool.severity is None and len(ds.severities) > 1)):
            out.append(Problem(loc, f"set both aligned_ratio and severity to pin one variant of '{ds.name}'"))
        if not pinned and pool.dataset not in {d.name for d in spec.datasets if d.distill} and len(ds.variants()) > 1:
            out.append(Problem(loc, f"dataset '{ds.name}' has several variants; pin aligned_ratio and severity"))

    d = spec.distillation
    targets = [ds for ds in spec.datasets if ds.distill]
    for i, g in enumerate(d.guidance):
        if g.kind == "none":
            continue
        loc = ("distillation", "guidance", i)
        pool = pools.get(g.pool or "")
        if pool is None:
            out.append(Problem((*loc, "pool"), f"unknown ptm pool '{g.pool}'{suggest(g.pool or '', pools)}"))
            continue
        kept = pool.checkpoint_epochs
        for j, e in enumerate(g.checkpoint_epochs or []):
            if (kept is not None and e not in kept) or e > pool.train_epochs:
                out.append(Problem((*loc, "checkpoint_epochs", j), f"pool '{pool.name}' keeps no checkpoint at epoch {e}"))
        labels = {a.label for a in pool.architectures}
        if isinstance(g.alpha, dict):
            for arch in g.alpha:
                if arch not in labels | {"default"}:
                    out.append(Problem((*loc, "alpha", arch), f"not an architecture of pool '{pool.name}'{suggest(arch, labels)}"))
            missing = missing_alpha(g.alpha, labels)
            if missing:
                out.append(Problem((*loc, "alpha"), f"no weight for pool architecture(s) {', '.join(missing)} "
                                                    "(give each one, or a 'default')"))
        source = datasets.get(pool.dataset)
        if source is None:
            continue
        have = geometry(source)
        want = {geometry(t) for t in targets}
        if want != {have}:
            out.append(Problem(loc, f"pool '{pool.name}' sees {_shape(have)} images but the targets are "
                                    + ", ".join(_shape(w) for w in sorted(want))))
        if g.kind == "clom" and any(num_classes(t) != num_classes(source) for t in targets):
            out.append(Problem(loc, f"CLoM needs a PTM with the target's classes; use cclom for pool '{pool.name}'"))

    needing = [m for m in d.methods if METHODS[m].needs_experts]
    if needing:
        t = d.trajectories
        loc = ("distillation", "trajectories")
        if t is None:
            out.append(Problem(loc, f"method '{needing[0]}' needs expert trajectories: a ptm pool with recipe: expert"))
        elif t not in pools:
            out.append(Problem(loc, f"unknown ptm pool '{t}'{suggest(t, pools)}"))
        elif pools[t].recipe != "expert":
            out.append(Problem(loc, f"pool '{t}' trains with recipe '{pools[t].recipe}'; "
                                    f"method '{needing[0]}' needs recipe: expert (MTT's buffer recipe)"))
        elif pools[t].checkpoint_epochs is not None:
            out.append(Problem(loc, f"pool '{t}' must keep every epoch (leave checkpoint_epochs unset)"))
    return out


def geometry(ds: DatasetSpec) -> tuple[int, int]:
    """(channels, image size) of a dataset's images after its adaptation (`image_size`, `channels`) and its
    bias builder (colouring makes 3 channels)."""
    src = SOURCES[ds.source]
    channels = 3 if ds.bias == "colored" else (ds.channels or src.channels)
    return channels, ds.image_size or src.image_size


def num_classes(ds: DatasetSpec) -> int:
    """A dataset's classes: its source's, or what an imagefolder dataset declares."""
    return ds.num_classes or SOURCES[ds.source].num_classes


def _shape(g: tuple[int, int]) -> str:
    return f"{g[0]}x{g[1]}x{g[1]}"


def _augmentations(spec: StudySpec) -> list[Problem]:
    out = []
    name = spec.distillation.augmentation
    if name not in ("auto", "none"):
        try:
            SiameseAugment(name)
        except ValueError as exc:
            out.append(Problem(("distillation", "augmentation"), f"{exc} (or auto, none)"))
    try:
        evaluation_augment(spec.evaluation.augmentation, EvalProtocol(None, 1), SOURCES[spec.datasets[0].source])
    except ValueError as exc:
        out.append(Problem(("evaluation", "augmentation"), f"{exc} (or auto, none, dsa, dc)"))
    return out


def _networks(spec: StudySpec) -> list[Problem]:
    """Build every (architecture, overrides, image geometry, classes) a stage will build, once each."""
    datasets = {d.name: d for d in spec.datasets}
    targets = [d for d in spec.datasets if d.distill]
    uses: list[tuple[tuple, ArchSpec, DatasetSpec]] = []
    uses += [(("distillation", "arch"), spec.distillation.arch, t) for t in targets]
    uses += [(("evaluation", "architectures", i), a, t)
             for i, a in enumerate(spec.evaluation.architectures) for t in targets]
    for i, pool in enumerate(spec.ptm_pools):
        if pool.dataset in datasets:
            uses += [(("ptm_pools", i, "architectures", j), a, datasets[pool.dataset])
                     for j, a in enumerate(pool.architectures)]
    out, seen = [], {}
    for loc, arch, ds in uses:
        unknown = [o for o in sorted(arch.options) if o not in ARCHITECTURES[arch.name].options]
        if unknown:
            out += [Problem((*loc, o), m) for o, m in zip(unknown, unknown_options(arch.name, arch.options))]
            continue
        channels, size = geometry(ds)
        classes = num_classes(ds)
        key = (arch.name, tuple(sorted(arch.options.items())), channels, size, classes)
        if key not in seen:
            seen[key] = check_network(arch.name, arch.options, channels, classes, size)
        if seen[key] is not None:
            out.append(Problem(loc, f"{arch.label} cannot take {_shape((channels, size))} images "
                                    f"of dataset '{ds.name}' ({seen[key]})"))
    return out


# --- distillation.search -----------------------------------------------------------------------

def check_search(spec) -> list[Problem]:
    """Each space field names something searchable, with values its typed model accepts (the spec's own
    models give each searched field its bounds)."""
    d = spec.distillation
    if d.search is None:
        return []
    out: list[Problem] = []
    base = ("distillation", "search")
    s = d.search
    if s.algorithm == "optuna" and any(dom.grid is not None for dom in s.space.values()):
        out.append(Problem((*base, "algorithm"), "optuna cannot search a grid; use choice (or algorithm: random)"))
    for path, domain in s.space.items():
        loc = (*base, "space", path)
        head, _, rest = path.partition(".")
        if head in SHARED_FIELDS and not rest:
            if getattr(d, head, None) is not None and head not in ("lr_net", "batch_real"):
                out.append(Problem(loc, f"distillation.{head} is also a grid axis; search it or list it, not both"))
            out += _values(loc, domain, lambda v, f=head: DistillationSpec(methods=d.methods, **{f: v}),
                           DistillationSpec)
        elif head == "guidance" and rest in GUIDANCE_FIELDS:
            if all(g.kind == "none" for g in d.guidance):
                out.append(Problem(loc, "no guided setting in distillation.guidance to search it in"))
            out += _values(loc, domain, lambda v, f=rest: GuidanceSpec(kind="clom", pool="p", **{f: v}),
                           GuidanceSpec)
        elif head == "options":
            method, _, option = rest.partition(".")
            if method not in METHODS:
                out.append(Problem(loc, f"unknown method '{method}'{suggest(method, METHODS)}"))
            elif method not in d.methods:
                out.append(Problem(loc, f"method '{method}' is not in distillation.methods"))
            elif not METHODS[method].options.model_fields:
                out.append(Problem(loc, f"method '{method}' has no options"))
            elif option not in METHODS[method].options.model_fields:
                out.append(Problem(loc, f"unknown option{suggest(option, METHODS[method].options.model_fields)}"))
            else:
                model = METHODS[method].options
                out += _values(loc, domain, lambda v, f=option, m=model: m(**{f: v}), model)
        else:
            known = [*SHARED_FIELDS, *(f"guidance.{f}" for f in GUIDANCE_FIELDS), "options.<method>.<option>"]
            out.append(Problem(loc, f"not a searchable field{suggest(path, known)}"))
    if not any(applies(p, m, g.kind != "none") for p in s.space for m in d.methods for g in d.guidance):
        out.append(Problem((*base, "space"), "no field applies to any distillation setting"))
    return out


def _values(loc, domain: Domain, build, model) -> list[Problem]:
    """Build the field's model with each extreme value; the first refusal is the problem."""
    for value in domain.extremes():
        try:
            build(value)
        except ValidationError as exc:
            problems = problems_from(exc, model, ())
            message = problems[0].message if problems else str(exc).splitlines()[0]
            if domain.kind in ("uniform", "loguniform") and value not in domain.value:
                message += f"; {domain.kind} draws fractions, use randint for an integer field"
            return [Problem((*loc, domain.kind), f"{value!r}: {message}")]
    return []
