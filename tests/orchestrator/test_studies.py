"""Study records and the results table: one row per setting, mean +- std over seeds x networks."""

import json
import math

import pytest

from orchestrator.errors import UserError
from orchestrator.stages import summarise
from orchestrator.store import ArtifactStore
from orchestrator.studies import load_study, open_record, study_results


def stored_evaluation(store, key, seed, accs, method="dm"):
    coords = {"dataset": "d", "aligned_ratio": 0.1, "severity": 1, "method": method, "ipc": 1, "guidance": "none",
              "eval_arch": "convnet", "iterations": 5, "lr_img": 1.0, "distill_seed": seed, "options": None,
              "eval_protocol": "none/5ep"}
    runs = [{"acc": a, "acc_unbiased": a, "acc_aligned": math.nan, "acc_conflicting": math.nan, "val_acc": a}
            for a in accs]
    result = {"key": key, "coords": coords, "summary": summarise(runs)}
    store.write_stage("evaluate", key, {"result.json": json.dumps(result).encode()}, {})
    return {"kind": "evaluate", "state": "executed", "label": key}


def test_rows_pool_every_network_of_every_distillation_seed(tmp_path):
    store = ArtifactStore(tmp_path)
    stages = {"e0": stored_evaluation(store, "e0", 0, [0.5, 0.7]),
              "e1": stored_evaluation(store, "e1", 1, [0.6, 0.8]),
              "e2": stored_evaluation(store, "e2", 0, [0.1, 0.1], method="random")}
    rows = study_results(store, {"stages": stages})
    assert len(rows) == 2
    dm = next(r for r in rows if r["method"] == "dm")
    assert dm["n_distillations"] == 2 and dm["n_repeats"] == 2
    assert dm["acc_mean"] == pytest.approx(0.65)
    assert dm["acc_std"] == pytest.approx(math.sqrt(((0.15 ** 2) * 2 + (0.05 ** 2) * 2) / 4))
    assert dm["acc_aligned"] is None  # no aligned samples: not a number, not NaN
    assert dm["eval_protocol"] == "none/5ep"


def test_summarise_keeps_every_network():
    s = summarise([{"acc": 0.2, "acc_unbiased": 0.3, "acc_aligned": 0.4, "acc_conflicting": 0.1, "val_acc": 0.5},
                   {"acc": 0.4, "acc_unbiased": 0.5, "acc_aligned": math.nan, "acc_conflicting": 0.3, "val_acc": 0.7}])
    assert s["accs"] == [0.2, 0.4] and s["n_repeats"] == 2
    assert s["acc_mean"] == pytest.approx(0.3) and s["acc_std"] == pytest.approx(0.1)
    assert s["acc_aligned_mean"] == pytest.approx(0.4)  # NaN repeats are left out


def test_records_resolve_by_id_prefix_and_name(tmp_path):
    store = ArtifactStore(tmp_path)
    open_record(store, "alpha-12345678", {"name": "alpha"}, {})
    open_record(store, "alpine-87654321", {"name": "alpine"}, {})
    assert load_study(store, "alpha")["study_id"] == "alpha-12345678"
    assert load_study(store, "alpi")["study_id"] == "alpine-87654321"
    with pytest.raises(UserError, match="ambiguous"):
        load_study(store, "al")
    assert open_record(store, "alpha-12345678", {"name": "alpha"}, {}).data["attempts"] == 2
