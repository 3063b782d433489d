"""`lff`: Learning from Failure (Nam et al., NeurIPS 2020; github alinlab/LfF, train.py).

LfF trains two networks of the same architecture together on the biased data.
The bias-capturing model f_B is trained with the generalised cross-entropy

    GCE(p, y) = CE(p, y) * p_y(x).detach() ** q * q                    (q = `gce_q`, LfF's GCE)

which up-weights the samples it already finds easy, so it latches on to the
easy shortcut (the bias). The debiased model f_D is trained with cross-entropy
weighted per sample by the relative difficulty

    W(x) = L_B(x) / (L_B(x) + L_D(x) + 1e-8)

where L_B, L_D are per-sample exponential moving averages of each model's
(plain) cross-entropy, EMA <- alpha * EMA + (1 - alpha) * CE (alpha = `ema_alpha`;
a sample's first update takes its CE in full, as upstream's `EMA` does),
updated for a batch's samples at every step, each divided by the largest EMA
over the samples of the same class (upstream's `EMA.max_loss(label)`). Samples
the biased model fails on (bias-conflicting ones) get W near 1; samples it
learns easily get W near 0.

In ddray this is (a) a PTM objective (`PTMConfig(objective="lff")`,
`train_lff` below; `distill_core.ptm.train_ptm` dispatches to it) whose kept
checkpoints are f_D's, so guidance with an lff pool uses the debiased network,
and (b) a debias kind `lff` whose per-sample weights are the final W of every
real sample (`PTMResult.scores`), scaled so each class's largest is 1.0.

Deviations from upstream:
- the optimiser: upstream uses Adam lr 1e-3; ddray keeps paper 2's PTM recipe
  (SGD lr 0.01, momentum 0.9, weight decay 0.005, lr x0.1 at milestones; the
  `recipe("lff", ...)` fields), so an lff PTM differs from a ptm PTM only in
  its objective;
- the network: upstream's coloured-MNIST model is an MLP; here both models are
  the PTMConfig's `arch` (ConvNet by default);
- the distillation weights are the final EMA relative difficulty computed once
  at the end of training, not the per-step W that reweights f_D's loss;
- no tiling of steps (`runtime` is accepted for the signature only): W needs
  the whole batch's losses before the backward, so each step is one plain
  forward/backward of the batch through both models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_core.augment import make_augmentation
from distill_core.debias.registry import DebiasKind, register, scale_per_class
from distill_core.methods.registry import Options
from distill_core.networks import build_network
from distill_core.ptm import OBJECTIVES, Checkpoints, PTMConfig, PTMResult
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData

EPS = 1e-8  # upstream: loss_b / (loss_b + loss_d + 1e-8)


def gce_loss(logits: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """LfF's generalised cross-entropy per sample: CE * p_y.detach() ** q * q."""
    p_y = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return F.cross_entropy(logits, labels, reduction="none") * (p_y.detach() ** q) * q


class LossEMA:
    """Per-sample EMA of a loss (upstream's `EMA`): a sample's first update takes the loss in full."""

    def __init__(self, labels: torch.Tensor, num_classes: int, alpha: float):
        self.labels, self.alpha = labels, alpha
        self.value = torch.zeros(len(labels), device=labels.device)
        self.updated = torch.zeros(len(labels), device=labels.device)
        self.class_index = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]

    def update(self, index: torch.Tensor, loss: torch.Tensor) -> None:
        # upstream: alpha * old + (1 - alpha * updated) * new, so the first update (old = 0, updated = 0) is new
        self.value[index] = self.alpha * self.value[index] + (1 - self.alpha * self.updated[index]) * loss
        self.updated[index] = 1.0

    def class_max(self) -> torch.Tensor:
        """The largest EMA of each class (1 for an empty or all-zero class, so dividing by it is harmless)."""
        out = torch.ones(len(self.class_index), device=self.value.device)
        for c, idx in enumerate(self.class_index):
            if len(idx):
                m = self.value[idx].max()
                out[c] = torch.where(m > 0, m, torch.ones_like(m))
        return out

    def normalised(self, index: torch.Tensor) -> torch.Tensor:
        """The EMAs of `index`'s samples, each divided by its class's largest EMA (upstream's max_loss)."""
        return self.value[index] / self.class_max()[self.labels[index]]


def relative_difficulty(ema_b: LossEMA, ema_d: LossEMA, index: torch.Tensor) -> torch.Tensor:
    """W = L_B / (L_B + L_D + 1e-8) of `index`'s samples from the class-normalised EMAs."""
    lb, ld = ema_b.normalised(index), ema_d.normalised(index)
    return lb / (lb + ld + EPS)


def train_lff(real: RealData, cfg: PTMConfig, val: tuple[torch.Tensor, torch.Tensor] | None = None,
              runtime: Runtime = DEFAULT_RUNTIME, progress=None) -> PTMResult:
    """Train LfF's pair on `real`; checkpoints are the debiased model's, `scores` the final W per sample."""
    if real.weights is not None:
        raise ValueError("objective 'lff' reweights its own debiased model: train it on unweighted data")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    channels, size = real.shape[0], real.shape[-1]
    # model_b first, then model_d: both initialisations follow from cfg.seed
    model_b = build_network(cfg.arch, channels, real.num_classes, size, **cfg.arch_options).to(real.device)
    model_d = build_network(cfg.arch, channels, real.num_classes, size, **cfg.arch_options).to(real.device)
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            for m in (model_b, model_d)]
    augment = make_augmentation(cfg.augment)
    log = Checkpoints(cfg, model_d, opts, val, progress)  # the debiased model is the one kept and scored
    images, labels = real.images, real.labels
    n = len(labels)
    ema_b = LossEMA(labels, real.num_classes, cfg.ema_alpha)
    ema_d = LossEMA(labels, real.num_classes, cfg.ema_alpha)
    model_b.train()
    model_d.train()
    for epoch in range(1, cfg.epochs + 1):
        # a plain loop rather than distill_core.training.train_epoch: the two models share each batch, and
        # model_d's per-sample weights need both models' losses of the whole batch before the backward
        perm = torch.randperm(n, generator=g).to(images.device)
        total, correct_d, correct_b = 0.0, 0, 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = images[idx], labels[idx]
            if augment is not None:
                x = augment.per_sample(x, int(torch.randint(2**31 - 1, (1,), generator=g)))
            logits_b, logits_d = model_b(x), model_d(x)
            # the EMAs track each model's plain CE; W comes from them after this batch's update
            ce_b = F.cross_entropy(logits_b, y, reduction="none")
            ce_d = F.cross_entropy(logits_d, y, reduction="none")
            ema_b.update(idx, ce_b.detach())
            ema_d.update(idx, ce_d.detach())
            weight = relative_difficulty(ema_b, ema_d, idx)
            loss_b = gce_loss(logits_b, y, cfg.gce_q)
            loss_d = ce_d * weight
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            (loss_b.mean() + loss_d.mean()).backward()  # the models share no parameters: two separate updates
            for opt in opts:
                opt.step()
            total += float(loss_d.detach().sum())
            correct_d += int((logits_d.argmax(1) == y).sum())
            correct_b += int((logits_b.argmax(1) == y).sum())
        log.end_epoch(epoch, {"train_loss": total / max(1, n), "train_acc": correct_d / max(1, n),
                              "bias_train_acc": correct_b / max(1, n)})
    all_index = torch.arange(n, device=labels.device)
    scores = relative_difficulty(ema_b, ema_d, all_index).detach().float().cpu()
    return log.result(scores)


def lff_weights(images, labels, num_classes, options, attributes=None, embed=None, scores=None) -> torch.Tensor:
    """The LfF-trained PTM's final relative difficulty of each sample, scaled so each class's largest is 1.0."""
    if scores is None:
        raise ValueError("debias kind 'lff' needs a score per real sample from an LfF-trained PTM")
    labels = labels.cpu()
    scores = torch.as_tensor(scores).detach().cpu().float()
    if scores.shape != labels.shape:
        raise ValueError(f"{tuple(scores.shape)} lff scores for {len(labels)} samples")
    return scale_per_class(scores, labels, num_classes)


register(DebiasKind(name="lff", options=Options, weights=lff_weights, needs_scores=True,
                    summary="LfF relative difficulty from an LfF-trained PTM (Nam et al. 2020; needs its scores)"))
OBJECTIVES["lff"] = train_lff  # train_ptm(real, PTMConfig(objective="lff", ...)) runs LfF's pair
