"""Early stopping in a distillation search: what ASHA saves against FIFO, and what it costs in the best found.

    python benchmarks/search.py [--quick] [--json]

One search space (DM's image learning rate, log-uniform over five orders of
magnitude, on real Fashion-MNIST; `--quick`: scikit-learn's digits, coloured)
is searched three times through ddray on a local Ray, each a full study (a
dataset stage, the search stage, an evaluation of the best set):
- FIFO with Tune's random search: every trial runs its whole budget;
- ASHA with the same random search (same seed, so the same trials are proposed);
- FIFO with Optuna's TPE (same seed, same number of trials).

`asha_compute_fraction` = ASHA's total trial iterations / FIFO's; `best_gap` = the
best validation accuracy FIFO found - ASHA's (targets: <= 0.6 and <= 0.01).
`random_best` / `optuna_best`: the best validation accuracy after N trials of each
(`best_after` lists the running best per trial, in trial order).
The last stdout line with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from orchestrator.execution.submit import submit_study  # noqa: E402
from orchestrator.spec.loading import parse_spec  # noqa: E402


def study(name: str, quick: bool, search: dict) -> dict:
    source = {"name": "cdigits", "source": "digits", "bias": "colored", "aligned_ratios": [0.95]} if quick else \
        {"name": "fmnist", "source": "fashion_mnist", "bias": "none", "max_per_class": 2000}
    return {
        "version": 1, "name": name, "datasets": [source],
        "distillation": {"methods": ["dm"], "ipc": [10], "iterations": 60 if quick else 200,
                         "arch": {"name": "convnet", "width": 16 if quick else 32}, "batch_real": 32 if quick else 64,
                         "search": {"space": {"lr_img": {"loguniform": [0.01, 1000.0]}}, "seed": 0,
                                    "num_samples": 8 if quick else 12, "max_concurrent": 2,
                                    "proxy": {"every": 10 if quick else 25, "epochs": 30 if quick else 50},
                                    **search}},
        "evaluation": {"architectures": [{"name": "convnet", "width": 16}], "repeats": 1, "epochs": 5,
                       "checkpoints": 1},
    }


def run(name: str, quick: bool, search: dict, root: Path) -> dict:
    data = study(name, quick, search)
    started = time.time()
    outcome = submit_study(parse_spec(data), yaml.safe_dump(data), store_root=str(root / name),
                           tracking_uri=f"sqlite:///{root}/{name}.db")
    assert outcome.state == "succeeded", outcome.errors
    (key,) = [p.name for p in (root / name / "stages" / "search").iterdir()]
    result = json.loads((root / name / "stages" / "search" / key / "result.json").read_text())
    trials = result["trials"]
    best_after, best = [], 0.0
    for t in trials:
        if t["complete"]:
            best = max(best, t["val_acc"])
        best_after.append(round(best, 4))
    return {"wall_s": round(time.time() - started, 1), "trial_iterations": result["search"]["trial_iterations"],
            "trials": len(trials), "stopped_early": result["search"]["stopped_early"],
            "best_val_acc": result["search"]["best"]["val_acc"], "best_lr_img": result["search"]["best"]["config"],
            "best_after": best_after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits instead of Fashion-MNIST, fewer trials")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fifo = run("fifo", args.quick, {"scheduler": "fifo"}, root)
        print(f"fifo random: {fifo}", flush=True)
        asha = run("asha", args.quick, {"scheduler": "asha", "reduction_factor": 3}, root)
        print(f"asha random: {asha}", flush=True)
        optuna = run("optuna", args.quick, {"scheduler": "fifo", "algorithm": "optuna"}, root)
        print(f"fifo optuna: {optuna}", flush=True)
    out = {
        "asha_compute_fraction": round(asha["trial_iterations"] / fifo["trial_iterations"], 3),
        "best_gap": round(fifo["best_val_acc"] - asha["best_val_acc"], 4),
        "random_best": round(fifo["best_val_acc"], 4), "optuna_best": round(optuna["best_val_acc"], 4),
        "asha_stopped_early": asha["stopped_early"], "trials": fifo["trials"],
        "random_best_after": fifo["best_after"], "optuna_best_after": optuna["best_after"],
        "wall_s": {"fifo": fifo["wall_s"], "asha": asha["wall_s"], "optuna": optuna["wall_s"]},
        "targets": {"asha_compute_fraction": "<= 0.6", "best_gap": "<= 0.01"},
    }
    print(f"asha_compute_fraction {out['asha_compute_fraction']} (target <= 0.6), best_gap {out['best_gap']} "
          f"(target <= 0.01); random best {out['random_best']} vs optuna best {out['optuna_best']} "
          f"after {out['trials']} trials")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
