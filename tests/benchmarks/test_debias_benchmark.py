"""benchmarks/debias.py's machine-readable interface, at smoke sizes (the figures are the quick run's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_debias_benchmark_smoke_prints_every_setting_and_the_targets():
    env = {**os.environ, "DDRAY_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/debias.py", "--smoke", "--json", "--threads", "1"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode == 2:  # no Fashion-MNIST here: one line naming the path, nothing substituted
        assert "/usr/share/datasets/fashion-mnist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        pytest.skip("Fashion-MNIST is not installed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"results", "targets", "weights", "wall_s"} and result["wall_s"] > 0
    settings = [("none", "none"), ("kde", "none"), ("groups", "none"), ("lff", "none"), ("kde", "lff")]
    shares = {(w["aligned_ratio"], w["debias"]): w for w in result["weights"]}
    assert set(shares) == {(p, d) for p in (0.95, 0.99) for d in ("none", "kde", "groups", "lff")}
    for p in (0.95, 0.99):  # no weights: the conflicting samples' share of the weight is their share of the split
        assert shares[(p, "none")]["conflicting_weight_share"] == pytest.approx(shares[(p, "none")]["conflicting_fraction"])
    # at smoke size p = 0.99 leaves no conflicting sample (4 per class x 0.01); at 0.95 groups favours them
    assert shares[(0.95, "groups")]["conflicting_weight_share"] > 2 * shares[(0.95, "groups")]["conflicting_fraction"] > 0
    rows = {(r["method"], r["aligned_ratio"], r["debias"], r["guidance"]) for r in result["results"]}
    assert rows == {(m, p, d, g) for m in ("dm", "dsa") for p in (0.95, 0.99) for d, g in settings}
    for r in result["results"]:
        assert set(r) == {"method", "ipc", "aligned_ratio", "debias", "guidance", "acc_conflicting", "acc_unbiased"}
        assert r["ipc"] == 10 and 0.0 <= r["acc_conflicting"] <= 1.0 and 0.0 <= r["acc_unbiased"] <= 1.0
    targets = result["targets"]
    assert isinstance(targets["T1"]["pass"], bool)
    for name in ("T2", "T4"):
        assert len(targets[name]["cells"]) == 4 and isinstance(targets[name]["pass"], bool)
    assert len(targets["T3"]["cells"]) == 4
