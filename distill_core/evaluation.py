"""The evaluation protocol: train fresh networks on a synthetic set, test honestly.

Upstream protocol: SGD lr 0.01 (or MTT's learned lr), momentum 0.9, weight
decay 5e-4, batch 256, lr x0.1 from epoch E//2 + 1; E = 300 without and 1000
with DSA augmentation. Model selection uses a validation split held out from
the real training data (`BiasedDataset.val_index`): the checkpoint with the
best validation accuracy is the one reported. Never the maximum over test
checkpoints (upstream MTT's pitfall).

Reported per network: accuracy on the bias-conflicting test set (p = 0), on
the unbiased test set (p = 0.1), and on its aligned vs conflicting samples,
plus per-class accuracy on the conflicting test set.

Speed (measured by benchmarks/methods.py, part b). Validation runs at the
check epochs, but the test sets are predicted once, from the snapshot of the
best-validation checkpoint, as upstream tests once after training. On CPU
each SGD step runs its batch in cache-sized tiles of `tile` samples with the
gradients summed (exact for networks that treat samples independently, i.e.
without BatchNorm in train mode): the memory-bound norm/activation/pool passes
then stay in cache, and long CPU evaluations compile the training
forward/backward (torch.compile fuses those passes). Several repeats of a
ConvNet-family architecture train at once as one grouped network on CUDA
(`distill_core.grouped`); on CPU oneDNN's grouped convolutions are slower than
one network at a time, so repeats run one after another there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from distill_core.augment import SiameseAugment
from distill_core.compiled import MaybeCompiled, compile_wanted
from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES, BiasedDataset
from distill_core.grouped import FoldedConvNet, can_fold, stacked_loss
from distill_core.methods.base import SyntheticSet
from distill_core.networks import build_network
from distill_core.tiling import batch_ce, batch_loss_backward, default_tile


@dataclass
class EvalConfig:
    arch: str = "convnet"
    arch_options: dict = field(default_factory=dict)
    epochs: int = 300
    lr: float | None = None  # None: the synthetic set's learned lr, else 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = False
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    checkpoints: int = 10  # validation checks spread over training (plus the last epoch)
    seed: int = 0
    # train all repeats as one grouped network; None: on CUDA when the arch folds (on CPU,
    # grouped convolutions measured slower than one network at a time: benchmarks/methods.py)
    fold: bool | None = None
    # samples per forward/backward within a batch (gradients summed); None: distill_core.tiling's
    # default (TILE_CPU on CPU for networks without BatchNorm, else the whole batch); 0: never tile
    tile: int | None = None
    # images per no-grad forward when predicting; None: PREDICT_BATCH_CPU on CPU, 1024 elsewhere
    predict_batch: int | None = None
    # torch.compile the training forward/backward: True/False, or "auto" for CPU evaluations of at
    # least COMPILE_MIN_NETWORK_EPOCHS (repeats x epochs): 1.45x per step measured, ~30 s to compile
    compile: bool | str = "auto"


COMPILE_MIN_NETWORK_EPOCHS = 1000
PREDICT_BATCH_CPU = 32  # measured 1.9x faster than 256-1024 for ConvNet-128 on 1 core (cache-resident)


@dataclass
class EvalSets:
    """Normalised evaluation tensors for one dataset variant, built once per stage."""

    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    unbiased: tuple[torch.Tensor, torch.Tensor]
    unbiased_aligned: torch.Tensor | None  # bool mask over the unbiased set
    num_classes: int

    @classmethod
    def from_dataset(cls, ds: BiasedDataset, norm, device) -> "EvalSets":
        def prep(x, y):
            return norm.apply(x).to(device), y.to(device)
        mask = aligned_mask(ds.unbiased_labels, ds.unbiased_attrs, NUM_ATTRIBUTES).to(device) if ds.has_bias else None
        return cls(prep(*ds.val_split()), prep(ds.test_images, ds.test_labels),
                   prep(ds.unbiased_images, ds.unbiased_labels), mask, ds.num_classes)


def validation_epochs(cfg: EvalConfig) -> set[int]:
    """`cfg.checkpoints` epochs spread over training, always including the last."""
    return {cfg.epochs} | {max(1, round(cfg.epochs * (i + 1) / cfg.checkpoints)) for i in range(cfg.checkpoints)}


def training_lr(cfg: EvalConfig, syn: SyntheticSet) -> float:
    """The configured lr, else the synthetic set's learned one (MTT), else upstream's 0.01."""
    if cfg.lr is not None:
        return cfg.lr
    return syn.lr if syn.lr is not None else 0.01


def decay_lr(opt: torch.optim.Optimizer, epoch: int, cfg: EvalConfig) -> None:
    """Upstream's schedule: lr x0.1 from epoch E//2 + 1."""
    if epoch == cfg.epochs // 2 + 1:
        for group in opt.param_groups:
            group["lr"] *= 0.1


def step_tile(cfg: EvalConfig, model: torch.nn.Module, device: torch.device) -> int | None:
    """Samples per forward/backward within a batch, or None for the whole batch."""
    if cfg.tile is not None:
        return cfg.tile or None
    return default_tile(model, device)


def predict_batch(cfg: EvalConfig, device: torch.device) -> int:
    if cfg.predict_batch is not None:
        return cfg.predict_batch
    return PREDICT_BATCH_CPU if device.type == "cpu" else 1024


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def _acc(pred, labels, mask=None) -> float:
    if mask is not None:
        pred, labels = pred[mask], labels[mask]
    return float((pred == labels).float().mean()) if len(labels) else math.nan


def test_metrics(model, sets: EvalSets, batch_size: int = 1024) -> dict:
    return metrics_from_predictions(predict(model, sets.test[0], batch_size),
                                    predict(model, sets.unbiased[0], batch_size), sets)


def metrics_from_predictions(pred_test: torch.Tensor, pred_unb: torch.Tensor, sets: EvalSets) -> dict:
    y_test, y_unb = sets.test[1], sets.unbiased[1]
    per_class = [_acc(pred_test, y_test, y_test == c) for c in range(sets.num_classes)]
    m = sets.unbiased_aligned
    return {
        "acc": _acc(pred_test, y_test),
        "acc_unbiased": _acc(pred_unb, y_unb),
        "acc_aligned": _acc(pred_unb, y_unb, m) if m is not None else math.nan,
        "acc_conflicting": _acc(pred_unb, y_unb, ~m) if m is not None else math.nan,
        "per_class": per_class,
    }


def train_and_evaluate(syn: SyntheticSet, sets: EvalSets, cfg: EvalConfig, repeat: int = 0) -> dict:
    """Train one fresh network on `syn`; return test metrics at the best-validation checkpoint."""
    device = syn.images.device
    seed = cfg.seed * 1000 + repeat
    g = torch.Generator().manual_seed(seed)
    channels, size = syn.images.shape[1], syn.images.shape[-1]
    model = _seeded_network(cfg, seed, channels, sets.num_classes, size).to(device)
    lr = training_lr(cfg, syn)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    augment = SiameseAugment(cfg.dsa_strategy) if cfg.dsa else None
    tile, chunk = step_tile(cfg, model, device), predict_batch(cfg, device)
    # fixed tile shapes: dynamic=False compiles exactly the shapes the steps have (tile, last tile)
    ce = MaybeCompiled(batch_ce, compile_wanted(cfg.compile, device, cfg.epochs, COMPILE_MIN_NETWORK_EPOCHS),
                       dynamic=False)
    images, labels = syn.images.detach(), syn.labels
    n = len(labels)
    check_at = validation_epochs(cfg)
    best, best_state = {"val_acc": -1.0}, None

    def loss_fn(x, y, reduction):
        return ce(model, x, y, reduction)

    model.train()
    for epoch in range(1, cfg.epochs + 1):
        decay_lr(opt, epoch, cfg)
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = images[idx]
            if augment is not None:  # one transform per batch, as upstream's evaluation
                x = augment(x, int(torch.randint(2**31 - 1, (1,), generator=g)))
            opt.zero_grad(set_to_none=True)
            batch_loss_backward(loss_fn, x, labels[idx], tile)
            opt.step()
        if epoch in check_at:
            val_acc = _acc(predict(model, sets.val[0], chunk), sets.val[1]) if len(sets.val[1]) else 0.0
            if val_acc >= best["val_acc"]:  # ties go to the later, longer-trained checkpoint
                best, best_state = {"val_acc": val_acc, "epoch": epoch}, snapshot(model)
    model.load_state_dict(best_state)
    return {**best, **test_metrics(model, sets, chunk)}


def _seeded_network(cfg: EvalConfig, seed: int, channels: int, num_classes: int, size: int):
    torch.manual_seed(seed)
    return build_network(cfg.arch, channels, num_classes, size, **cfg.arch_options)


def folded_loss(folded: FoldedConvNet, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over the networks of each one's mean ("mean") or summed ("sum") cross-entropy."""
    loss = stacked_loss(folded(x), y)
    return loss * len(y) if reduction == "sum" else loss


@torch.no_grad()
def predict_folded(folded: FoldedConvNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N_images, N_networks) predicted classes; every network sees the same images."""
    was_training = folded.training
    folded.eval()
    out = torch.cat([folded(images[i:i + batch_size].repeat(1, folded.n, 1, 1)).argmax(2)
                     for i in range(0, len(images), batch_size)])
    folded.train(was_training)
    return out


def train_and_evaluate_folded(syn: SyntheticSet, sets: EvalSets, cfg: EvalConfig, repeats: list[int]) -> list[dict]:
    """`train_and_evaluate` for several repeats at once, as one grouped network.

    Each network keeps its own initialisation, shuffling and augmentation
    stream (its own generator, consumed in the same order as the one-network
    loop), so the results equal the one-at-a-time loop up to float rounding.
    """
    device = syn.images.device
    seeds = [cfg.seed * 1000 + r for r in repeats]
    channels, size = syn.images.shape[1], syn.images.shape[-1]
    models = [_seeded_network(cfg, s, channels, sets.num_classes, size) for s in seeds]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    folded = FoldedConvNet(models).to(device)
    lr = training_lr(cfg, syn)
    opt = torch.optim.SGD(folded.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    augment = SiameseAugment(cfg.dsa_strategy) if cfg.dsa else None
    tile = step_tile(cfg, models[0], device)  # tiles of 16/N images measured slower than 16
    chunk = max(1, predict_batch(cfg, device) // len(seeds))  # the folded network is N networks wide
    images, labels = syn.images.detach(), syn.labels
    n = len(labels)
    check_at = validation_epochs(cfg)
    best = [{"val_acc": -1.0} for _ in seeds]
    snapshots: dict[int, dict] = {}  # epoch -> folded weights, while some network's best is that epoch

    def loss_fn(x, y, reduction):  # eager: compiling the grouped network measured slower on CPU
        return folded_loss(folded, x, y, reduction)

    folded.train()
    for epoch in range(1, cfg.epochs + 1):
        decay_lr(opt, epoch, cfg)
        perms = [torch.randperm(n, generator=g).to(device) for g in gens]
        for i in range(0, n, cfg.batch_size):
            xs, ys = [], []
            for perm, g in zip(perms, gens):
                idx = perm[i:i + cfg.batch_size]
                x = images[idx]
                if augment is not None:
                    x = augment(x, int(torch.randint(2**31 - 1, (1,), generator=g)))
                xs.append(x)
                ys.append(labels[idx])
            opt.zero_grad(set_to_none=True)
            batch_loss_backward(loss_fn, torch.cat(xs, 1), torch.stack(ys, 1), tile)
            opt.step()
        if epoch in check_at:
            val_pred = predict_folded(folded, sets.val[0], chunk) if len(sets.val[1]) else None
            for j in range(len(seeds)):
                val_acc = _acc(val_pred[:, j], sets.val[1]) if val_pred is not None else 0.0
                if val_acc >= best[j]["val_acc"]:
                    best[j] = {"val_acc": val_acc, "epoch": epoch}
                    snapshots.setdefault(epoch, snapshot(folded))
            live = {b["epoch"] for b in best}
            snapshots = {e: state for e, state in snapshots.items() if e in live}
    for epoch, state in snapshots.items():  # test once per distinct best checkpoint
        folded.load_state_dict(state)
        pred_test = predict_folded(folded, sets.test[0], chunk)
        pred_unb = predict_folded(folded, sets.unbiased[0], chunk)
        for j, b in enumerate(best):
            if b["epoch"] == epoch:
                b.update(metrics_from_predictions(pred_test[:, j], pred_unb[:, j], sets))
    return best


def evaluate_synthetic(syn: SyntheticSet, ds: BiasedDataset, cfg: EvalConfig, repeats: int,
                       device: torch.device | str = "cpu", progress=None) -> list[dict]:
    """`repeats` independently initialised networks on `ds`'s held-out sets; one metrics dict per network."""
    syn = SyntheticSet(syn.images.to(device), syn.labels.to(device), syn.norm, syn.lr)
    return evaluate_repeats(syn, EvalSets.from_dataset(ds, syn.norm, device), cfg, repeats, progress)


def evaluate_repeats(syn: SyntheticSet, sets: EvalSets, cfg: EvalConfig, repeats: int, progress=None) -> list[dict]:
    """Repeats 0..repeats-1 on prepared sets, the fastest measured way for the device.

    On CUDA, ConvNet-family networks are trained all at once as one grouped
    network (`distill_core.grouped`), otherwise one at a time; both give the
    same numbers (tests/distill_core/test_evaluation.py checks it).
    """
    if cfg.compile in (None, "auto"):  # the decision weighs the whole evaluation, not one network
        cfg = replace(cfg, compile=compile_wanted("auto", syn.images.device, cfg.epochs * repeats,
                                                  COMPILE_MIN_NETWORK_EPOCHS))
    fold = cfg.fold
    if fold is None:
        fold = repeats > 1 and syn.images.device.type == "cuda" and can_fold(
            _seeded_network(cfg, 0, syn.images.shape[1], sets.num_classes, syn.images.shape[-1]))
    if fold:
        results = train_and_evaluate_folded(syn, sets, cfg, list(range(repeats)))
        if progress is not None:
            for r, res in enumerate(results):
                progress(r, res)
        return results
    results = []
    for r in range(repeats):
        results.append(train_and_evaluate(syn, sets, cfg, repeat=r))
        if progress is not None:
            progress(r, results[-1])
    return results
