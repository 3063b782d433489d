"""The study spec: pydantic v2 models loaded from YAML (safe loader), version 1.

Unknown keys are rejected everywhere. Lists are grids: every combination of
dataset variant (aligned ratio x severity), method, IPC, learning rate,
iteration count and guidance setting becomes one distillation stage; every
(synthetic set x evaluation architecture) becomes one evaluation stage.
Validation errors come back as one line per problem, naming the field path,
e.g. `distillation.ipc[1]: must be >= 1`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill_core.data.colored import SEVERITY_SIGMA
from distill_core.data.sources import GRAYSCALE_SOURCES, SOURCES
from distill_core.methods import METHODS
from distill_core.methods.dc import MATCHING_MODES
from distill_core.networks import ARCH_OPTIONS, ARCHITECTURES
from orchestrator.errors import UserError

BIAS_KINDS = ("colored", "corrupted", "none")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchSpec(Strict):
    """An architecture by registry name, with optional ConvNet-style overrides."""

    name: str
    width: int | None = Field(default=None, ge=1)
    depth: int | None = Field(default=None, ge=1)
    norm: Literal["instancenorm", "batchnorm", "groupnorm", "layernorm", "none"] | None = None
    act: Literal["relu", "leakyrelu", "sigmoid"] | None = None
    pool: Literal["avgpooling", "maxpooling", "none"] | None = None

    @model_validator(mode="before")
    @classmethod
    def from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def known_architecture(cls, name: str) -> str:
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture '{name}'{_suggest(name, ARCHITECTURES)}")
        return name

    @property
    def options(self) -> dict:
        return {k: getattr(self, k) for k in sorted(ARCH_OPTIONS) if getattr(self, k) is not None}

    @property
    def label(self) -> str:
        return self.name + "".join(f"-{k}{v}" for k, v in self.options.items())


class TrackingSpec(Strict):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the study name


class StoreSpec(Strict):
    root: str = "./ddray-store"


class DatasetSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    bias: Literal["colored", "corrupted", "none"] = "colored"
    aligned_ratios: list[float] = Field(default=[0.95], min_length=1)
    severities: list[int] = Field(default=[1], min_length=1)
    max_per_class: int | None = Field(default=None, ge=1)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    data_root: str | None = None
    seed: int = 0
    distill: bool = True  # false: only a PTM source (e.g. CIFAR-100 PTMs guiding CIFAR-10)

    @field_validator("source")
    @classmethod
    def known_source(cls, source: str) -> str:
        if source not in SOURCES:
            raise ValueError(f"unknown source '{source}'{_suggest(source, SOURCES)}")
        return source

    @field_validator("aligned_ratios")
    @classmethod
    def ratios_in_range(cls, ratios: list[float]) -> list[float]:
        for i, p in enumerate(ratios):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"[{i}] must be within [0, 1], got {p}")
        return ratios

    @field_validator("severities")
    @classmethod
    def severities_in_range(cls, sev: list[int]) -> list[int]:
        for i, s in enumerate(sev):
            if s not in SEVERITY_SIGMA:
                raise ValueError(f"[{i}] must be one of 1, 2, 3, 4, got {s}")
        return sev

    @model_validator(mode="after")
    def bias_fits_source(self) -> "DatasetSpec":
        if self.bias == "colored" and self.source not in GRAYSCALE_SOURCES:
            raise ValueError(f"bias 'colored' needs a grayscale source ({', '.join(sorted(GRAYSCALE_SOURCES))})")
        if self.bias == "corrupted" and self.source in GRAYSCALE_SOURCES:
            raise ValueError("bias 'corrupted' needs an RGB source (cifar10, cifar100, svhn)")
        return self

    def variants(self) -> list[tuple[float, int]]:
        if self.bias == "none":
            return [(1.0, 0)]  # no attribute: one variant
        return [(p, s) for p in self.aligned_ratios for s in self.severities]


class PTMPoolSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    dataset: str
    # a fixed variant of the dataset; unset = the distillation target's own variant
    aligned_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    severity: int | None = None
    architectures: list[ArchSpec] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    epochs: int = Field(default=150, ge=1)
    checkpoint_epochs: list[int] | None = None  # kept checkpoints; None = every epoch
    lr: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def checkpoints_within_training(self) -> "PTMPoolSpec":
        for i, e in enumerate(self.checkpoint_epochs or []):
            if not 0 <= e <= self.epochs:
                raise ValueError(f"checkpoint_epochs[{i}] must be within [0, epochs={self.epochs}], got {e}")
        return self


class GuidanceSpec(Strict):
    kind: Literal["none", "clom", "cclom"] = "none"
    pool: str | None = None
    alpha: float | dict[str, float] = 1.0
    checkpoint_epochs: list[int] | None = None  # which kept checkpoints to sample; None = the final one
    real_batch: int = Field(default=8196, ge=1)

    @model_validator(mode="before")
    @classmethod
    def from_string(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def pool_when_guided(self) -> "GuidanceSpec":
        if self.kind != "none" and not self.pool:
            raise ValueError(f"guidance '{self.kind}' needs a ptm pool (set pool: NAME)")
        return self

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "none"
        alpha = f"{self.alpha:g}" if not isinstance(self.alpha, dict) else \
            "{" + ",".join(f"{k}={v:g}" for k, v in self.alpha.items()) + "}"
        epochs = "" if self.checkpoint_epochs is None else "@" + ",".join(map(str, self.checkpoint_epochs))
        return f"{self.kind}:{self.pool}{epochs}:a{alpha}"


class DistillationSpec(Strict):
    methods: list[str] = Field(default=["dm"], min_length=1)
    ipc: list[int] = Field(default=[10], min_length=1)
    iterations: list[int] | None = Field(default=None, min_length=1)  # None: each method's upstream default
    lr_img: list[float] | None = None  # None: each method's upstream default
    arch: ArchSpec = ArchSpec(name="convnet")
    batch_real: int = Field(default=256, ge=1)
    init: Literal["real", "noise"] | None = None  # None: the method's default
    dsa: bool | None = None  # None: the method's default
    guidance: list[GuidanceSpec] = Field(default=[GuidanceSpec()], min_length=1)
    trajectories: str | None = None  # a ptm pool whose per-epoch checkpoints are MTT's experts
    seed: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)  # method-specific options

    @field_validator("ipc", "iterations")
    @classmethod
    def positive(cls, values: list[int] | None) -> list[int] | None:
        for i, v in enumerate(values or []):
            if v < 1:
                raise ValueError(f"[{i}] must be >= 1")
        return values

    @field_validator("lr_img")
    @classmethod
    def positive_lr(cls, values: list[float] | None) -> list[float] | None:
        for i, v in enumerate(values or []):
            if v <= 0:
                raise ValueError(f"[{i}] must be > 0")
        return values

    @field_validator("extra")
    @classmethod
    def known_matching_mode(cls, extra: dict[str, Any]) -> dict[str, Any]:
        mode = extra.get("matching")
        if mode is not None and mode not in MATCHING_MODES:
            raise ValueError(f"distillation.extra.matching: must be one of {', '.join(MATCHING_MODES)}, got {mode!r}")
        return extra

    @field_validator("methods")
    @classmethod
    def known_methods(cls, methods: list[str]) -> list[str]:
        for i, m in enumerate(methods):
            if m not in METHODS:
                raise ValueError(f"[{i}] unknown method '{m}'{_suggest(m, METHODS)}")
        return methods

    @field_validator("iterations", mode="before")
    @classmethod
    def scalar_to_grid(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("lr_img", mode="before")
    @classmethod
    def scalar_lr_to_grid(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v


class EvaluationSpec(Strict):
    architectures: list[ArchSpec] = Field(default=[ArchSpec(name="convnet")], min_length=1)
    repeats: int = Field(default=5, ge=1)
    epochs: int = Field(default=300, ge=1)
    dsa: bool = False
    lr: float | None = Field(default=None, gt=0)  # None: 0.01, or MTT's learned lr
    batch_size: int = Field(default=256, ge=1)
    checkpoints: int = Field(default=10, ge=1)  # validation checks over training


class StageResources(Strict):
    cpus: float = Field(default=1.0, gt=0)
    gpus: float = Field(default=0.0, ge=0)


class ResourcesSpec(Strict):
    dataset: StageResources = StageResources()
    ptm: StageResources = StageResources()
    distill: StageResources = StageResources()
    evaluate: StageResources = StageResources()


class StudySpec(Strict):
    version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    tracking: TrackingSpec = TrackingSpec()
    store: StoreSpec = StoreSpec()
    datasets: list[DatasetSpec] = Field(min_length=1)
    ptm_pools: list[PTMPoolSpec] = Field(default_factory=list)
    distillation: DistillationSpec = DistillationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def references_resolve(self) -> "StudySpec":
        problems: list[str] = []
        datasets = {d.name: d for d in self.datasets}
        if len(datasets) != len(self.datasets):
            problems.append("datasets: names must be unique")
        pools = {p.name: p for p in self.ptm_pools}
        if len(pools) != len(self.ptm_pools):
            problems.append("ptm_pools: names must be unique")
        for i, pool in enumerate(self.ptm_pools):
            ds = datasets.get(pool.dataset)
            if ds is None:
                problems.append(f"ptm_pools[{i}].dataset: unknown dataset '{pool.dataset}'{_suggest(pool.dataset, datasets)}")
                continue
            if pool.aligned_ratio is not None and ds.bias != "none" and pool.aligned_ratio not in ds.aligned_ratios:
                problems.append(f"ptm_pools[{i}].aligned_ratio: {pool.aligned_ratio} is not among datasets '{ds.name}' aligned_ratios")
            if pool.severity is not None and ds.bias != "none" and pool.severity not in ds.severities:
                problems.append(f"ptm_pools[{i}].severity: {pool.severity} is not among datasets '{ds.name}' severities")
        for i, g in enumerate(self.distillation.guidance):
            if g.kind == "none":
                continue
            pool = pools.get(g.pool or "")
            if pool is None:
                problems.append(f"distillation.guidance[{i}].pool: unknown ptm pool '{g.pool}'{_suggest(g.pool or '', pools)}")
                continue
            kept = pool.checkpoint_epochs
            for j, e in enumerate(g.checkpoint_epochs or []):
                if (kept is not None and e not in kept) or e > pool.epochs:
                    problems.append(f"distillation.guidance[{i}].checkpoint_epochs[{j}]: pool '{pool.name}' keeps no checkpoint at epoch {e}")
            if isinstance(g.alpha, dict):
                archs = {a.label for a in pool.architectures} | {"default"}
                for arch in g.alpha:
                    if arch not in archs:
                        problems.append(f"distillation.guidance[{i}].alpha.{arch}: not an architecture of pool '{pool.name}'")
            if pool.dataset in datasets:
                want = {_geometry(d) for d in self.datasets if d.distill}
                have = _geometry(datasets[pool.dataset])
                if want != {have}:
                    problems.append(f"distillation.guidance[{i}]: pool '{pool.name}' sees {have[0]}x{have[1]}x{have[1]} "
                                    f"images but the targets are {', '.join(f'{c}x{z}x{z}' for c, z in sorted(want))}")
            if g.kind == "clom" and pool.dataset in datasets:
                # CLoM's cross-entropy needs the PTM to predict the target's own classes
                ptm_classes = _num_classes(datasets[pool.dataset].source)
                if any(_num_classes(d.source) != ptm_classes for d in self.datasets if d.distill):
                    problems.append(f"distillation.guidance[{i}]: CLoM needs a PTM with the target's classes; "
                                    f"use cclom for pool '{pool.name}'")
        if "mtt" in self.distillation.methods:
            t = self.distillation.trajectories
            if t is None:
                problems.append("distillation.trajectories: method 'mtt' needs a ptm pool of expert trajectories")
            elif t not in pools:
                problems.append(f"distillation.trajectories: unknown ptm pool '{t}'{_suggest(t, pools)}")
            elif pools[t].checkpoint_epochs is not None:
                problems.append(f"distillation.trajectories: pool '{t}' must keep every epoch (leave checkpoint_epochs unset)")
        for i, pool in enumerate(self.ptm_pools):
            ds = datasets.get(pool.dataset)
            if ds is None or ds.bias == "none":
                continue
            fixed = pool.aligned_ratio is not None or pool.severity is not None
            if fixed and (pool.aligned_ratio is None and len(ds.aligned_ratios) > 1 or pool.severity is None and len(ds.severities) > 1):
                problems.append(f"ptm_pools[{i}]: set both aligned_ratio and severity to pin one variant of '{ds.name}'")
        if not any(d.distill for d in self.datasets):
            problems.append("datasets: at least one dataset must have distill: true")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def spec_hash(self) -> str:
        """Hash of what the study computes (resources, tracking and store excluded)."""
        science = self.model_dump(mode="json", exclude={"resources", "tracking", "store"})
        return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()

    @property
    def study_id(self) -> str:
        return f"{self.name}-{self.spec_hash()[:8]}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"ddray/{self.name}"


def _num_classes(source: str) -> int:
    return 100 if source == "cifar100" else 10


def _geometry(ds: "DatasetSpec") -> tuple[int, int]:
    """(channels, image size) of a dataset's images after its bias builder."""
    grey = ds.source in GRAYSCALE_SOURCES
    return (1 if grey and ds.bias == "none" else 3), (28 if grey else 32)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(choices))})"


# --- loading and error formatting ---------------------------------------------------------------

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "literal[", "union[", "list[", "dict[", "float", "int", "str", "bool", "ArchSpec", "GuidanceSpec")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "spec"


MESSAGES = {
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "greater_than": lambda e: f"must be > {e['ctx']['gt']}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}",
    "less_than": lambda e: f"must be < {e['ctx']['lt']}",
    "missing": lambda e: "field required",
    "too_short": lambda e: "must not be empty",
    "literal_error": lambda e: f"must be {e['ctx']['expected']}, got {e['input']!r}",
    "string_pattern_mismatch": lambda e: "use letters, digits, '.', '_' and '-' only",
}


def format_errors(exc: ValidationError, model: type[BaseModel] = None) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        path = _loc(err["loc"])
        typ = err["type"]
        if typ == "extra_forbidden":
            key = str(err["loc"][-1])
            parent = _fields_at(err["loc"][:-1])
            hint = _suggest(key, parent) if parent else ""
            msg = f"unknown key{hint}"
        elif typ == "value_error":
            raw = str(err["ctx"].get("error", err["msg"])) if err.get("ctx") else err["msg"]
            for sub in raw.splitlines():
                if sub.startswith("[") and "]" in sub:  # list-item errors carry their index
                    idx, rest = sub.split("]", 1)
                    line = f"{path}{idx}]:{rest}"
                elif re.match(r"^[a-z_]+(\[\d+\])?(\.|:)", sub) and ":" in sub:
                    line = sub  # model-level errors name their own path
                else:
                    line = f"{path}: {sub}"
                if line not in seen:
                    seen.add(line)
                    lines.append(line)
            continue
        else:
            msg = MESSAGES.get(typ, lambda e: e["msg"][0].lower() + e["msg"][1:])(err)
        line = f"{path}: {msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the model found by walking `loc` from StudySpec."""
    model: Any = StudySpec
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    return list(getattr(model, "model_fields", {}).keys()) if model is not None else []


def _model_of(annotation) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def parse_spec(data: Any) -> StudySpec:
    if not isinstance(data, dict):
        raise UserError("spec: expected a mapping at the top level")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(*format_errors(exc)) from None


def load_spec(path: str | Path) -> StudySpec:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"spec file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{p}{where}: YAML syntax error: {problem}") from None
    return parse_spec(data)
