"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

Each iteration picks an expert trajectory and a start epoch t (uniform among
epochs < max_start_epoch that have a checkpoint M epochs later), starts a
student at the expert's parameters theta*_t, takes N SGD steps on synthetic
mini-batches with a learnable learning rate, and minimises

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

with respect to the synthetic images (SGD, momentum 0.5, lr_img) and the
learning rate (SGD, momentum 0.5, lr_lr). The student is the architecture's
module run through `torch.func.functional_call` on a list of parameter tensors.
Experts are a list of trajectories, each a dict epoch -> state_dict, exactly
`distill_core.ptm.train_ptm(...).checkpoints` of a pool trained with the
"expert" recipe (upstream buffer.py: plain SGD, DSA augmentation, a checkpoint
per epoch); only entries that are parameters of the network are matched
(buffers such as BN running statistics come from the start checkpoint).

Options (`MTTOptions`; defaults: the published CIFAR-10 IPC 10 setting):
syn_steps N = 30, expert_epochs M = 2, max_start_epoch = 20, lr_lr = 1e-5,
lr_teacher (initial synthetic lr) = 0.01, batch_syn = the whole synthetic
set, gradient = "exact" (or "tesla", below). Evaluation protocol
(distill.py): DSA augmentation, 1000 epochs, with the learned lr.

Memory. By default all N student steps are unrolled in one autograd graph, as
upstream: memory grows linearly with N (every step's activations and
second-order graph are kept). The runtime's `memory_bounded` computes the
same exact gradient with at most ONE step's graph alive at a time, and the
option gradient = "tesla" a different, constant-memory one:

- exact, memory-bounded (reverse-mode adjoint with recomputation). A forward
  pass without graphs records theta_0..theta_{N-1} (parameter tensors only, no
  activations) and each step's batch indices and augmentation seed. Then, from
  the adjoint a_N = dL/dtheta_N, for i = N-1 .. 0: rebuild step i's graph
  g_i = grad_theta CE(theta_i; X_i) (create_graph), let s = <a_{i+1}, g_i>, and
  accumulate dL/dX += -lr * ds/dX, dL/dlr += -s, and set
  a_i = a_{i+1} - lr * H_i a_{i+1} (a Hessian-vector product from the same
  backward). This is the exact gradient of the unrolled objective (the tests
  check it against the full unroll); activation memory is one step's,
  independent of N; the stored parameter snapshots cost N x |theta| (1.3 MB per
  step for ConvNet-128 on 28x28, against tens of MB of activations per step).
- gradient "tesla" (Cui et al., ICML 2023). A first pass without graphs
  gives theta_N and a_N; a second pass replays the steps from theta_0 (same
  batches and seeds), rebuilds one step's graph at a time and accumulates
  dL/dX += -lr * d<a_N, g_i>/dX and dL/dlr += -<a_N, g_i>. Memory is constant
  in N (nothing per step is stored). The gradient treats every later student
  parameter as independent of X_i, i.e. it drops the Hessian terms that
  "exact" keeps (a_{i+1} is replaced by a_N); TESLA's paper presents the
  decomposition as exact, but it is this first-order approximation.
Soft labels (TESLA's label learning) are not implemented.

Deviations from upstream: randomness comes from one seeded generator; ZCA
whitening is a dataset option (`zca: true`, as upstream's CIFAR runs), not
the default; the synthetic lr is stored in `SyntheticSet.lr` for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from distill_core.augment import SiameseAugment
from distill_core.methods.base import DistillConfig, Guidance, ProgressFn, init_synthetic, log_iteration
from distill_core.methods.registry import Method, Options, dsa_protocol, register
from distill_core.networks import build_network
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData, SyntheticSet

Trajectory = dict[int, dict[str, torch.Tensor]]  # epoch -> state_dict


class MTTOptions(Options):
    syn_steps: int = Field(default=30, ge=1, le=10_000)
    expert_epochs: int = Field(default=2, ge=1, le=10_000)
    max_start_epoch: int = Field(default=20, ge=1, le=10_000)
    lr_lr: float = Field(default=1e-5, ge=0, le=1e3)
    lr_teacher: float = Field(default=0.01, gt=0, le=1e3)  # the synthetic lr's initial value
    batch_syn: int | None = Field(default=None, ge=1, le=1_000_000)  # None: the whole synthetic set
    gradient: Literal["exact", "tesla"] = "exact"


@dataclass
class StepPlan:
    """What one student step uses: synthetic indices and an augmentation seed (replayable)."""

    index: torch.Tensor
    seed: int


class Student:
    """A network evaluated on explicit parameter lists with `functional_call`."""

    def __init__(self, net: nn.Module, augment: SiameseAugment | None):
        self.net = net
        self.names = [name for name, _ in net.named_parameters()]
        self.buffers = dict(net.named_buffers())
        self.augment = augment

    def params_from(self, state: dict[str, torch.Tensor], device) -> list[torch.Tensor]:
        return [state[name].detach().to(device).float() for name in self.names]

    def load_buffers(self, state: dict[str, torch.Tensor]) -> None:
        """Buffers (e.g. BN running statistics) come from the start checkpoint, unmatched."""
        for name, buf in self.buffers.items():
            if name in state:
                buf.copy_(state[name])

    def batch(self, x_syn: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        x = x_syn[plan.index]
        if self.augment is not None:  # upstream: non-siamese DiffAugment, parameters per sample
            x = self.augment.per_sample(x, plan.seed)
        return x

    def loss(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = {**self.buffers, **dict(zip(self.names, params))}
        return F.cross_entropy(functional_call(self.net, state, (x,)), y)

    def grad(self, params, x, y, create_graph: bool) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.loss(params, x, y), params, create_graph=create_graph)


def squared_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(((p - q) ** 2).sum() for p, q in zip(a, b))


def plan_steps(n: int, steps: int, batch_syn: int, device, generator: torch.Generator) -> list[StepPlan]:
    """Upstream's batching: walk a fresh permutation in chunks of batch_syn."""
    plans: list[StepPlan] = []
    chunks: list[torch.Tensor] = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(batch_syn))
        index = chunks.pop(0).to(device)
        plans.append(StepPlan(index, int(torch.randint(2**31 - 1, (1,), generator=generator))))
    return plans


# --- the three ways to get dL/dX and dL/dlr -----------------------------------------------------

def unrolled_loss(student: Student, x_syn, y_syn, syn_lr, start, target, plans) -> torch.Tensor:
    """Upstream: one graph through all N steps (memory grows with N)."""
    params = [p.clone().requires_grad_(True) for p in start]
    for plan in plans:
        grads = student.grad(params, student.batch(x_syn, plan), y_syn[plan.index], create_graph=True)
        params = [p - syn_lr * g for p, g in zip(params, grads)]
    return squared_distance(params, target) / squared_distance(start, target)


def _step_no_graph(student: Student, params, x_syn, y_syn, lr: float, plan: StepPlan) -> list[torch.Tensor]:
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.no_grad():
        x = student.batch(x_syn, plan)
    grads = student.grad(leaves, x, y_syn[plan.index], create_graph=False)
    return [p.detach() - lr * g for p, g in zip(leaves, grads)]


def _step_contribution(student: Student, theta, adjoint, x_syn, y_syn, syn_lr, plan, want_hvp: bool):
    """Rebuild one step's graph; return d(-lr <adjoint, g_i>)/d(x_syn, lr[, theta_i])."""
    leaves = [p.detach().requires_grad_(True) for p in theta]
    grads = student.grad(leaves, student.batch(x_syn, plan), y_syn[plan.index], create_graph=True)
    s = sum((a * g).sum() for a, g in zip(adjoint, grads))
    inputs = [x_syn, syn_lr] + (leaves if want_hvp else [])
    out = torch.autograd.grad(-syn_lr * s, inputs)
    return out[0], out[1], list(out[2:]), [g.detach() for g in grads]


def bounded_gradients(student: Student, x_syn, y_syn, syn_lr, start, target, plans, mode: str = "exact"):
    """Memory-bounded dL/dx_syn and dL/dlr (see the module docstring). Returns (loss, dx, dlr)."""
    lr = float(syn_lr.detach())
    thetas = []  # theta_0 .. theta_{N-1}, kept by "exact" only
    params = start
    for plan in plans:
        if mode == "exact":
            thetas.append(params)
        params = _step_no_graph(student, params, x_syn, y_syn, lr, plan)
    denom = squared_distance(start, target)
    loss = squared_distance(params, target) / denom
    adjoint = [2.0 * (p - t) / denom for p, t in zip(params, target)]
    dx = torch.zeros_like(x_syn)
    dlr = torch.zeros_like(syn_lr)
    if mode == "exact":
        for i in reversed(range(len(plans))):
            gx, glr, hvp, _ = _step_contribution(student, thetas[i], adjoint, x_syn, y_syn, syn_lr, plans[i], True)
            dx += gx
            dlr += glr
            adjoint = [a + h for a, h in zip(adjoint, hvp)]  # a_i = a_{i+1} - lr * H_i a_{i+1}
    elif mode == "tesla":
        theta = start
        for plan in plans:
            gx, glr, _, grads = _step_contribution(student, theta, adjoint, x_syn, y_syn, syn_lr, plan, False)
            dx += gx
            dlr += glr
            theta = [p - lr * g for p, g in zip(theta, grads)]
    else:
        raise ValueError(f"unknown gradient '{mode}' (exact | tesla)")
    return loss.detach(), dx, dlr


# --- the method ---------------------------------------------------------------------------------

def start_epochs(trajectory: Trajectory, expert_epochs: int, max_start_epoch: int) -> list[int]:
    return sorted(e for e in trajectory if e < max_start_epoch and e + expert_epochs in trajectory)


def distill_mtt(real: RealData, cfg: DistillConfig, runtime: Runtime = DEFAULT_RUNTIME,
                guidance: Guidance | None = None, experts: list[Trajectory] | None = None,
                progress: ProgressFn | None = None) -> SyntheticSet:
    if not experts:
        raise ValueError("MTT needs expert trajectories (a list of {epoch: state_dict})")
    opts: MTTOptions = cfg.options
    starts = [start_epochs(t, opts.expert_epochs, opts.max_start_epoch) for t in experts]
    if not any(starts):
        raise ValueError(f"no expert has checkpoints e and e + {opts.expert_epochs} with e < {opts.max_start_epoch}")
    usable = [i for i, s in enumerate(starts) if s]

    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    syn = init_synthetic(real, cfg, g)
    x_syn = syn.images.requires_grad_(True)
    syn_lr = torch.tensor(opts.lr_teacher, device=real.device, requires_grad=True)
    opt_img = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=opts.lr_lr, momentum=0.5)
    augment = SiameseAugment(cfg.augment) if cfg.augment else None
    net = build_network(cfg.arch, real.shape[0], real.num_classes, real.shape[-1], **cfg.arch_options)
    student = Student(net.to(real.device).train(), augment)
    n_syn = len(syn.labels)
    batch_syn = opts.batch_syn or n_syn
    # the exact gradient unrolled (upstream) or memory-bounded (runtime); TESLA's is always bounded
    bounded = opts.gradient == "tesla" or runtime.memory_bounded

    for it in range(cfg.iterations):
        e = usable[int(torch.randint(len(usable), (1,), generator=g))]
        t = starts[e][int(torch.randint(len(starts[e]), (1,), generator=g))]
        start = student.params_from(experts[e][t], real.device)
        student.load_buffers(experts[e][t])
        target = student.params_from(experts[e][t + opts.expert_epochs], real.device)
        plans = plan_steps(n_syn, opts.syn_steps, batch_syn, real.device, g)

        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        if bounded:
            loss, dx, dlr = bounded_gradients(student, x_syn, syn.labels, syn_lr, start, target, plans, opts.gradient)
            x_syn.grad, syn_lr.grad = dx, dlr
        else:
            loss = unrolled_loss(student, x_syn, syn.labels, syn_lr, start, target, plans)
            loss.backward(inputs=[x_syn, syn_lr])
        record = {"loss_mtt": float(loss.detach()), "syn_lr": float(syn_lr.detach()), "start_epoch": t}
        if guidance is not None:
            ptm_loss = guidance.loss(x_syn, syn.labels)
            ptm_loss.backward(inputs=[x_syn])  # accumulates onto the trajectory gradient
            record["loss_ptm"] = ptm_loss.item()
        opt_img.step()
        opt_lr.step()
        syn.lr = float(syn_lr.detach())  # the live set carries its learned lr (a search's proxy evaluates with it)
        log_iteration(syn, it, cfg, record, progress)

    syn.images = x_syn.detach()
    syn.lr = float(syn_lr.detach())
    return syn


register(Method(
    name="mtt", distill=distill_mtt, iterations=5000, lr_img=1000.0, init="real", augment=True,
    evaluation=dsa_protocol, options=MTTOptions, needs_experts=True,
    summary="matching training trajectories (Cazenavette et al. 2022) on an expert pool"))
