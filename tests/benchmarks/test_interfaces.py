"""The benchmarks' machine-readable interface (scripts depend on it), at smoke sizes.

The figures themselves belong to the benchmark runs recorded in the README;
here only the interface and the built-in correctness checks are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_methods_benchmark_smoke_prints_its_json_interface():
    env = {**os.environ, "DDRAY_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "benchmarks/methods.py", "--smoke", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("matching_speedup", "evaluation_speedup", "peak_fraction"):
        assert isinstance(result[key], float) and result[key] > 0, key
    # every matching mode and evaluation form agreed with upstream's form
    assert result["matching_identical"] and result["evaluation_identical"]
    assert set(result["matching_modes"]) == {"loop", "batched", "tiled", "tiled_compiled"}
    assert result["budget"] == "smoke" and result["data"] == "digits"


@pytest.mark.slow
def test_fidelity_benchmark_smoke_prints_rows_for_every_method_and_the_random_baseline():
    env = {**os.environ, "DDRAY_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "benchmarks/fidelity.py", "--smoke", "--json", "--threads", "1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    rows = {(r["method"], r["ipc"]) for r in result["results"]}
    assert rows == {(m, i) for m in ("dc", "dsa", "dm", "mtt", "random") for i in (1, 10)} | {("whole", None)}
    for r in result["results"]:
        assert {"method", "ipc", "acc_mean", "acc_std", "budget"} <= set(r) and 0.0 <= r["acc_mean"] <= 1.0
        assert r["dataset"] == result["dataset"] in ("fashion_mnist", "digits")  # each row names its data
    assert set(result["checks"]) == {"ipc10_beats_ipc1", "ior_ipc10", "all_hold"}


@pytest.mark.slow
def test_orchestration_benchmark_quick_prints_its_json_interface():
    out = subprocess.run([sys.executable, "benchmarks/orchestration.py", "--quick", "--json"], cwd=ROOT,
                         env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, capture_output=True, text=True,
                         timeout=900, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("per_stage_overhead_ms", "scale_growth", "tracking_ms_per_stage", "mlflow_floor_ms"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["stages"][1] >= 10 * result["stages"][0] * 0.99
    # issue 18: a renew pass at 10,000 held leases on moto, and the queries of a resync after an outage
    assert isinstance(result["lease_renew_pass_10k_s"], float) and 0 < result["lease_renew_pass_10k_s"]
    assert isinstance(result["lease_renew_pass_10k_ttl_fraction"], float)  # the target is the README's, not a test's
    assert isinstance(result["resync_queries_10k"], int) and result["resync_queries_10k"] <= 10
