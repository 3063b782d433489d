"""The fast engines behind the method recipes: gradient matching (DC/DSA) and DM's real embedding.

The recipes in dc.py and dm.py say what is computed; this module holds the
forms that compute it fast, chosen by the `Runtime` (never part of a stage key,
because every form gives the same numbers up to float summation order;
tests/distill_core/methods/test_engines.py checks each against the plain form,
and benchmarks/methods.py times them).

Gradient matching (`GradientMatcher`, runtime.matching):
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
  from DRAM; long CPU runs also compile the real-side forward/backward.
- "loop" is upstream's form: one forward/backward per class.
All three are exact: every network in the registry processes samples
independently here (instance norm, or BatchNorm frozen in eval mode as
upstream does during matching).

Debiasing (`RealData.weights`, see `distill_core.debias`): the real batch's
sample weights become w_i / sum_c(w) within each class instead of 1/n_c, so
every mode's real loss is the per-class weighted mean cross-entropy
sum(w_i ce_i) / sum(w_i). "batched" and "tiled" already weight every sample;
"loop" switches its real side from the plain mean CE to the same weighted sum
when the batch is reweighted. The normalised weights are formed in float64 and
rounded once, so weights all 1.0 give exactly the 1/n_c of the unweighted batch
(and, in the loop, the same gradient as the mean), bit for bit on CPU
(tests/distill_core/methods/test_dc.py checks every mode).

DM's real embedding (`RealEmbedder`): the no-grad forward of the real batch in
cache-sized chunks of 32 on CPU (about 2x, networks without BatchNorm only)
and, on long CPU runs, through torch.compile (about 2x more); channels_last was
measured slower on CPU and is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill_core.compiled import MaybeCompiled
from distill_core.runtime import MATCHING_MODES, Runtime
from distill_core.sets import RealData
from distill_core.tiling import samples_independent

EPS = 1e-6  # upstream distance_wb epsilon


# --- class-major batches ------------------------------------------------------------------------

@dataclass
class ClassBatch:
    """K blocks of `per_class` samples (block c = class c), padded with zero-weight samples.

    `weights` is 1/n_c for the n_c real samples of class c and 0 for padding, so
    `sum(weights * ce)` is the sum over classes of each class's mean loss. A
    `reweighted` batch (debiasing) has w_i / sum_c(w) instead: each class's
    weighted mean loss.
    """

    images: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    counts: list[int]
    reweighted: bool = False

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

    def block_weights(self, c: int) -> torch.Tensor:
        start = c * self.per_class
        return self.weights[start:start + self.counts[c]]

    def with_images(self, images: torch.Tensor) -> "ClassBatch":
        return ClassBatch(images, self.labels, self.weights, self.counts, self.reweighted)


def sample_real_batch(real: RealData, n: int, generator: torch.Generator) -> ClassBatch:
    """n random real images per class (all of a smaller class), as upstream's `get_images`.

    With `real.weights` the batch is reweighted: class c's samples weigh w_i / sum_c(w) (same picks, same stream).
    """
    picks = []
    for idx in real.class_index:
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:min(n, len(idx))].to(idx.device)])
    counts = [len(p) for p in picks]
    m = max(counts)
    index, weights = [], []
    for p in picks:
        pad = p[:1].expand(m - len(p))  # any real index: its weight is 0
        index.append(torch.cat([p, pad]))
        own = torch.full((len(p),), 1.0 / len(p)) if real.weights is None else normalised_weights(real.weights[p])
        weights.append(torch.cat([own, torch.zeros(m - len(p))]))
    index = torch.cat(index)
    return ClassBatch(real.images[index], real.labels[index],
                      torch.cat(weights).to(real.device), counts, real.weights is not None)


def normalised_weights(w: torch.Tensor) -> torch.Tensor:
    """w / sum(w) on CPU, in float64 rounded once to float32: all-ones gives exactly float32(1.0 / n), as
    `torch.full(..., 1.0 / n)` does. A class whose picks all weigh 0 gets zeros (no real gradient)."""
    w = w.detach().double().cpu()
    total = w.sum()
    return (w / total if total > 0 else torch.zeros_like(w)).float()


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
    return ClassBatch(batch.images[index], batch.labels[index], weights, batch.counts, batch.reweighted)


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
    """Upstream's form: one forward/backward per class, distances summed layer by layer.

    A reweighted (debiased) real batch takes its class's weighted CE sum instead of the mean.
    """
    params = matched_parameters(net)
    loss = syn.images.new_zeros(())
    for c in range(real.num_classes):
        x_real, y_real = real.block(c)
        x_syn, y_syn = syn.block(c)
        if real.reweighted:
            real_loss = weighted_ce(net, x_real, y_real, real.block_weights(c))
        else:
            real_loss = F.cross_entropy(net(x_real), y_real)
        g_real = torch.autograd.grad(real_loss, params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
        for gr, gs in zip(g_real, g_syn):
            loss = loss + layer_distance(gr.detach(), gs)
    return loss


class GradientMatcher:
    """`matching_loss` with the engine, tile and (optionally compiled) real-side loss chosen once per run."""

    def __init__(self, mode: str = "batched", tile: int = DEFAULT_TILE, compile: bool = False):
        if mode not in MATCHING_MODES:
            raise ValueError(f"unknown matching mode '{mode}' (one of {', '.join(MATCHING_MODES)})")
        self.mode, self.tile = mode, tile
        # fixed tile shapes: dynamic=False compiles exactly the shape every tile has
        self.real_loss = MaybeCompiled(weighted_ce, compile and mode == "tiled", dynamic=False)

    @classmethod
    def from_runtime(cls, runtime: Runtime, outer_steps: int, num_classes: int, batch_real: int) -> "GradientMatcher":
        """The runtime's engine; compiled when the run calls the real-side tile often enough."""
        mode = runtime.matching_mode()
        calls = outer_steps * num_classes * -(-batch_real // runtime.matching_tile)
        return cls(mode, runtime.matching_tile, runtime.compile_for(calls) and mode == "tiled")

    @property
    def compiled(self) -> bool:
        return self.real_loss.compiled

    def __call__(self, net: nn.Module, real: ClassBatch, syn: ClassBatch) -> torch.Tensor:
        return matching_loss(net, real, syn, self.mode, self.tile, self.real_loss)


# --- DM: the real batch's embedding ---------------------------------------------------------------

def embed_no_grad(net, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.embed(x)


class RealEmbedder:
    """The real-batch embedding in cache-sized chunks, optionally through torch.compile.

    CPU levers measured by benchmarks/methods.py (part c) on ConvNet-128 with
    2560 images: running the no-grad forward in chunks of CHUNK_CPU images
    keeps the norm/activation/pool passes in cache (about 2x), and
    torch.compile fuses them (about 2x); outputs agree to ~1e-5 relative.
    Chunks are only used for networks that treat samples independently (a
    BatchNorm network in train mode normalises over the whole batch).
    """

    CHUNK_CPU = 32

    def __init__(self, compile: bool = False):
        self.fn = MaybeCompiled(embed_no_grad, compile, dynamic=False)  # fixed chunk shapes

    @classmethod
    def from_runtime(cls, runtime: Runtime, iterations: int, batch_images: int) -> "RealEmbedder":
        return cls(runtime.compile_for(iterations * -(-batch_images // cls.CHUNK_CPU)))

    def __call__(self, net, x: torch.Tensor) -> torch.Tensor:
        chunk = self.CHUNK_CPU if x.device.type == "cpu" and samples_independent(net) else None
        if chunk is None or len(x) <= chunk:
            return self.fn(net, x)
        return torch.cat([self.fn(net, x[i:i + chunk]) for i in range(0, len(x), chunk)])
