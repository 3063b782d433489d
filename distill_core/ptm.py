"""Training a pre-trained model (PTM) or an MTT expert, with checkpoints per epoch.

Three recipes (`recipe(name, ...)` gives a PTMConfig's training fields):
- "ptm" (paper 2, DDInterpreter `train_original_models.py`): SGD lr 0.01,
  momentum 0.9, weight decay 0.005, batch 256, lr x0.1 after epochs 50 and 100
  (absolute, as upstream: a shorter run is upstream's early checkpoint, at the
  constant lr 0.01, not a compressed schedule), no augmentation, normalised data.
- "expert" (MTT's buffer.py): SGD lr 0.01 with no momentum and no weight
  decay, a constant lr, batch 256, DSA augmentation with parameters per
  sample, 50 epochs upstream; every epoch's checkpoint is an MTT trajectory.
- "lff": the "ptm" recipe with `objective="lff"`: Learning from Failure (Nam et
  al. 2020; `distill_core.debias.lff`) trains a bias-capturing and a debiased
  network together, and the debiased one's checkpoints are kept. Deviation from
  upstream LfF (alinlab/LfF train.py, Adam lr 1e-3): ddray keeps paper 2's PTM
  optimiser and schedule, so an lff PTM differs from a ptm PTM only in its
  objective.
Epoch 0 (the initialisation) is kept as a checkpoint too. A `RealData` carrying
debiasing weights (`distill_core.debias`) is sampled by weight, with replacement,
instead of permuted (MTT's experts on reweighted data: Cui et al. 2024's recipe
for trajectory matching); unweighted data takes the permutation path unchanged.

`PTMConfig.objective` is "ce" (plain cross-entropy, `train_ptm`'s own loop) or
"lff"; LfF's two fields (`gce_q`, `ema_alpha`) are left out of a "ce" config's
dump, so every "ce" PTM's stage key is what it was before LfF existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import Field, model_serializer, model_validator

from distill_core.augment import make_augmentation
from distill_core.config import Config
from distill_core.networks import build_network
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData
from distill_core.tiling import ce_sum
from distill_core.training import train_epoch

RecipeName = Literal["ptm", "expert", "lff"]
PTM_MILESTONES = (50, 100)  # paper 2's lr drops (epochs), whatever the run's length
LFF_FIELDS = ("objective", "gce_q", "ema_alpha")  # absent from a "ce" config's dump (its key is unchanged)


class PTMConfig(Config):
    arch: str = "convnet"
    arch_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    epochs: int = Field(default=150, ge=1, le=100_000)
    lr: float = Field(default=0.01, gt=0, le=100)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.005, ge=0, le=1)
    batch_size: int = Field(default=256, ge=1, le=100_000)
    milestones: list[int] = Field(default_factory=list)  # lr x0.1 after each of these epochs
    augment: str | None = None  # per-sample augmentation while training (distill_core.augment names)
    # the epochs whose checkpoints are kept; None keeps every epoch (needed for MTT)
    keep_epochs: list[Annotated[int, Field(ge=0, le=100_000)]] | None = Field(default=None, max_length=100_000)
    # "ce": plain cross-entropy; "lff": Learning from Failure's pair (distill_core.debias.lff)
    objective: Literal["ce", "lff"] = "ce"
    gce_q: float = Field(default=0.7, gt=0, le=1)  # LfF: q of the bias model's generalised cross-entropy
    ema_alpha: float = Field(default=0.7, ge=0, lt=1)  # LfF: the per-sample loss EMA's decay

    @model_validator(mode="after")
    def _lff_fields_need_lff(self):
        # a "ce" dump drops gce_q/ema_alpha, so a non-default value there would not round-trip: refuse it
        if self.objective == "ce" and (self.gce_q != 0.7 or self.ema_alpha != 0.7):
            raise ValueError("gce_q and ema_alpha apply only to objective 'lff'")
        return self

    @model_serializer(mode="wrap")
    def _drop_lff_fields_for_ce(self, handler):
        data = handler(self)
        if self.objective == "ce" and isinstance(data, dict):
            for name in LFF_FIELDS:
                data.pop(name, None)
        return data


def recipe(name: RecipeName, epochs: int, dsa_strategy: str) -> dict:
    """The training fields of a named recipe for a run of `epochs` epochs."""
    if name == "ptm":
        return {"momentum": 0.9, "weight_decay": 0.005, "augment": None,
                "milestones": [m for m in PTM_MILESTONES if m < epochs]}
    if name == "expert":
        return {"momentum": 0.0, "weight_decay": 0.0, "augment": f"dsa:{dsa_strategy}", "milestones": []}
    if name == "lff":
        # paper 2's PTM optimiser, not upstream LfF's Adam lr 1e-3: only the objective differs from "ptm"
        return {**recipe("ptm", epochs, dsa_strategy), "objective": "lff"}
    raise ValueError(f"unknown PTM recipe '{name}' (ptm | expert | lff)")


@dataclass
class PTMResult:
    checkpoints: dict[int, dict[str, torch.Tensor]]  # epoch -> state_dict (epoch 0 = initialisation)
    history: list[dict]
    scores: torch.Tensor | None = None  # lff: the final relative difficulty W of every real sample (float32)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    model.train()
    return correct / max(1, len(labels))


class Checkpoints:
    """What every PTM training loop keeps per epoch: the history, the kept checkpoints of `model` (epoch 0, the
    initialisation, included when kept) and the lr drops at the config's milestones."""

    def __init__(self, cfg: PTMConfig, model: torch.nn.Module, optimisers: list, val=None, progress=None):
        self.cfg, self.model, self.optimisers, self.val, self.progress = cfg, model, optimisers, val, progress
        self.keep = set(cfg.keep_epochs) if cfg.keep_epochs is not None else None
        self.history: list[dict] = []
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        self._snapshot(0)

    def _snapshot(self, epoch: int) -> None:
        if self.keep is None or epoch in self.keep:
            self.kept[epoch] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def end_epoch(self, epoch: int, record: dict) -> None:
        """After an epoch: drop the lr at a milestone, score the held-out split, keep the record and checkpoint."""
        if epoch in self.cfg.milestones:
            for opt in self.optimisers:
                for group in opt.param_groups:
                    group["lr"] *= 0.1
        record = {"epoch": epoch, **record}
        if self.val is not None:
            record["val_acc"] = accuracy(self.model, *self.val)
        self.history.append(record)
        self._snapshot(epoch)
        if self.progress is not None:
            self.progress(epoch, record)

    def result(self, scores: torch.Tensor | None = None) -> "PTMResult":
        return PTMResult(self.kept, self.history, scores=scores)


# objective -> its training loop, each `(real, cfg, val=None, runtime=..., progress=None) -> PTMResult`: "ce"
# here, "lff" registered by distill_core.debias.lff (which imports this module, so it cannot be imported here)
OBJECTIVES: dict[str, Callable[..., "PTMResult"]] = {}


def train_ptm(real: RealData, cfg: PTMConfig, val: tuple[torch.Tensor, torch.Tensor] | None = None,
              runtime: Runtime = DEFAULT_RUNTIME, progress=None) -> PTMResult:
    """Train one PTM with its config's objective."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"PTM objective '{cfg.objective}' is not registered (import distill_core.debias, "
                         f"which registers lff; known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[cfg.objective](real, cfg, val=val, runtime=runtime, progress=progress)


def train_ce(real: RealData, cfg: PTMConfig, val: tuple[torch.Tensor, torch.Tensor] | None = None,
             runtime: Runtime = DEFAULT_RUNTIME, progress=None) -> PTMResult:
    """Plain cross-entropy training (recipes ptm and expert)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    channels, size = real.shape[0], real.shape[-1]
    model = build_network(cfg.arch, channels, real.num_classes, size, **cfg.arch_options).to(real.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    augment = make_augmentation(cfg.augment)
    tile = runtime.tile_for(model)
    log = Checkpoints(cfg, model, [opt], val, progress)
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        # debiasing weights on the data (an expert pool's `debias`): epochs drawn by weight, else permutations
        stats = train_epoch(model, opt, real.images, real.labels, cfg.batch_size, g, augment, tile, ce_sum,
                            weights=real.weights)
        log.end_epoch(epoch, {"train_loss": stats.loss, "train_acc": stats.acc})
    return log.result()


OBJECTIVES["ce"] = train_ce
