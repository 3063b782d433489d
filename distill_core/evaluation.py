"""The evaluation protocol: train fresh networks on a synthetic set, test honestly.

Upstream protocol (DatasetCondensation `evaluate_synset`): SGD lr 0.01 (or
MTT's learned lr), momentum 0.9, weight decay 5e-4, batch 256, E + 1 epochs
(numbered 0..E) with the lr x0.1 after epoch E//2 + 1. Each method has its own
E and augmentation (its registry record's `EvalProtocol`: DC 300 epochs
without augmentation, or DC's crop/scale/rotate for 1000 on MNIST; DSA, DM,
MTT 1000 epochs of DSA), and augmentation draws one transform family per batch
with its parameters per sample, as upstream's non-siamese `DiffAugment`.

Checkpoint selection (`selection`): `last`, the final epoch, as upstream
(DatasetCondensation and DDInterpreter report the network after its last
epoch), or `val`, the checkpoint with the best accuracy on a validation split
held out from the real training data (`BiasedDataset.val_index`) among
`checkpoints` check epochs - never the maximum over test checkpoints (upstream
MTT's pitfall). Both are computed whenever the dataset holds a validation
split: every network reports `acc_last` and `acc_val_selected` (None without
one), and its metrics follow `selection`. For biased data the choice matters:
a validation split as biased as training picks the checkpoint that fits the
shortcut best (see docs/protocols.md).

Reported per network: accuracy on the bias-conflicting test set (p = 0), on
the unbiased test set (p = 0.1), and on its aligned vs conflicting samples,
plus per-class accuracy on the conflicting test set, and the validation
accuracy at every check epoch (`val_curve`: [[epoch, accuracy], ...]).

How it runs is the runtime's business: tiled (and, on long CPU runs,
compiled) steps, prediction batches of 32 on CPU, and on CUDA the repeats of
a ConvNet trained at once as one grouped network (`distill_core.grouped`);
every form gives the same numbers.

The pieces both engines share (config, schedule, seeded networks, metrics,
records) are in `distill_core.evaluation_protocol`; the names callers import
from here are re-exported.
"""

from __future__ import annotations

import torch

from distill_core.augment import make_augmentation
from distill_core.data.biased import BiasedDataset
from distill_core.evaluation_protocol import (
    EvalConfig,
    EvalSets,
    accuracy_of,
    check_selection,
    decay_epoch,
    metrics_from_predictions,
    network_result,
    seeded_network,
    snapshot,
    training_lr,
    validation_epochs,
)
from distill_core.grouped import can_fold, train_and_evaluate_folded
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import SyntheticSet
from distill_core.tiling import ce_sum
from distill_core.training import train_epoch

# EvalConfig, EvalSets and the schedule, metric and record helpers are distill_core.evaluation_protocol's,
# re-exported: callers import them from here
__all__ = [
    "EvalConfig",
    "EvalSets",
    "accuracy_of",
    "check_selection",
    "decay_epoch",
    "evaluate_repeats",
    "evaluate_synthetic",
    "fit",
    "metrics_from_predictions",
    "network_result",
    "predict",
    "proxy_accuracy",
    "seeded_network",
    "snapshot",
    "test_metrics",
    "train_and_evaluate",
    "training_lr",
    "validation_epochs",
]


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def test_metrics(model, sets: EvalSets, batch_size: int = 1024) -> dict:
    return metrics_from_predictions(predict(model, sets.test[0], batch_size),
                                    predict(model, sets.unbiased[0], batch_size), sets)


def fit(syn: SyntheticSet, cfg: EvalConfig, repeat: int = 0, runtime: Runtime = DEFAULT_RUNTIME, loss_fn=None,
        num_classes: int | None = None, on_check=None) -> torch.nn.Module:
    """Train repeat `repeat`'s fresh network on `syn` with the upstream recipe; `on_check(epoch, model)`
    runs at each of `validation_epochs(cfg)`."""
    device = syn.images.device
    g = torch.Generator().manual_seed(cfg.seed * 1000 + repeat)
    k = num_classes or int(syn.labels.max()) + 1
    model = seeded_network(cfg, repeat, syn.images.shape[1], k, syn.images.shape[-1]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=training_lr(cfg, syn), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    augment = make_augmentation(cfg.augment)
    tile = runtime.tile_for(model)
    loss_fn = loss_fn or ce_sum
    images, labels = syn.images.detach(), syn.labels
    check_at = validation_epochs(cfg)

    model.train()
    for epoch in range(cfg.epochs + 1):
        train_epoch(model, opt, images, labels, cfg.batch_size, g, augment, tile, loss_fn)
        if epoch == decay_epoch(cfg):
            for group in opt.param_groups:
                group["lr"] *= 0.1
        if on_check is not None and epoch in check_at:
            on_check(epoch, model)
    return model


def train_and_evaluate(syn: SyntheticSet, sets: EvalSets, cfg: EvalConfig, repeat: int = 0,
                       runtime: Runtime = DEFAULT_RUNTIME, loss_fn=None) -> dict:
    """Train one fresh network on `syn`; test it after its last epoch and at its best-validation checkpoint."""
    check_selection(cfg, sets)
    predict_batch = runtime.predict_batch_size()
    has_val = len(sets.val[1]) > 0
    best, best_state, curve = None, None, []

    def keep_best(epoch, model):
        nonlocal best, best_state
        val_acc = accuracy_of(predict(model, sets.val[0], predict_batch), sets.val[1])
        curve.append([epoch, val_acc])
        if best is None or val_acc >= best["val_acc"]:  # ties go to the later, longer-trained checkpoint
            best, best_state = {"val_acc": val_acc, "epoch": epoch}, snapshot(model)

    model = fit(syn, cfg, repeat, runtime, loss_fn, sets.num_classes, keep_best if has_val else None)
    last = {"epoch": cfg.epochs, **test_metrics(model, sets, predict_batch)}
    at_val = None
    if best is not None and best["epoch"] == cfg.epochs:  # the final epoch's metrics are already known
        at_val = {**last, **best}
    elif best is not None:
        model.load_state_dict(best_state)
        at_val = {**test_metrics(model, sets, predict_batch), **best}
    return network_result(cfg.selection, last, at_val, curve)


def proxy_accuracy(syn: SyntheticSet, val: tuple[torch.Tensor, torch.Tensor], num_classes: int, cfg: EvalConfig,
                   runtime: Runtime = DEFAULT_RUNTIME) -> float:
    """A search's score for a synthetic set: mean validation accuracy of `cfg.repeats` networks trained
    `cfg.epochs` epochs on it (the evaluation recipe, shortened). Only the validation split held out
    from the real training data is read: a search never sees a test set."""
    syn = SyntheticSet(syn.images.detach().clone(), syn.labels.clone(), syn.norm, syn.lr)
    accs = []
    for r in range(cfg.repeats):
        model = fit(syn, cfg, r, runtime, num_classes=num_classes)
        accs.append(accuracy_of(predict(model, val[0], runtime.predict_batch_size()), val[1]))
    return float(sum(accs) / len(accs))


def evaluate_repeats(syn: SyntheticSet, sets: EvalSets, cfg: EvalConfig,
                     runtime: Runtime = DEFAULT_RUNTIME, progress=None) -> list[dict]:
    """Repeats 0..cfg.repeats-1 on prepared sets, in the form the runtime picks (all give the same numbers)."""
    check_selection(cfg, sets)
    shape = (syn.images.shape[1], sets.num_classes, syn.images.shape[-1])
    if cfg.repeats > 1 and runtime.fold_repeats() and can_fold(seeded_network(cfg, 0, *shape)):
        results = train_and_evaluate_folded(syn, sets, cfg, list(range(cfg.repeats)), runtime)
    else:
        # one compile decision for the whole evaluation: calls = networks x (E + 1) epochs x steps x tiles
        n = len(syn.labels)
        tiles = -(-min(n, cfg.batch_size) // (runtime.tile_for(seeded_network(cfg, 0, *shape)) or cfg.batch_size))
        loss_fn = runtime.compiled(ce_sum, cfg.repeats * (cfg.epochs + 1) * -(-n // cfg.batch_size) * tiles)
        results = []
        for r in range(cfg.repeats):
            results.append(train_and_evaluate(syn, sets, cfg, r, runtime, loss_fn))
    if progress is not None:
        for r, res in enumerate(results):
            progress(r, res)
    return results


def evaluate_synthetic(syn: SyntheticSet, ds: BiasedDataset, cfg: EvalConfig,
                       runtime: Runtime = DEFAULT_RUNTIME, progress=None) -> list[dict]:
    """`cfg.repeats` independently initialised networks on `ds`'s test sets; one record per network
    (`network_result`)."""
    device = runtime.torch_device
    syn = SyntheticSet(syn.images.to(device), syn.labels.to(device), syn.norm, syn.lr)
    return evaluate_repeats(syn, EvalSets.from_dataset(ds, device), cfg, runtime, progress)
