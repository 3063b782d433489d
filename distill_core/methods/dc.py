"""DC and DSA: dataset condensation by gradient matching.

DC (Zhao, Mopuri & Bilen, ICLR 2021) learns the synthetic set so that, on
freshly initialised networks, the gradient of the classification loss on each
class's synthetic images matches the gradient on a real batch of that class.
DSA (Zhao & Bilen, ICML 2021) is the same loop with differentiable siamese
augmentation: real and synthetic images of a class get the same random
transform before the gradients are taken.

Upstream loop (both methods), reproduced here:

    for it in iterations:                   # fresh random network every iteration
        for ol in outer_loop:
            (BatchNorm only) freeze BN statistics on 16 real images per class
            loss = sum_c D(grad L(real_c), grad L(syn_c))    # + PTM guidance
            one SGD step (momentum 0.5) on the synthetic images
            if last ol: break
            train the network inner_loop epochs on the synthetic set (lr_net, batch_train 256)

D is upstream's `match_loss` with dis_metric 'ours': per layer, reshape the
gradient to (out, -1) and sum 1 - cos over output nodes; 1-d parameters
(biases, norm affines) contribute 0. The loop counts come from IPC as upstream's
`get_loops`: 1 -> (1, 1), 10 -> (10, 50), 20 -> (20, 25), 30 -> (30, 20),
40 -> (40, 15), 50 -> (50, 10); any other IPC takes the nearest of these (ties
to the smaller IPC); the options `outer_loop` / `inner_loop` override them.
How the matching is computed fast (batched, tiled, or upstream's per-class
loop; all exact) is the runtime's choice: see `distill_core.methods.engines`.

Debiasing: when `real.weights` is set (`distill_core.debias`), each class's
real-gradient loss is the weighted mean cross-entropy sum(w_i ce_i) / sum(w_i)
over the sampled real batch (`engines.sample_real_batch` forms the weights,
every matching mode uses them); the synthetic side and the inner loop are
unweighted, and so is the BatchNorm freezing batch. With every weight exactly
1.0 the run is bit-for-bit the unweighted one.

Evaluation protocol (upstream main.py / get_daparam): DC sets train 300 epochs
without augmentation, except on MNIST, where DC's own crop/scale/rotate
augmentation runs for 1000 epochs (ddray applies the MNIST rule to the other
MNIST-like source, scikit-learn's digits) and a BatchNorm ConvNet, which gets
crop/noise; DSA sets train 1000 epochs with DSA augmentation.

Deviations from upstream, all deliberate:
- Randomness comes from one seeded generator (upstream seeds from the clock).
- Siamese augmentation draws one parameter set per class from one seed per
  outer step (upstream draws a fresh clock seed per class).
- 1-d parameters are left out of the gradient computation instead of being
  differentiated and then given distance 0 (same loss, less work).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from distill_core.augment import SiameseAugment
from distill_core.compiled import MaybeCompiled
from distill_core.data.sources import SourceInfo
from distill_core.methods.base import DistillConfig, Guidance, ProgressFn, init_synthetic, log_iteration
from distill_core.methods.engines import GradientMatcher, sample_real_batch, synthetic_batch
from distill_core.methods.registry import EvalProtocol, Method, Options, dsa_protocol, register
from distill_core.networks import build_network
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData, SyntheticSet
from distill_core.tiling import ce_sum
from distill_core.training import train_epoch

# upstream `get_loops`: IPC -> (outer_loop, inner_loop)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
BN_SAMPLES_PER_CLASS = 16  # upstream BNSizePC


class DCOptions(Options):
    outer_loop: int | None = Field(default=None, ge=1, le=10_000)  # None: upstream's table by IPC
    inner_loop: int | None = Field(default=None, ge=0, le=10_000)
    batch_train: int = Field(default=256, ge=1, le=100_000)  # upstream batch_train of the inner loop


def default_loops(ipc: int) -> tuple[int, int]:
    nearest = min(LOOPS, key=lambda k: (abs(k - ipc), k))
    return LOOPS[nearest]


def freeze_batchnorm(net: nn.Module, real: RealData, generator: torch.Generator) -> None:
    """Upstream: set BN statistics from 16 real images per class, then use them fixed (eval mode)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    net.train()
    with torch.no_grad():
        net(real.sample_per_class(BN_SAMPLES_PER_CLASS, generator)[0])
    for m in bns:
        m.eval()


def gradient_matching(real: RealData, cfg: DistillConfig, runtime: Runtime = DEFAULT_RUNTIME,
                      guidance: Guidance | None = None, experts=None,
                      progress: ProgressFn | None = None) -> SyntheticSet:
    """The DC/DSA loop: DSA when `cfg.augment` names a DSA strategy, DC when it is None."""
    opts: DCOptions = cfg.options
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # network initialisations
    syn = init_synthetic(real, cfg, g)
    x_syn = syn.images.requires_grad_(True)
    opt_img = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=0.5)
    outer_loop, inner_loop = default_loops(cfg.ipc)
    outer_loop = opts.outer_loop or outer_loop
    inner_loop = inner_loop if opts.inner_loop is None else opts.inner_loop
    augment = SiameseAugment(cfg.augment) if cfg.augment else None
    k, channels, size = real.num_classes, real.shape[0], real.shape[-1]
    matcher = GradientMatcher.from_runtime(runtime, cfg.iterations * outer_loop, k, cfg.batch_real)
    inner_loss = MaybeCompiled(ce_sum, matcher.compiled, dynamic=False)  # compiled with the matching, or not

    for it in range(cfg.iterations):
        net = build_network(cfg.arch, channels, k, size, **cfg.arch_options).to(real.device)
        net.train()
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)  # upstream: plain SGD in the inner loop
        totals = {"loss_gm": 0.0, "loss_ptm": 0.0}
        for ol in range(outer_loop):
            freeze_batchnorm(net, real, g)
            real_batch = sample_real_batch(real, cfg.batch_real, g)
            syn_batch = synthetic_batch(x_syn, syn.labels, k)
            if augment is not None:
                seed = int(torch.randint(2**31 - 1, (1,), generator=g))
                real_batch = real_batch.with_images(augment(real_batch.images, seed, real_batch.labels, k))
                syn_batch = syn_batch.with_images(augment(x_syn, seed, syn.labels, k))
            loss = matcher(net, real_batch, syn_batch)
            totals["loss_gm"] += loss.item() / outer_loop
            if guidance is not None:
                ptm_loss = guidance.loss(x_syn, syn.labels)
                totals["loss_ptm"] += ptm_loss.item() / outer_loop
                loss = loss + ptm_loss
            opt_img.zero_grad(set_to_none=True)
            loss.backward(inputs=[x_syn])
            opt_img.step()
            if ol == outer_loop - 1:
                break
            # upstream's inner loop: train the network on the (detached) synthetic set,
            # non-siamese augmentation (parameters per sample) when distilling with DSA
            net.train()
            for _ in range(inner_loop):
                train_epoch(net, opt_net, x_syn.detach(), syn.labels, opts.batch_train, g, augment,
                            runtime.tile_for(net), inner_loss)
        record = {"loss_gm": totals["loss_gm"]}
        if guidance is not None:
            record["loss_ptm"] = totals["loss_ptm"]
        log_iteration(syn, it, cfg, record, progress)

    syn.images = x_syn.detach()
    return syn


def dc_protocol(source: SourceInfo, arch: str) -> EvalProtocol:
    """Upstream get_daparam + main.py: 300 epochs unaugmented, DC augmentation for 1000 on MNIST / BN nets."""
    if arch == "convnet_bn":
        return EvalProtocol("dc:crop_noise", 1000)
    if source.mnist_like:
        return EvalProtocol("dc:crop_scale_rotate", 1000)
    return EvalProtocol(None, 300)


register(Method(
    name="dc", distill=gradient_matching, iterations=1000, lr_img=0.1, init="noise", augment=False,
    evaluation=dc_protocol, options=DCOptions, takes_weights=True,
    summary="gradient matching (Zhao et al. 2021), no augmentation"))
register(Method(
    name="dsa", distill=gradient_matching, iterations=1000, lr_img=0.1, init="real", augment=True,
    evaluation=dsa_protocol, options=DCOptions, takes_weights=True,
    summary="gradient matching with differentiable siamese augmentation (Zhao & Bilen 2021)"))
