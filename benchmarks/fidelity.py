"""Fidelity check: DC, DSA, DM and MTT on real Fashion-MNIST at IPC 1 and 10, beside real-data baselines.

    python benchmarks/fidelity.py [--quick | --full | --smoke] [--json] [--threads N]

Each method distils a synthetic set from the real training split through the
product's own path (`get_method(name).distill`; MTT's experts come from
`distill_core.ptm.train_ptm` with the "expert" recipe) and is scored by the
evaluation protocol its registry record names (`Method.protocol`: on
Fashion-MNIST, DC 300 epochs without augmentation, DSA/DM/MTT 1000 epochs of
DSA augmentation with parameters per sample), with model selection on the
held-out validation split and accuracy on the official test split, printed as
mean +- std over the evaluation networks. The baselines use the same
protocol as DSA, DM and MTT: `random` (a random real subset at the same IPC,
what DD-Ranking scores against) and `whole` (the whole training split).

Budgets (printed at the start of every run):
- --quick (default): a reduced CPU budget, about 15 minutes on 2 CPU cores:
  ConvNet width 32 (published: 128) for distillation and evaluation, 500
  training images per class, the first 2000 test images, batch_real 64, few
  iterations per method (DC/DSA IPC 10 with (10, 10) outer/inner loops
  instead of (10, 50); DC initialised from real images instead of noise,
  which needs the full budget), every protocol's epochs divided by 5 (DC 60,
  DSA-style 200; `whole` 20), 5 validation checkpoints, 2 evaluation networks.
  Accuracies are therefore far below the published ones; the checks are that
  every method scores higher at IPC 10 than at IPC 1 and that DSA, DM and MTT
  at IPC 10 are no worse than the random subset at IPC 10.
- --full: the published budget (for a GPU): ConvNet width 128, the whole
  dataset, DC/DSA 1000 iterations, DM 20000, MTT 5000 (with 20 expert
  trajectories of 50 epochs), the protocols' full epochs, 5 evaluation networks.
- --smoke: a tiny budget that only proves the pipeline runs (about a minute).

Settings that upstream does not publish for Fashion-MNIST: MTT's syn_steps,
max_start_epoch, lr_img and lr_lr take the published CIFAR-10 values (IPC 1:
50 / 2 / 1000 / 1e-7; IPC 10: 30 / 20 / 1000 / 1e-5) in --full.
With --json the last stdout line is one JSON object with `results`: a list of
{"dataset", "method", "ipc", "acc_mean", "acc_std", "budget", ...} (`dataset` names the data
each row ran on: `digits` where Fashion-MNIST is not installed), including rows for
`random` at each IPC and `whole`, and `checks` with the targets above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from distill_core.data import DatasetUnavailable, build_biased_dataset, load_source
from distill_core.data.sources import SOURCES
from distill_core.evaluation import EvalConfig, evaluate_synthetic
from distill_core.methods import DistillConfig, RealData, get_method
from distill_core.methods.registry import dsa_strategy
from distill_core.ptm import PTMConfig, recipe, train_ptm

METHODS = ("dc", "dsa", "dm", "mtt")
IPCS = (1, 10)

BUDGETS = {
    "smoke": {
        "width": 16, "max_per_class": 60, "test_cap": 500, "batch_real": 32, "repeats": 2,
        "iterations": {"dc": {1: 2, 10: 1}, "dsa": {1: 2, 10: 1}, "dm": {1: 5, 10: 5}, "mtt": {1: 3, 10: 2}},
        "loops": {10: (2, 2)},  # (outer, inner) override for IPC 10
        "init": {"dc": "real"},
        "eval_scale": 100, "whole_epochs": 2, "eval_checkpoints": 2,
        "experts": 1, "expert_train_epochs": 3,
        "mtt": {1: {"syn_steps": 5, "max_start_epoch": 1, "lr_img": 100.0, "lr_lr": 1e-7},
                10: {"syn_steps": 5, "max_start_epoch": 1, "lr_img": 100.0, "lr_lr": 1e-5}},
    },
    "quick": {
        "width": 32, "max_per_class": 500, "test_cap": 2000, "batch_real": 64, "repeats": 2,
        "iterations": {"dc": {1: 60, 10: 4}, "dsa": {1: 60, 10: 4}, "dm": {1: 200, 10: 200},
                       "mtt": {1: 60, 10: 20}},
        "loops": {10: (10, 10)},  # upstream IPC 10: (10, 50)
        # DC from noise needs its full budget; a few iterations from noise end below IPC 1 (57.3 vs 64.0)
        "init": {"dc": "real"},
        "eval_scale": 5, "whole_epochs": 20, "eval_checkpoints": 5,
        "experts": 2, "expert_train_epochs": 3,
        "mtt": {1: {"syn_steps": 20, "max_start_epoch": 2, "lr_img": 100.0, "lr_lr": 1e-7},
                10: {"syn_steps": 10, "max_start_epoch": 2, "lr_img": 100.0, "lr_lr": 1e-5}},
    },
    "full": {
        "width": 128, "max_per_class": None, "test_cap": None, "batch_real": 256, "repeats": 5,
        "iterations": {"dc": {1: 1000, 10: 1000}, "dsa": {1: 1000, 10: 1000}, "dm": {1: 20000, 10: 20000},
                       "mtt": {1: 5000, 10: 5000}},
        "loops": {}, "init": {},
        "eval_scale": 1, "whole_epochs": None, "eval_checkpoints": 10,
        "experts": 20, "expert_train_epochs": 50,
        "mtt": {1: {"syn_steps": 50, "max_start_epoch": 2, "lr_img": 1000.0, "lr_lr": 1e-7},
                10: {"syn_steps": 30, "max_start_epoch": 20, "lr_img": 1000.0, "lr_lr": 1e-5}},
    },
}

def log(msg: str) -> None:
    print(msg, flush=True)


def load_dataset(budget: dict):
    try:
        source = load_source("fashion_mnist", download=False)
    except DatasetUnavailable as exc:
        log(f"WARNING: Fashion-MNIST unavailable ({exc}); falling back to scikit-learn digits: every row below "
            "is a digits figure (its `dataset` says so), not a Fashion-MNIST one")
        source = load_source("digits")
    ds = build_biased_dataset(source, "none", 0.1, 1, max_per_class=budget["max_per_class"])
    if budget["test_cap"] is not None and len(ds.test_labels) > budget["test_cap"]:
        n = budget["test_cap"]  # the official test split's first n images (class-balanced enough for a check)
        ds = dataclasses.replace(ds, test_images=ds.test_images[:n], test_labels=ds.test_labels[:n],
                                 test_attrs=ds.test_attrs[:n], unbiased_images=ds.unbiased_images[:n],
                                 unbiased_labels=ds.unbiased_labels[:n], unbiased_attrs=ds.unbiased_attrs[:n])
    return ds


def train_experts(real: RealData, count: int, epochs: int, width: int, strategy: str) -> list[dict]:
    """The product's expert path: `train_ptm` with MTT's buffer recipe (plain SGD, DSA, every epoch kept)."""
    return [train_ptm(real, PTMConfig(arch_options={"width": width}, seed=e, epochs=epochs,
                                      **recipe("expert", epochs, strategy))).checkpoints
            for e in range(count)]


def describe(name: str, budget: dict) -> str:
    it = budget["iterations"]
    scale = budget["eval_scale"]
    lines = [
        f"budget '{name}': ConvNet width {budget['width']}, "
        f"{budget['max_per_class'] or 'all'} train images per class (10% held out for validation), "
        f"test images: {budget['test_cap'] or 'all'}, batch_real {budget['batch_real']}",
        "  iterations: " + ", ".join(f"{m} {it[m][1]}/{it[m][10]} (IPC 1/10)" for m in METHODS),
        f"  DC/DSA (outer, inner) loops: {budget['loops'] or 'upstream'}; "
        f"init: {', '.join(f'{m} {i}' for m, i in budget['init'].items()) or 'upstream'}; "
        f"MTT: {budget['experts']} experts x {budget['expert_train_epochs']} epochs (expert recipe), "
        + "; ".join(f"IPC {i}: {budget['mtt'][i]}" for i in IPCS),
        "  evaluation: each method's registry protocol" + (f" with its epochs / {scale}" if scale > 1 else "")
        + f"; whole: {budget['whole_epochs'] or 'protocol'} epochs; {budget['repeats']} networks each, "
        f"{budget['eval_checkpoints']} validation checkpoints",
    ]
    return "\n".join(lines)


def eval_config(method: str, budget: dict, source) -> EvalConfig:
    protocol = get_method(method).protocol(source, "convnet")
    epochs = max(1, protocol.epochs // budget["eval_scale"])
    if method == "whole" and budget["whole_epochs"]:
        epochs = budget["whole_epochs"]
    return EvalConfig(arch_options={"width": budget["width"]}, augment=protocol.augment, epochs=epochs,
                      checkpoints=budget["eval_checkpoints"], repeats=budget["repeats"])


def run_one(method: str, ipc: int, real: RealData, ds, budget: dict, name: str, experts) -> dict:
    record = get_method(method)
    source = SOURCES[ds.name]
    options: dict = {}
    lr_img = record.lr_img
    if method in ("dc", "dsa") and ipc in budget["loops"]:
        options["outer_loop"], options["inner_loop"] = budget["loops"][ipc]
    if method == "mtt":
        options = dict(budget["mtt"][ipc])
        lr_img = options.pop("lr_img")
        options["expert_epochs"] = 2
    iterations = budget["iterations"][method][ipc] if record.optimises_images else 0
    cfg = DistillConfig(method=method, ipc=ipc, iterations=iterations, lr_img=lr_img,
                        arch_options={"width": budget["width"]}, batch_real=budget["batch_real"],
                        init=budget["init"].get(method, record.init),
                        augment=dsa_strategy(source) if record.augment else None,
                        seed=0, log_every=max(1, iterations), options=options)  # first and last iteration only
    t0 = time.perf_counter()
    syn = record.distill(real, cfg, experts=experts if record.needs_experts else None)
    distill_s = time.perf_counter() - t0

    eval_cfg = eval_config(method, budget, source)
    t0 = time.perf_counter()
    runs = evaluate_synthetic(syn, ds, eval_cfg)
    eval_s = time.perf_counter() - t0
    accs = [r["acc"] for r in runs]
    result = {
        "dataset": ds.name, "method": method, "ipc": ipc if method != "whole" else None,
        "acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
        "budget": (f"{name}: {cfg.iterations} it, width {budget['width']}, "
                   f"{budget['max_per_class'] or 'all'}/class, eval {eval_cfg.augment or 'none'} "
                   f"{eval_cfg.epochs} ep x {budget['repeats']}"),
        "accs": accs, "distill_s": distill_s, "eval_s": eval_s, "eval_protocol": f"{eval_cfg.augment}/{eval_cfg.epochs}",
    }
    if syn.lr is not None:
        result["syn_lr"] = syn.lr
    label = method.upper() if method != "whole" else "WHOLE"
    log(f"{label:>6} IPC {result['ipc'] or 'all':>3}: {100 * result['acc_mean']:.1f} +- {100 * result['acc_std']:.1f} %"
        f"  (distill {distill_s:.0f}s, eval {eval_s:.0f}s, {result['eval_protocol']})")
    return result


def checks_of(results: list[dict]) -> dict:
    """The quick budget's targets: more IPC helps every method; DSA, DM, MTT beat the random subset at IPC 10."""
    acc = {(r["method"], r["ipc"]): r["acc_mean"] for r in results}
    more_ipc = {m: acc[(m, 10)] > acc[(m, 1)] for m in METHODS}
    over_random = {m: acc[(m, 10)] - acc[("random", 10)] for m in ("dsa", "dm", "mtt")}
    return {"ipc10_beats_ipc1": more_ipc, "ior_ipc10": over_random,
            "all_hold": all(more_ipc.values()) and all(v >= 0 for v in over_random.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced CPU budget (default, ~15 min on 2 cores)")
    mode.add_argument("--full", action="store_true", help="the published budget (for a GPU)")
    mode.add_argument("--smoke", action="store_true", help="tiny budget: proves the pipeline runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    name = "full" if args.full else "smoke" if args.smoke else "quick"
    budget = BUDGETS[name]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.perf_counter()
    ds = load_dataset(budget)
    real = RealData.from_dataset(ds, device)
    log(f"dataset {ds.name}: {len(real.labels)} distillation images, {len(ds.val_index)} validation, "
        f"{len(ds.test_labels)} test; device {device}, {torch.get_num_threads()} thread(s)")
    log(describe(name, budget))
    experts = train_experts(real, budget["experts"], budget["expert_train_epochs"], budget["width"],
                            dsa_strategy(SOURCES[ds.name]))
    log(f"trained {len(experts)} expert trajectories in {time.perf_counter() - t0:.0f}s (incl. data loading)")

    results = [run_one(m, ipc, real, ds, budget, name, experts) for m in (*METHODS, "random") for ipc in IPCS]
    results.append(run_one("whole", IPCS[0], real, ds, budget, name, experts))
    checks = checks_of(results)
    log(f"checks: IPC 10 > IPC 1 {checks['ipc10_beats_ipc1']}; IPC 10 improvement over random "
        + ", ".join(f"{m} {100 * v:+.1f}" for m, v in checks["ior_ipc10"].items())
        + f" -> {'all hold' if checks['all_hold'] else 'NOT all hold'}")
    total = time.perf_counter() - t0
    log(f"total {total:.0f}s")
    out = {"dataset": ds.name, "budget": name, "device": str(device), "threads": torch.get_num_threads(),
           "total_s": total, "results": results, "checks": checks}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
