"""Debiasing benchmark: every debias kind and LfF guidance, with DM and DSA, on coloured Fashion-MNIST.

    python benchmarks/debias.py [--quick | --smoke] [--json] [--threads N]

Data: real Fashion-MNIST (Debian's `dataset-fashion-mnist`, /usr/share/datasets/
fashion-mnist) coloured by its bias attribute (`build_biased_dataset`, bias
"colored", severity 4: the least colour jitter, the strongest shortcut) at
aligned ratio p = 0.95 and p = 0.99. Nothing is substituted when it is missing:
the script exits 2 with one line naming the path.

Measured, in one run, for DM and DSA at IPC 10 on each variant, the same
distillation and evaluation budget for every setting (debias x guidance):
- debias `none` (unweighted), `kde` (inverse kernel density on raw pixels,
  default options), `groups` (FairDD's equal group weights: the oracle, it
  reads the bias attribute of every sample), `lff` (weights from the relative
  difficulty scores of an LfF PTM trained on the same variant);
- `kde` + `lff` guidance: CLoM (`GuidanceConfig(kind="clom")`, default alpha)
  with the LfF PTM's debiased model as the frozen PTM.
One LfF PTM per variant (and seed) serves both LfF settings (`train_ptm` with
`recipe("lff", ...)`); its training time is reported on its own.
Each synthetic set is scored by its method's registry evaluation protocol
(DSA augmentation for both), epochs per the budget, networks after their last
epoch (no validation split is held out): accuracy on the conflicting test set
(the biased dataset's test set, 100% bias-conflicting) and on the unbiased test
set (uniform attributes), mean over seeds x networks.

Budgets (printed at the start of every run):
- --quick: about 15 minutes on 2 CPU cores (measured there: DM 0.24 s per
  iteration, DSA 0.8, an evaluation network 0.1 s per epoch, the LfF pair 4 s
  per epoch; 20 settings and 2 LfF PTMs share the 15 minutes): ConvNet width
  32, 300 training images per class, the first 2000 images of each test set,
  batch_real 64, DM 120 iterations, DSA 30 iterations with (outer, inner)
  loops (1, 1) (upstream IPC 10: (10, 50)), the LfF PTM 10 epochs, evaluation
  1 network x 100 epochs, one seed. Far below the published budgets: the
  figures compare settings with each other, not with the papers.
- default (full, for a GPU): ConvNet width 128, the whole training split and
  test sets, batch_real 256, DM 5000 iterations, DSA 500 with upstream loops,
  the LfF PTM 100 epochs, 5 networks x 1000 epochs (the protocol), seeds 0, 1, 2.
- --smoke: tiny sizes; only proves the script and its JSON interface run.

Targets (printed with their measured numbers and PASS / FAIL; a failing target
is a result, the budgets are never tuned to make one pass):
- T1: at p = 0.99 with DM, kde's conflicting accuracy >= none's + 15 points.
- T2: in every (method, p) cell, the best attribute-free setting (kde, lff,
  kde + lff guidance; best by conflicting accuracy) >= kde alone + 3 points.
- T3: groups, the oracle: its numbers per cell (no target).
- T4: in every cell, the unbiased-test accuracy of that best attribute-free
  setting >= none's.
Each kind's weights are also summarised per variant: the conflicting samples'
share of the split and their share of the total weight (`weights` in the JSON).

Seeds are fixed (data, distillation, LfF PTM, evaluation networks): a rerun on
the same machine gives the same numbers. With --json the last stdout line is
{"results": [{"method", "ipc", "aligned_ratio", "debias", "guidance",
"acc_conflicting", "acc_unbiased"}, ...], "targets": {...}, "wall_s": ...},
accuracies as fractions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from distill_core.data import DatasetUnavailable, build_biased_dataset, load_source
from distill_core.data.sources import SOURCES, SYSTEM_PATHS
from distill_core.debias import distillation_attributes, get_debias, weight_summary
from distill_core.evaluation import EvalConfig, EvalSets, evaluate_repeats
from distill_core.guidance import GuidanceConfig, PTMGuidance, PTMPool
from distill_core.methods import DistillConfig, RealData, get_method
from distill_core.methods.registry import dsa_strategy
from distill_core.networks import build_network
from distill_core.ptm import PTMConfig, recipe, train_ptm
from distill_core.runtime import Runtime

SOURCE = "fashion_mnist"
DATA_PATH = SYSTEM_PATHS[SOURCE][0]
METHODS = ("dm", "dsa")
RATIOS = (0.95, 0.99)
SEVERITY = 4
IPC = 10
# (debias, guidance); "none" guidance: no PTM term
SETTINGS = (("none", "none"), ("kde", "none"), ("groups", "none"), ("lff", "none"), ("kde", "lff"))
ATTRIBUTE_FREE = (("kde", "none"), ("lff", "none"), ("kde", "lff"))

BUDGETS = {
    "smoke": {"width": 16, "max_per_class": 40, "test_cap": 300, "batch_real": 16, "seeds": (0,),
              "iterations": {"dm": 4, "dsa": 2}, "loops": (1, 1), "lff_epochs": 2,
              "eval_epochs": 4, "networks": 1},
    # measured on 2 CPU cores: DM 0.24 s/iteration, DSA (1, 1) 0.8 s/iteration, an evaluation network
    # 0.1 s/epoch, the LfF pair 4 s/epoch: 20 settings + 2 LfF PTMs fit ~15 minutes at these counts
    "quick": {"width": 32, "max_per_class": 300, "test_cap": 2000, "batch_real": 64, "seeds": (0,),
              "iterations": {"dm": 120, "dsa": 30}, "loops": (1, 1), "lff_epochs": 10,
              "eval_epochs": 100, "networks": 1},
    "full": {"width": 128, "max_per_class": None, "test_cap": None, "batch_real": 256, "seeds": (0, 1, 2),
             "iterations": {"dm": 5000, "dsa": 500}, "loops": None, "lff_epochs": 100,
             "eval_epochs": None, "networks": 5},
}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def describe(name: str, b: dict) -> str:
    loops = f"loops {b['loops']}" if b["loops"] else "upstream loops"
    return (f"budget '{name}': coloured {SOURCE}, severity {SEVERITY}, p in {RATIOS}, IPC {IPC}, ConvNet width "
            f"{b['width']}, {b['max_per_class'] or 'all'} train images per class, test images "
            f"{b['test_cap'] or 'all'} per test set, batch_real {b['batch_real']}\n"
            f"  DM {b['iterations']['dm']} iterations; DSA {b['iterations']['dsa']} iterations, {loops}; "
            f"LfF PTM {b['lff_epochs']} epochs; evaluation {b['networks']} network(s) x "
            f"{b['eval_epochs'] or 'protocol'} epochs (each method's protocol augmentation), last epoch; "
            f"seeds {list(b['seeds'])}")


def load_variant(ratio: float, b: dict):
    """The coloured variant at aligned ratio `ratio`, test sets capped to their first `test_cap` images."""
    try:
        source = load_source(SOURCE, download=False)
    except DatasetUnavailable:
        print(f"Fashion-MNIST not found at {DATA_PATH} (Debian package dataset-fashion-mnist)", file=sys.stderr)
        raise SystemExit(2)
    ds = build_biased_dataset(source, "colored", ratio, SEVERITY, seed=0, max_per_class=b["max_per_class"])
    n = b["test_cap"]
    if n is not None and len(ds.test_labels) > n:
        ds = dataclasses.replace(ds, test_images=ds.test_images[:n], test_labels=ds.test_labels[:n],
                                 test_attrs=ds.test_attrs[:n], unbiased_images=ds.unbiased_images[:n],
                                 unbiased_labels=ds.unbiased_labels[:n], unbiased_attrs=ds.unbiased_attrs[:n])
    return ds


def train_lff_ptm(real: RealData, b: dict, seed: int, strategy: str):
    """The LfF PTM of one variant: `train_ptm` with the lff recipe; its debiased model and per-sample scores."""
    epochs = b["lff_epochs"]
    fields = {"objective": "lff", **recipe("lff", epochs, strategy)}
    cfg = PTMConfig(arch_options={"width": b["width"]}, seed=seed, epochs=epochs, **fields)
    result = train_ptm(real, cfg)
    state = result.checkpoints[max(result.checkpoints)]
    model = build_network(cfg.arch, real.shape[0], real.num_classes, real.shape[-1], **cfg.arch_options)
    model.load_state_dict(state)
    model.to(real.device)
    return model, result.scores, result.history


def weights_for(debias: str, real: RealData, ds, scores) -> torch.Tensor | None:
    kind = get_debias(debias)
    if debias == "groups":
        return kind.compute(real.images, real.labels, real.num_classes, None, attributes=distillation_attributes(ds))
    if debias == "lff":
        return kind.compute(real.images, real.labels, real.num_classes, None, scores=scores)
    return kind.compute(real.images, real.labels, real.num_classes, None)  # none; kde on pixels, defaults


def distill_config(method: str, b: dict, seed: int, strategy: str) -> DistillConfig:
    record = get_method(method)
    options = {}
    if method == "dsa" and b["loops"]:
        options["outer_loop"], options["inner_loop"] = b["loops"]
    iterations = b["iterations"][method]
    return DistillConfig(method=method, ipc=IPC, iterations=iterations, lr_img=record.lr_img,
                         arch_options={"width": b["width"]}, batch_real=b["batch_real"], init=record.init,
                         augment=strategy if record.augment else None, seed=seed,
                         log_every=max(1, iterations), options=options)


def eval_config(method: str, b: dict, seed: int) -> EvalConfig:
    protocol = get_method(method).protocol(SOURCES[SOURCE], "convnet")
    return EvalConfig(arch_options={"width": b["width"]}, augment=protocol.augment,
                      epochs=b["eval_epochs"] or protocol.epochs, checkpoints=1, selection="last",
                      repeats=b["networks"], seed=seed)


def run_setting(method, debias, guidance, real, ds, sets, weights, lff_model, b, seed, strategy, runtime) -> dict:
    t0 = time.perf_counter()
    weighted = dataclasses.replace(real, weights=weights)
    guide = None
    if guidance == "lff":
        pool = PTMPool()
        pool.add("convnet", lff_model)
        guide = PTMGuidance(GuidanceConfig(kind="clom"), pool, seed=seed)
    cfg = distill_config(method, b, seed, strategy)
    syn = get_method(method).distill(weighted, cfg, runtime, guidance=guide, progress=None)
    distill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    runs = evaluate_repeats(syn, sets, eval_config(method, b, seed), runtime)
    return {"runs": runs, "distill_s": distill_s, "eval_s": time.perf_counter() - t1}


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def targets_of(rows: list[dict]) -> dict:
    acc = {(r["method"], r["aligned_ratio"], r["debias"], r["guidance"]): r for r in rows}
    out: dict = {}
    none, kde = acc[("dm", 0.99, "none", "none")], acc[("dm", 0.99, "kde", "none")]
    margin = kde["acc_conflicting"] - none["acc_conflicting"]
    out["T1"] = {"what": "kde >= none + 15 points of conflicting accuracy, DM, p = 0.99", "method": "dm",
                 "aligned_ratio": 0.99, "kde": kde["acc_conflicting"], "none": none["acc_conflicting"],
                 "margin": margin, "threshold": 0.15, "pass": margin >= 0.15 - 1e-12}
    t2, t3, t4 = [], [], []
    for method in METHODS:
        for p in RATIOS:
            free = [acc[(method, p, d, g)] for d, g in ATTRIBUTE_FREE if (method, p, d, g) in acc]
            best = max(free, key=lambda r: r["acc_conflicting"])  # ties: the first listed (kde)
            kde_c, none_c = acc[(method, p, "kde", "none")], acc[(method, p, "none", "none")]
            label = best["debias"] + ("" if best["guidance"] == "none" else f"+{best['guidance']} guidance")
            m2 = best["acc_conflicting"] - kde_c["acc_conflicting"]
            t2.append({"method": method, "aligned_ratio": p, "best": label, "best_acc": best["acc_conflicting"],
                       "kde": kde_c["acc_conflicting"], "margin": m2, "pass": m2 >= 0.03 - 1e-12})
            g = acc[(method, p, "groups", "none")]
            t3.append({"method": method, "aligned_ratio": p, "acc_conflicting": g["acc_conflicting"],
                       "acc_unbiased": g["acc_unbiased"]})
            m4 = best["acc_unbiased"] - none_c["acc_unbiased"]
            t4.append({"method": method, "aligned_ratio": p, "best": label, "best_unbiased": best["acc_unbiased"],
                       "none_unbiased": none_c["acc_unbiased"], "margin": m4, "pass": m4 >= 0.0})
    settings = [f"{d}" + ("" if g == "none" else f"+{g} guidance") for d, g in ATTRIBUTE_FREE]
    out["T2"] = {"what": "best attribute-free setting >= kde + 3 points of conflicting accuracy",
                 "scope": "every (method, p) cell", "settings": settings, "threshold": 0.03,
                 "cells": t2, "pass": all(c["pass"] for c in t2)}
    out["T3"] = {"what": "groups (oracle, uses attributes): reported, no target", "cells": t3}
    out["T4"] = {"what": "unbiased accuracy of the best attribute-free setting >= none's",
                 "scope": "every (method, p) cell", "cells": t4, "pass": all(c["pass"] for c in t4)}
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_targets(t: dict) -> None:
    t1 = t["T1"]
    log(f"T1 {t1['what']}: kde {pct(t1['kde'])} vs none {pct(t1['none'])} -> {100 * t1['margin']:+.1f} points "
        f"-> {verdict(t1['pass'])}")
    t2 = t["T2"]
    log(f"T2 {t2['what']} ({t2['scope']}; over {', '.join(t2['settings'])}):")
    for c in t2["cells"]:
        log(f"    {c['method']:>3} p={c['aligned_ratio']}: best {c['best']} {pct(c['best_acc'])} vs kde "
            f"{pct(c['kde'])} -> {100 * c['margin']:+.1f} points -> {verdict(c['pass'])}")
    log(f"  T2 -> {verdict(t2['pass'])}")
    log(f"T3 {t['T3']['what']}:")
    for c in t["T3"]["cells"]:
        log(f"    {c['method']:>3} p={c['aligned_ratio']}: conflicting {pct(c['acc_conflicting'])}, "
            f"unbiased {pct(c['acc_unbiased'])}")
    t4 = t["T4"]
    log(f"T4 {t4['what']} ({t4['scope']}):")
    for c in t4["cells"]:
        log(f"    {c['method']:>3} p={c['aligned_ratio']}: best {c['best']} unbiased {pct(c['best_unbiased'])} vs "
            f"none {pct(c['none_unbiased'])} -> {100 * c['margin']:+.1f} points -> {verdict(c['pass'])}")
    log(f"  T4 -> {verdict(t4['pass'])}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced CPU budget (~15 min on 2 cores)")
    mode.add_argument("--smoke", action="store_true", help="tiny budget: proves the script runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    b = BUDGETS[name]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = Runtime(device=str(device))
    strategy = dsa_strategy(SOURCES[SOURCE])

    t_start = time.perf_counter()
    settings = SETTINGS
    log(f"device {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    log(describe(name, b))

    rows, timings, shares = [], [], []
    for p in RATIOS:
        t0 = time.perf_counter()
        ds = load_variant(p, b)
        real = RealData.from_dataset(ds, device)
        sets = EvalSets.from_dataset(ds, device)
        log(f"p={p}: {len(real.labels)} distillation images "
            f"({sum(ds.meta['counts']['train_conflicting'])} bias-conflicting), "
            f"test {len(ds.test_labels)} conflicting + {len(ds.unbiased_labels)} unbiased "
            f"({time.perf_counter() - t0:.0f}s)")
        runs: dict = {}  # (method, debias, guidance) -> list of network records over seeds
        wall: dict = {}
        for seed in b["seeds"]:
            t0 = time.perf_counter()
            lff_model, scores, history = train_lff_ptm(real, b, seed, strategy)
            lff_s = time.perf_counter() - t0
            last = history[-1] if history else {}
            log(f"  LfF PTM (seed {seed}): {b['lff_epochs']} epochs in {lff_s:.0f}s"
                + (f", last epoch {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()})}"
                   if last else ""))
            timings.append({"what": f"LfF PTM p={p} seed {seed}", "s": lff_s})
            weights = {}
            attributes = distillation_attributes(ds)
            for debias in dict.fromkeys(d for d, _ in settings):
                t0 = time.perf_counter()
                weights[debias] = weights_for(debias, real, ds, scores)
                wall[("weights", debias)] = wall.get(("weights", debias), 0.0) + time.perf_counter() - t0
                # how much of the weight the conflicting samples get: what the kind gives a method to work with
                w = weights[debias] if weights[debias] is not None else torch.ones(len(real.labels))
                summary = weight_summary(w.cpu(), real.labels.cpu(), attributes.cpu())
                shares.append({"aligned_ratio": p, "seed": seed, "debias": debias,
                               "conflicting_fraction": summary["conflicting_fraction"],
                               "conflicting_weight_share": summary["conflicting_weight_share"]})
                log(f"  weights {debias:<6} p={p} seed {seed}: conflicting samples "
                    f"{pct(summary['conflicting_fraction'])} of the split, {pct(summary['conflicting_weight_share'])} "
                    "of the weight")
            for method in METHODS:
                for debias, guidance in settings:
                    res = run_setting(method, debias, guidance, real, ds, sets, weights[debias], lff_model, b, seed,
                                      strategy, runtime)
                    key = (method, debias, guidance)
                    runs.setdefault(key, []).extend(res["runs"])
                    s = res["distill_s"] + res["eval_s"]
                    wall[key] = wall.get(key, 0.0) + s
                    accs = [r["acc"] for r in res["runs"]]
                    log(f"  {method:>3} p={p} seed {seed} debias {debias:<6} guidance {guidance:<4}: conflicting "
                        f"{pct(statistics.mean(accs))} (distill {res['distill_s']:.0f}s, eval {res['eval_s']:.0f}s)")
        for (method, debias, guidance), recs in runs.items():
            rows.append({"method": method, "ipc": IPC, "aligned_ratio": p, "debias": debias, "guidance": guidance,
                         "acc_conflicting": statistics.mean(r["acc"] for r in recs),
                         "acc_unbiased": statistics.mean(r["acc_unbiased"] for r in recs)})
            timings.append({"what": f"{method} p={p} {debias} guidance {guidance}",
                            "s": wall[(method, debias, guidance)] + wall[("weights", debias)]})

    log("")
    log(f"{'method':<6} {'p':>5} {'debias':<7} {'guidance':<8} {'acc_conflicting':>15} {'acc_unbiased':>12}")
    for r in rows:
        log(f"{r['method']:<6} {r['aligned_ratio']:>5} {r['debias']:<7} {r['guidance']:<8} "
            f"{pct(r['acc_conflicting']):>15} {pct(r['acc_unbiased']):>12}")
    log("")
    targets = targets_of(rows)
    print_targets(targets)
    log("")
    log("wall time per setting (distillation + evaluation + its weights; the LfF PTM on its own):")
    for t in timings:
        log(f"    {t['what']:<40} {t['s']:6.0f}s")
    wall_s = time.perf_counter() - t_start
    log(f"total wall time {wall_s:.0f}s")
    out = {"results": rows, "targets": targets, "weights": shares, "wall_s": wall_s}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
