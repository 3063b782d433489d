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
to the smaller IPC), and `cfg.extra["outer_loop"/"inner_loop"]` override.

How the matching is computed (`GradientMatcher`, cfg.extra["matching"]):
- "batched" puts every class through the network as ONE batch (class-major,
  padded to equal size with zero-weight samples): a single backward gives each
  Conv2d/Linear layer's output gradient for all samples, and the per-class
  weight gradient is then a reduction of (layer input, output gradient) pairs
  within each class -- one `bmm` for Linear layers, a grouped convolution
  (CUDA) or a per-class `convolution_backward` call (CPU) for Conv2d. The
  default on CUDA, where large batches are what keeps the device busy.
- "tiled" computes each class's real gradient over tiles of at most
  `matching_tile` (16) samples, summed, and the synthetic gradients per class.
  The default on CPU: a tile's activations stay in cache, where a whole class
  (let alone all classes) streams the memory-bound norm/activation/pool passes
  from DRAM; on long CPU runs the real-side forward/backward is also compiled
  (torch.compile fuses those passes; cfg.extra["compile_matching"]). The
  inner loop's training steps are tiled and compiled the same way.
- "loop" is upstream's form: one forward/backward per class.
All three are exact: every network in the registry processes samples
independently here (instance norm, or BatchNorm frozen in eval mode as
upstream does during matching), so they differ only in float summation order.
`benchmarks/methods.py` times them against each other and checks they agree.

Deviations from upstream, all deliberate:
- Randomness comes from one seeded generator (upstream seeds from the clock).
- Siamese augmentation draws one parameter set per class from one seed per
  outer step (upstream draws a fresh clock seed per class).
- The inner loop's DSA augmentation draws parameters (and, in mode "S", the
  transform family) per sample; upstream picks one family per batch.
- 1-d parameters are left out of the gradient computation instead of being
  differentiated and then given distance 0 (same loss, less work).
- Initialisation follows `cfg.init`; `DEFAULTS` lists upstream's choices
  (DC: noise, DSA: real), which callers should start from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill_core.augment import SiameseAugment
from distill_core.compiled import MaybeCompiled, compile_wanted
from distill_core.methods.base import (DistillConfig, Guidance, ProgressFn, RealData, SyntheticSet, init_synthetic,
                                       log_iteration)
from distill_core.networks import build_network
from distill_core.tiling import batch_ce, batch_loss_backward, default_tile

# upstream `get_loops`: IPC -> (outer_loop, inner_loop)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}

# upstream command-line defaults, for callers building a DistillConfig
DEFAULTS = {
    "dc": {"iterations": 1000, "lr_img": 0.1, "lr_net": 0.01, "batch_real": 256, "init": "noise", "dsa": False},
    "dsa": {"iterations": 1000, "lr_img": 0.1, "lr_net": 0.01, "batch_real": 256, "init": "real", "dsa": True},
}
BATCH_TRAIN = 256  # upstream batch_train for the inner loop
BN_SAMPLES_PER_CLASS = 16  # upstream BNSizePC
EPS = 1e-6  # upstream distance_wb epsilon


def default_loops(ipc: int) -> tuple[int, int]:
    nearest = min(LOOPS, key=lambda k: (abs(k - ipc), k))
    return LOOPS[nearest]


# --- class-major batches ------------------------------------------------------------------------

@dataclass
class ClassBatch:
    """K blocks of `per_class` samples (block c = class c), padded with zero-weight samples.

    `weights` is 1/n_c for the n_c real samples of class c and 0 for padding, so
    `sum(weights * ce)` is the sum over classes of each class's mean loss.
    """

    images: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    counts: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def per_class(self) -> int:
        return len(self.labels) // len(self.counts)

    def block(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class c's samples without padding."""
        start = c * self.per_class
        return self.images[start:start + self.counts[c]], self.labels[start:start + self.counts[c]]

    def with_images(self, images: torch.Tensor) -> "ClassBatch":
        return ClassBatch(images, self.labels, self.weights, self.counts)


def sample_real_batch(real: RealData, n: int, generator: torch.Generator) -> ClassBatch:
    """n random real images per class (all of a smaller class), as upstream's `get_images`."""
    picks = []
    for idx in real.class_index:
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:min(n, len(idx))].to(idx.device)])
    counts = [len(p) for p in picks]
    m = max(counts)
    index, weights = [], []
    for p in picks:
        pad = p[:1].expand(m - len(p))  # any real index: its weight is 0
        index.append(torch.cat([p, pad]))
        weights.append(torch.cat([torch.full((len(p),), 1.0 / len(p)), torch.zeros(m - len(p))]))
    index = torch.cat(index)
    return ClassBatch(real.images[index], real.labels[index],
                      torch.cat(weights).to(real.device), counts)


def synthetic_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassBatch:
    """The synthetic set as a ClassBatch (init_synthetic already stores it class-major)."""
    per_class = len(labels) // num_classes
    weights = torch.full((len(labels),), 1.0 / per_class, device=images.device)
    return ClassBatch(images, labels, weights, [per_class] * num_classes)


# --- the matching distance ----------------------------------------------------------------------

def cosine_rows_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """sum over rows of 1 - cos(row_real, row_syn); rows are the last-but-one axis."""
    dot = (g_real * g_syn).sum(-1)
    return (1.0 - dot / (g_real.norm(dim=-1) * g_syn.norm(dim=-1) + EPS)).sum()


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """Upstream `distance_wb` for one parameter's gradient (no class axis)."""
    if g_real.dim() == 1:
        return g_real.new_zeros(())
    return cosine_rows_distance(g_real.reshape(g_real.shape[0], -1), g_syn.reshape(g_syn.shape[0], -1))


def matched_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters with a non-zero distance: everything but 1-d tensors."""
    return [p for p in net.parameters() if p.dim() > 1]


# --- per-class gradients in one batch -----------------------------------------------------------

def _matched_layers(net: nn.Module) -> list[nn.Module]:
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    covered = {id(m.weight) for m in layers}
    if any(id(p) not in covered for p in matched_parameters(net)):
        raise NotImplementedError("batched matching supports Conv2d/Linear weights only; use matching mode 'tiled' or 'loop'")
    return layers


def _conv_weight_grad_per_class(conv: nn.Conv2d, inp: torch.Tensor, delta: torch.Tensor, k: int,
                                grouped: bool | None = None) -> torch.Tensor:
    """(K, *conv.weight.shape): the weight gradient of each class block.

    grouped=True does it in one grouped convolution (samples become channels,
    one group per class): one kernel launch, the better choice on GPUs.
    Otherwise each block calls `convolution_backward` for the weight only,
    which is faster than the grouped form on CPUs. Both are differentiable.
    """
    if grouped is None:
        grouped = inp.is_cuda
    n = inp.shape[0] // k
    if grouped and conv.groups == 1 and conv.padding_mode == "zeros":
        cin, cout = inp.shape[1], delta.shape[1]
        kh, kw = conv.kernel_size
        x = inp.transpose(0, 1)  # (Cin, K*n, H, W)
        w = delta.reshape(k, n, cout, *delta.shape[2:]).transpose(1, 2).reshape(k * cout, n, *delta.shape[2:])
        out = F.conv2d(x, w, stride=conv.dilation, padding=conv.padding, dilation=conv.stride, groups=k)
        out = out[..., :kh, :kw]  # strided convs can leave extra rows/columns
        return out.reshape(cin, k, cout, kh, kw).permute(1, 2, 0, 3, 4)
    return torch.stack([
        torch.ops.aten.convolution_backward(
            delta[c * n:(c + 1) * n], inp[c * n:(c + 1) * n], conv.weight, None,
            conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups, [False, True, False])[1]
        for c in range(k)
    ])


def _weight_grad_per_class(layer: nn.Module, inp: torch.Tensor, delta: torch.Tensor, k: int) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        x = inp.reshape(k, -1, inp.shape[-1])
        d = delta.reshape(k, -1, delta.shape[-1])
        return torch.bmm(d.transpose(1, 2), x)
    return _conv_weight_grad_per_class(layer, inp, delta, k)


def per_class_gradients(net: nn.Module, batch: ClassBatch, create_graph: bool = False) -> list[torch.Tensor]:
    """Gradient of each class's mean CE w.r.t. every matched weight: a list of (K, *weight.shape).

    One forward and one backward over the whole class-major batch give every
    Conv2d/Linear layer's input and output gradient; the weight gradient of
    class c is the same reduction a normal backward does, restricted to block c.
    """
    layers = _matched_layers(net)
    captured: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module, inputs, output):
        captured.append((module, inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        logits = net(batch.images)
    finally:
        for h in handles:
            h.remove()
    loss = (F.cross_entropy(logits, batch.labels, reduction="none") * batch.weights).sum()
    deltas = torch.autograd.grad(loss, [out for _, _, out in captured], create_graph=create_graph)
    grads: dict[nn.Module, torch.Tensor] = {}
    for (layer, inp, _), delta in zip(captured, deltas):
        g = _weight_grad_per_class(layer, inp, delta, batch.num_classes)
        grads[layer] = grads[layer] + g if layer in grads else g  # a layer used twice sums its uses
    return [grads[m] for m in layers if m in grads]


def weighted_ce(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(net(images), labels, reduction="none") * weights).sum()


def padded_blocks(batch: ClassBatch, per_class: int) -> ClassBatch:
    """The same batch with every class block padded (zero weight) to `per_class` samples."""
    k, m = batch.num_classes, batch.per_class
    if per_class == m:
        return batch
    index = torch.arange(k * m, device=batch.images.device).view(k, m)
    index = torch.cat([index, index[:, :1].expand(k, per_class - m)], 1).flatten()
    weights = torch.cat([batch.weights.view(k, m), batch.weights.new_zeros(k, per_class - m)], 1).flatten()
    return ClassBatch(batch.images[index], batch.labels[index], weights, batch.counts)


def tiled_class_gradients(net: nn.Module, batch: ClassBatch, params: list[nn.Parameter], tile: int,
                          real_loss=weighted_ce) -> list[torch.Tensor]:
    """Each class's gradient (no graph) as a list of (K, *param.shape), summed over tiles of <= `tile` samples.

    Class blocks are cut into equal tiles (padded with zero-weight samples) so
    a compiled `real_loss` sees one input shape; tiles holding only padding are
    skipped.
    """
    m = batch.per_class
    n_tiles = -(-m // tile)
    size = -(-m // n_tiles)
    batch = padded_blocks(batch, n_tiles * size)
    grads = [p.new_zeros((batch.num_classes, *p.shape)) for p in params]
    for c, count in enumerate(batch.counts):
        for t in range(-(-count // size)):
            s = c * batch.per_class + t * size
            loss = real_loss(net, batch.images[s:s + size], batch.labels[s:s + size], batch.weights[s:s + size])
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc[c] += g
    return grads


def looped_class_gradients(net: nn.Module, batch: ClassBatch, params: list[nn.Parameter],
                           create_graph: bool = False) -> list[torch.Tensor]:
    """Each class's gradient of its mean CE, one forward/backward per class: a list of (K, *param.shape)."""
    per_class = []
    for c in range(batch.num_classes):
        x, y = batch.block(c)
        per_class.append(torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=create_graph))
    return [torch.stack(gs) for gs in zip(*per_class)]


MATCHING_MODES = ("batched", "tiled", "loop")
DEFAULT_TILE = 16


def matching_loss(net: nn.Module, real: ClassBatch, syn: ClassBatch, mode: str = "batched",
                  tile: int = DEFAULT_TILE, real_loss=weighted_ce) -> torch.Tensor:
    """sum over classes and layers of the per-output-node cosine distance (differentiable in syn.images)."""
    if mode == "batched":
        g_real = per_class_gradients(net, real, create_graph=False)
        g_syn = per_class_gradients(net, syn, create_graph=True)
    elif mode == "tiled":
        params = matched_parameters(net)
        g_real = tiled_class_gradients(net, real, params, tile, real_loss)
        g_syn = looped_class_gradients(net, syn, params, create_graph=True)
    elif mode == "loop":
        return _matching_loss_loop(net, real, syn)
    else:
        raise ValueError(f"unknown matching mode '{mode}' (one of {', '.join(MATCHING_MODES)})")
    loss = syn.images.new_zeros(())
    for gr, gs in zip(g_real, g_syn):
        k, out = gr.shape[:2]
        loss = loss + cosine_rows_distance(gr.detach().reshape(k, out, -1), gs.reshape(k, out, -1))
    return loss


def _matching_loss_loop(net: nn.Module, real: ClassBatch, syn: ClassBatch) -> torch.Tensor:
    """Upstream's form: one forward/backward per class, distances summed layer by layer."""
    params = matched_parameters(net)
    loss = syn.images.new_zeros(())
    for c in range(real.num_classes):
        x_real, y_real = real.block(c)
        x_syn, y_syn = syn.block(c)
        g_real = torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
        for gr, gs in zip(g_real, g_syn):
            loss = loss + layer_distance(gr.detach(), gs)
    return loss


class GradientMatcher:
    """`matching_loss` with the mode, tile and (optionally compiled) real-side loss chosen once per run."""

    COMPILE_MIN_STEPS = 500  # outer steps (iterations x outer_loop) before compiling pays on CPU

    def __init__(self, mode: str = "batched", tile: int = DEFAULT_TILE, compile: bool = False):
        if mode not in MATCHING_MODES:
            raise ValueError(f"unknown matching mode '{mode}' (one of {', '.join(MATCHING_MODES)})")
        self.mode, self.tile = mode, tile
        # fixed tile shapes: dynamic=False compiles exactly the shape every tile has
        self.real_loss = MaybeCompiled(weighted_ce, compile and mode == "tiled", dynamic=False)

    @classmethod
    def for_run(cls, cfg: DistillConfig, device: torch.device, outer_loop: int) -> "GradientMatcher":
        """The fastest measured form for the device: batched on CUDA, tiled on CPU (see module docstring)."""
        mode = cfg.extra.get("matching") or ("batched" if device.type == "cuda" else "tiled")
        compile = compile_wanted(cfg.extra.get("compile_matching", "auto"), device,
                                 cfg.iterations * outer_loop, cls.COMPILE_MIN_STEPS)
        return cls(mode, int(cfg.extra.get("matching_tile", DEFAULT_TILE)), compile)

    def __call__(self, net: nn.Module, real: ClassBatch, syn: ClassBatch) -> torch.Tensor:
        return matching_loss(net, real, syn, self.mode, self.tile, self.real_loss)


# --- network handling ---------------------------------------------------------------------------

def _batchnorms(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(net: nn.Module, real: RealData, generator: torch.Generator) -> None:
    """Upstream: set BN statistics from 16 real images per class, then use them fixed (eval mode)."""
    bns = _batchnorms(net)
    if not bns:
        return
    net.train()
    with torch.no_grad():
        net(real.sample_per_class(BN_SAMPLES_PER_CLASS, generator)[0])
    for m in bns:
        m.eval()


def train_on_synthetic(net: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                       epochs: int, batch_size: int, augment: SiameseAugment | None,
                       generator: torch.Generator, ce=None) -> None:
    """Upstream's inner loop: `epochs` passes of plain SGD over the (detached) synthetic set.

    Steps run in cache-sized tiles on CPU (distill_core.tiling); `ce(net, x, y, reduction)`
    is the (optionally compiled) loss.
    """
    ce = ce or batch_ce
    net.train()
    tile = default_tile(net, images.device)
    n = len(labels)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(images.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = images[idx]
            if augment is not None:  # per-sample parameters, as upstream's non-siamese DiffAugment
                seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
                x = augment(x, seed, torch.arange(len(idx), device=x.device), len(idx))
            opt.zero_grad(set_to_none=True)
            batch_loss_backward(lambda xb, yb, reduction: ce(net, xb, yb, reduction), x, labels[idx], tile)
            opt.step()


# --- the method ---------------------------------------------------------------------------------

def gradient_matching(real: RealData, cfg: DistillConfig, augment: SiameseAugment | None,
                      guidance: Guidance | None = None, progress: ProgressFn | None = None) -> SyntheticSet:
    """The DC/DSA loop. `augment` None is DC; a SiameseAugment is DSA."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # network initialisations
    syn = init_synthetic(real, cfg, g)
    x_syn = syn.images.requires_grad_(True)
    opt_img = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=0.5)
    outer_loop, inner_loop = default_loops(cfg.ipc)
    outer_loop = int(cfg.extra.get("outer_loop", outer_loop))
    inner_loop = int(cfg.extra.get("inner_loop", inner_loop))
    batch_train = int(cfg.extra.get("batch_train", BATCH_TRAIN))
    matcher = GradientMatcher.for_run(cfg, real.device, outer_loop)
    # the inner loop's steps compile with the matching (one decision per run: long CPU runs)
    inner_ce = MaybeCompiled(batch_ce, matcher.real_loss.compiled, dynamic=False)
    channels, size = real.shape[0], real.shape[-1]
    k = real.num_classes

    for it in range(cfg.iterations):
        net = build_network(cfg.arch, channels, k, size, **cfg.arch_options).to(real.device)
        net.train()
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
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
                ptm_loss = guidance.loss(x_syn, syn.labels, g)
                totals["loss_ptm"] += ptm_loss.item() / outer_loop
                loss = loss + ptm_loss
            opt_img.zero_grad(set_to_none=True)
            loss.backward(inputs=[x_syn])
            opt_img.step()
            if ol == outer_loop - 1:
                break
            train_on_synthetic(net, opt_net, x_syn.detach(), syn.labels, inner_loop, batch_train, augment, g,
                               inner_ce)
        record = {"loss_gm": totals["loss_gm"]}
        if guidance is not None:
            record["loss_ptm"] = totals["loss_ptm"]
        log_iteration(syn, it, cfg, record, progress)

    syn.images = x_syn.detach()
    return syn


def distill_dc(real: RealData, cfg: DistillConfig, guidance: Guidance | None = None,
               progress: ProgressFn | None = None) -> SyntheticSet:
    """DC: gradient matching without augmentation (cfg.dsa is ignored)."""
    return gradient_matching(real, cfg, None, guidance, progress)


def distill_dsa(real: RealData, cfg: DistillConfig, guidance: Guidance | None = None,
                progress: ProgressFn | None = None) -> SyntheticSet:
    """DSA: gradient matching with siamese augmentation (cfg.dsa_strategy; cfg.dsa is ignored)."""
    return gradient_matching(real, cfg, SiameseAugment(cfg.dsa_strategy), guidance, progress)
