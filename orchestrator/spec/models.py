"""The study spec: pydantic v2 models loaded from YAML (safe loader), version 1.

Unknown keys are rejected everywhere, numbers must be finite and within
stated bounds. Lists are grids: every combination of dataset variant
(aligned ratio x severity), method, IPC, learning rate, iteration count,
guidance setting, method option value and distillation seed becomes one
distillation stage (a guidance entry restricted by its `methods` / `ipc`
only at those); every (synthetic set x evaluation architecture) becomes
one evaluation stage. What each method is (defaults, options, evaluation
protocol, inputs) comes from `distill_core.methods`'s registry: nothing here
names a method. Problems come back as one line each, naming the field path
(`orchestrator.spec.problems`); checks across fields live in
`orchestrator.spec.checks`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    model_serializer,
    model_validator,
)

from distill_core.data.biased import DatasetConfig
from distill_core.data.colored import SEVERITY_SIGMA
from distill_core.data.sources import SOURCES
from distill_core.debias import DEBIAS_KINDS, DebiasConfig
from distill_core.evaluation import EvalConfig
from distill_core.guidance import GuidanceConfig
from distill_core.methods import METHODS, DistillConfig
from distill_core.networks import ARCHITECTURES
from distill_core.ptm import PTMConfig
from distill_core.runtime import Runtime
from orchestrator.errors import suggest
from orchestrator.spec.base import Strict, as_list, bounded, same
from orchestrator.spec.claims import ClaimSpec
from orchestrator.spec.search import SearchSpec

MAX_GRID = 1000  # entries in one grid list


MAX_HISTORY = 1_000_000  # history records one distillation keeps: iterations / log_every (a trial: iterations)


MAX_KEPT_CHECKPOINTS = 1_001  # checkpoints one PTM stage keeps (every epoch of 1,000 epochs, and epoch 0)


def Grid(item: Any, min_length: int = 1) -> Any:  # noqa: N802 (a type factory)
    """A grid axis: a list (a scalar is a one-point grid)."""
    return Annotated[list[item], BeforeValidator(as_list), Field(min_length=min_length, max_length=MAX_GRID)]


def _known(kind: str, registry) -> AfterValidator:
    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {kind} '{name}'{suggest(name, registry)}")
        return name
    return AfterValidator(check)


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


MethodName = Annotated[str, _known("method", METHODS)]


Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]



class ArchSpec(Strict):
    """An architecture by registry name, with the overrides that architecture takes."""

    name: Annotated[str, _known("architecture", ARCHITECTURES)]
    width: int | None = Field(default=None, ge=1, le=4096)
    depth: int | None = Field(default=None, ge=1, le=16)
    norm: Literal["instancenorm", "batchnorm", "groupnorm", "layernorm", "none"] | None = None
    act: Literal["relu", "leakyrelu", "sigmoid"] | None = None
    pool: Literal["avgpooling", "maxpooling", "none"] | None = None

    @model_validator(mode="before")
    @classmethod
    def from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def options(self) -> dict:
        return self.model_dump(exclude={"name"}, exclude_none=True)

    @property
    def label(self) -> str:
        return self.name + "".join(f"-{k}{v}" for k, v in sorted(self.options.items()))


class TrackingSpec(Strict):
    uri: str = Field(default="sqlite:///mlflow.db", min_length=1, max_length=2000)
    experiment: str | None = Field(default=None, min_length=1, max_length=250)  # default: ddray/<name>


class StoreSpec(Strict):
    root: str = Field(default="./ddray-store", min_length=1, max_length=1000)


class DatasetSpec(Strict):
    name: Name
    source: Annotated[same(DatasetConfig, "source"), _known("source", SOURCES)]
    bias: same(DatasetConfig, "bias")
    aligned_ratios: Grid(bounded(DatasetConfig, "aligned_ratio")) = [0.95]
    severities: Grid(Literal[tuple(SEVERITY_SIGMA)]) = [1]
    max_per_class: same(DatasetConfig, "max_per_class")
    # the share of train held out for validation; None: 0.1 when the study needs a held-out split
    # (evaluation.selection: val, or a search's proxy), else 0 (as upstream: distil from the whole split)
    val_fraction: bounded(DatasetConfig, "val_fraction") | None = None
    # biased data: a held-out split as biased as training, or balanced over (class, attribute) groups
    val_split: same(DatasetConfig, "val_split")
    data_root: str | None = Field(default=None, max_length=1000)
    seed: same(DatasetConfig, "seed")
    zca: same(DatasetConfig, "zca")  # ZCA whitening (MTT's CIFAR setting) instead of per-channel standardisation
    distill: bool = True  # false: only a PTM source (e.g. CIFAR-100 PTMs guiding CIFAR-10)
    # the source's images resized to image_size and converted to `channels` (grey -> RGB by replication,
    # RGB -> grey by luma) before the bias builder: a PTM source of another shape than the targets (MNIST
    # PTMs for 3x32x32 CIFAR-10). None: the source's own. Source imagefolder declares both sizes here.
    image_size: same(DatasetConfig, "image_size")
    channels: same(DatasetConfig, "channels")
    num_classes: int | None = Field(default=None, ge=2, le=100_000)  # declared by source imagefolder only

    @model_validator(mode="after")
    def bias_fits_source(self) -> "DatasetSpec":
        src = SOURCES[self.source]
        if src.image_size is None or src.num_classes is None:  # a local folder: validation reads nothing
            missing = [f for f in ("data_root", "image_size", "num_classes") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"source '{self.source}' needs {', '.join(missing)} (the folder, the image "
                                 "size to read it at, and its number of class folders)")
        elif self.num_classes is not None:
            raise ValueError(f"num_classes: only source imagefolder declares it ('{self.source}' has "
                             f"{src.num_classes} classes)")
        if self.channels is not None and self.channels != src.channels:
            if self.bias == "colored" and self.channels == 3:
                raise ValueError("bias 'colored' colours grey images: leave channels unset (or 1)")
            if self.bias == "corrupted" and self.channels == 1:
                raise ValueError("bias 'corrupted' corrupts RGB images: leave channels unset (or 3)")
            return self  # converted to the channels the bias builder takes
        grey = src.grayscale
        if self.bias == "colored" and not grey:
            names = ", ".join(sorted(n for n, s in SOURCES.items() if s.grayscale))
            raise ValueError(f"bias 'colored' needs a grayscale source ({names})")
        if self.bias == "corrupted" and grey:
            names = ", ".join(sorted(n for n, s in SOURCES.items() if not s.grayscale))
            raise ValueError(f"bias 'corrupted' needs an RGB source ({names})")
        return self

    def holdout(self, needed: bool) -> float:
        """The share of train held out: as set, else 0.1 where the study needs a held-out split, else 0."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.1 if needed else 0.0

    def variants(self) -> list[tuple[float, int]]:
        if self.bias == "none":
            return [(1.0, 0)]  # no attribute: one variant
        return [(p, s) for p in self.aligned_ratios for s in self.severities]


DEBIAS_FIELDS = ("kind", "pool")  # a debias entry's own fields; every other key is an option of its kind


class DebiasSpec(Strict):
    """One entry of the `distillation.debias` axis: a kind of `distill_core.debias`'s registry, the ptm pool it
    reads where it reads one (kde's `embedding: network`, lff's scores) and the kind's own typed options, written
    flat beside `kind` (`{kind: kde, bandwidth: 0.3}`) and checked against the kind's model (`spec.checks`)."""

    kind: Annotated[same(DebiasConfig, "kind"), _known("debias kind", DEBIAS_KINDS)] = "none"
    pool: str | None = None
    options: same(DebiasConfig, "options")

    @model_validator(mode="before")
    @classmethod
    def flat(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if not isinstance(value, (dict, DebiasSpec)):
            raise ValueError(f"expected a debias kind ({', '.join(sorted(DEBIAS_KINDS))}) or a mapping "
                             f"{{kind: NAME, ...options}}, got {value!r}")
        if isinstance(value, dict) and "options" not in value:
            return {**{k: v for k, v in value.items() if k in DEBIAS_FIELDS},
                    "options": {k: v for k, v in value.items() if k not in DEBIAS_FIELDS}}
        return value

    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict:
        data = handler(self)
        return {"kind": data["kind"], **({"pool": data["pool"]} if data["pool"] else {}), **data["options"]}

    @property
    def label(self) -> str:
        """`none`, `kde`, `kde:erm@bandwidth=0.3`, `lff:lff-pool`, `groups`: what rows and reports name."""
        label = self.kind + (f":{self.pool}" if self.pool else "")
        options = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.options.items()))
        return label + (f"@{options}" if options else "")

    @property
    def oracle(self) -> bool:
        """Reads the bias attribute labels (FairDD's groups): not a method a user without them can run."""
        return DEBIAS_KINDS[self.kind].needs_attributes


class PTMPoolSpec(Strict):
    name: Name
    dataset: str
    # a fixed variant of the dataset; unset = the distillation target's own variant
    aligned_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    severity: int | None = Field(default=None, ge=1, le=4)
    architectures: list[ArchSpec] = Field(min_length=1, max_length=MAX_GRID)
    seeds: Grid(bounded(PTMConfig, "seed")) = [0]
    # "ptm": paper 2's recipe (150 epochs); "expert": MTT's buffer recipe (50 epochs), for trajectories;
    # "lff": paper 2's recipe with LfF's objective (a debiased PTM, and scores for `debias: lff`; 150 epochs)
    recipe: Literal["ptm", "expert", "lff"] = "ptm"
    epochs: bounded(PTMConfig, "epochs") | None = None  # None: the recipe's (150 / 50)
    checkpoint_epochs: same(PTMConfig, "keep_epochs")  # the checkpoints kept; None = every epoch
    lr: same(PTMConfig, "lr")
    batch_size: same(PTMConfig, "batch_size")
    # train on debiased data: each epoch drawn by these weights (a weights stage on the pool's source variant),
    # e.g. MTT's experts on reweighted data (Cui et al. 2024's recipe for trajectory matching); none: unweighted
    debias: DebiasSpec = DebiasSpec()

    @model_serializer(mode="wrap")
    def _undebiased_as_before(self, handler) -> dict:
        """An unweighted pool (`debias: none`) dumps as before debias existed, so its study keeps its id."""
        data = handler(self)
        if data.get("debias") == {"kind": "none"}:
            data.pop("debias")
        return data

    @property
    def train_epochs(self) -> int:
        return self.epochs or {"ptm": 150, "expert": 50, "lff": 150}[self.recipe]

    @model_validator(mode="after")
    def checkpoints_bounded(self) -> "PTMPoolSpec":
        epochs = self.train_epochs
        if self.checkpoint_epochs is None:
            if epochs + 1 > MAX_KEPT_CHECKPOINTS:
                raise ValueError(f"epochs: keeping every epoch (checkpoint_epochs unset) of {epochs:,} epochs is "
                                 f"{epochs + 1:,} checkpoints in one stage; at most {MAX_KEPT_CHECKPOINTS:,} "
                                 "(list the epochs to keep in checkpoint_epochs)")
        elif len(self.checkpoint_epochs) > min(epochs + 1, MAX_KEPT_CHECKPOINTS):
            raise ValueError(f"checkpoint_epochs: {len(self.checkpoint_epochs):,} entries, but a pool keeps at most "
                             f"{min(epochs + 1, MAX_KEPT_CHECKPOINTS):,} checkpoints (epochs 0..{epochs:,}, "
                             f"at most {MAX_KEPT_CHECKPOINTS:,})")
        return self


RESTRICTIONS = ("methods", "ipc")  # GuidanceSpec fields saying where an entry runs


class GuidanceSpec(Strict):
    kind: Literal["none", "clom", "cclom"] = "none"
    pool: str | None = None
    alpha: same(GuidanceConfig, "alpha")
    checkpoint_epochs: same(GuidanceConfig, "checkpoint_epochs")
    real_batch: same(GuidanceConfig, "real_batch")
    # where the entry runs: the study's methods and IPCs it is crossed with (None: every one), e.g. a
    # published alpha at its own (method, IPC) cells only; not part of the guidance itself (nor its label)
    methods: Grid(MethodName) | None = None
    ipc: Grid(bounded(DistillConfig, "ipc")) | None = None

    @model_validator(mode="before")
    @classmethod
    def from_string(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _unrestricted_as_before(self, handler) -> dict:
        """An unset restriction is left out, so an unrestricted entry (and the study id) dumps as it did."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in RESTRICTIONS and v is None)}

    def applies(self, method: str, ipc: int) -> bool:
        """Whether the entry runs at a (method, IPC) cell of the study."""
        return (self.methods is None or method in self.methods) and (self.ipc is None or ipc in self.ipc)

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
    methods: Grid(MethodName)  # registry names (distill_core.methods.METHODS)
    ipc: Grid(bounded(DistillConfig, "ipc")) = [10]
    iterations: Grid(bounded(DistillConfig, "iterations")) | None = None  # None: each method's default
    lr_img: Grid(bounded(DistillConfig, "lr_img")) | None = None  # None: each method's default
    seeds: Grid(bounded(DistillConfig, "seed")) = [0]  # distillation repeats: mean +- std over seeds x networks
    arch: ArchSpec = ArchSpec(name="convnet")
    batch_real: same(DistillConfig, "batch_real")
    lr_net: same(DistillConfig, "lr_net")
    init: bounded(DistillConfig, "init") | None = None  # None: the method's default
    # DSA strategy for methods that distil with augmentation: auto (no flip for digits), none, or a strategy
    augmentation: str = Field(default="auto", min_length=1, max_length=200)
    guidance: list[GuidanceSpec] = Field(default=[GuidanceSpec()], min_length=1, max_length=MAX_GRID)
    # bias-aware weighting of the real samples (distill_core.debias), a grid axis like guidance: every entry
    # crossed with every method that takes weights (`Method.takes_weights`); none is the unweighted recipe
    debias: Grid(DebiasSpec) = [DebiasSpec()]
    trajectories: str | None = None  # a ptm pool (recipe expert) whose per-epoch checkpoints are MTT's experts
    # per-method options, each value a grid axis: {mtt: {syn_steps: [20, 30]}} (checked by the method's model)
    options: dict[MethodName, dict[str, Any]] = Field(default_factory=dict)
    log_every: same(DistillConfig, "log_every")
    search: SearchSpec | None = None  # a Ray Tune search per distillation setting (orchestrator.spec.search)

    @model_serializer(mode="wrap")
    def _undebiased_as_before(self, handler) -> dict:
        """The default axis (`debias: [none]`) is left out, so a study without debiasing keeps its id."""
        data = handler(self)
        if data.get("debias") == [{"kind": "none"}]:
            data.pop("debias")
        return data

    @model_validator(mode="after")
    def history_bounded(self) -> "DistillationSpec":
        """A distillation keeps iterations / log_every history records (a search's trial: every iteration)."""
        longest = max(self.iterations or [METHODS[m].iterations for m in self.methods if METHODS[m].optimises_images],
                      default=0)
        if longest // self.log_every > MAX_HISTORY:
            raise ValueError(f"log_every: {longest:,} iterations every {self.log_every:,} keep "
                             f"{longest // self.log_every:,} history records per distillation; at most "
                             f"{MAX_HISTORY:,} (raise log_every)")
        domain = self.search.space.get("iterations") if self.search is not None else None
        searched = [v for v in (domain.value if domain is not None else [])
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        longest = max([*searched, longest if domain is None else 0])
        if self.search is not None and longest > MAX_HISTORY:
            raise ValueError(f"search: a trial keeps every iteration's record, {longest:,} iterations; at most "
                             f"{MAX_HISTORY:,}")
        return self


class EvaluationSpec(Strict):
    architectures: list[ArchSpec] = Field(default=[ArchSpec(name="convnet")], min_length=1, max_length=MAX_GRID)
    repeats: same(EvalConfig, "repeats")
    epochs: bounded(EvalConfig, "epochs") | None = None  # None: each method's protocol (300 / 1000)
    # auto (each method's protocol), none, dsa, dc, or dsa:<strategy> / dc:<strategy>
    augmentation: str = Field(default="auto", min_length=1, max_length=200)
    lr: same(EvalConfig, "lr")  # None: 0.01, or MTT's learned lr
    batch_size: same(EvalConfig, "batch_size")
    checkpoints: same(EvalConfig, "checkpoints")  # validation checks over training
    # the reported checkpoint: last (the final epoch, as upstream) or val (best on the held-out split);
    # rows carry both (acc_last, acc_val_selected) whenever a held-out split exists
    selection: same(EvalConfig, "selection")
    # a random real subset at each IPC, evaluated with each method's protocol: rows get acc_random and ior
    random_baseline: bool = True


RETRYABLE = {"MemoryError": MemoryError, "OSError": OSError, "TimeoutError": TimeoutError,
             "ConnectionError": ConnectionError}  # application errors a stage kind may list in retry_on


class StageResources(Strict):
    cpus: float = Field(default=1.0, gt=0, le=1024)
    gpus: float = Field(default=0.0, ge=0, le=64)
    memory_gb: float | None = Field(default=None, gt=0, le=100_000)  # Ray memory=, so Ray does not over-pack
    # a worker or node that dies is retried this many times; application errors only if listed in retry_on
    retries: int = Field(default=3, ge=0, le=100)
    retry_on: list[Literal[tuple(RETRYABLE)]] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0, le=30 * 86400)  # a stage running longer fails
    pending_warning_s: float = Field(default=300.0, gt=0, le=86400)  # warn when a stage waits this long for a node
    custom: dict[str, Annotated[float, Field(gt=0, le=1e6)]] = Field(default_factory=dict)  # Ray custom resources


class CoordinatorResources(StageResources):
    """A search stage: Tune's controller, which computes nothing itself (its trials hold the resources)."""

    cpus: float = Field(default=0.0, ge=0, le=1024)


class ResourcesSpec(Strict):
    # tasks: one Ray task per stage; actors: warm actors per stage kind, routed by the dataset they hold
    executor: Literal["tasks", "actors"] = "tasks"
    dataset: StageResources = StageResources()
    ptm: StageResources = StageResources()
    weights: StageResources = StageResources()  # debiasing weights (distill_core.debias), one per variant x entry
    distill: StageResources = StageResources()
    evaluate: StageResources = StageResources()
    search: CoordinatorResources = CoordinatorResources()
    external: StageResources = StageResources()  # importing a synthetic set made elsewhere (ddray evaluate)
    trial: StageResources = StageResources()  # each trial of a search (a Tune trial actor)


class RuntimeSpec(Runtime):
    """How stages run (never part of a key); the device comes from resources.<kind>.gpus."""

    @model_validator(mode="after")
    def no_device(self) -> "RuntimeSpec":
        if "device" in self.model_fields_set:
            raise ValueError("device: set by resources.<kind>.gpus, not here")
        return self


class StudySpec(Strict):
    version: Literal[1]
    name: Name
    seed: Seed = 0
    tracking: TrackingSpec = TrackingSpec()
    store: StoreSpec = StoreSpec()
    datasets: list[DatasetSpec] = Field(min_length=1, max_length=MAX_GRID)
    ptm_pools: list[PTMPoolSpec] = Field(default_factory=list, max_length=MAX_GRID)
    distillation: DistillationSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    findings: list[ClaimSpec] = Field(default_factory=list, max_length=MAX_GRID)  # claims over result rows

    @property
    def needs_holdout(self) -> bool:
        """Whether any stage reads a held-out validation split: val selection, or a search's proxy."""
        return self.evaluation.selection == "val" or self.distillation.search is not None

    def spec_hash(self) -> str:
        """Hash of what the study computes: not how or where (resources, runtime, tracking, store,
        and where a dataset's raw files are read from), nor the claims it is read against (`findings`: a claim
        added to a finished study is tested on the same study)."""
        science = self.model_dump(mode="json", exclude={"resources": True, "runtime": True, "tracking": True,
                                                        "store": True, "findings": True,
                                                        "datasets": {"__all__": {"data_root"}}})
        return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()

    @property
    def study_id(self) -> str:
        return f"{self.name}-{self.spec_hash()[:8]}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"ddray/{self.name}"
