"""Study records and the results table: one row per setting, mean +- std over seeds x networks."""

import json
import math
import os

import pytest

from orchestrator.errors import UserError
from orchestrator.reporting.results import study_findings, study_results
from orchestrator.stages.evaluate import summarise
from orchestrator.storage.leases import Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import StudyLog, list_studies, load_record, request_cancel


def stored_evaluation(store, key, seed, accs, method="dm"):
    coords = {"dataset": "d", "aligned_ratio": 0.1, "severity": 1, "method": method, "ipc": 1, "guidance": "none",
              "eval_arch": "convnet", "iterations": 5, "lr_img": 1.0, "distill_seed": seed, "options": None,
              "eval_protocol": "none/5ep"}
    runs = [{"acc": a, "acc_unbiased": a, "acc_aligned": math.nan, "acc_conflicting": math.nan, "val_acc": a,
             "acc_last": a, "acc_val_selected": a - 0.1, "selection": "last"} for a in accs]
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
    assert dm["acc_std_distill"] == pytest.approx(0.05)  # the per-distillation means 0.6 and 0.7
    assert dm["acc_last"] == pytest.approx(0.65) and dm["acc_val_selected"] == pytest.approx(0.55)
    assert dm["acc_last_std"] == pytest.approx(dm["acc_std"]) == pytest.approx(dm["acc_val_selected_std"])


def test_summarise_keeps_every_network():
    s = summarise([{"acc": 0.2, "acc_unbiased": 0.3, "acc_aligned": 0.4, "acc_conflicting": 0.1, "val_acc": 0.5,
                    "acc_last": 0.2, "acc_val_selected": 0.25, "selection": "last"},
                   {"acc": 0.4, "acc_unbiased": 0.5, "acc_aligned": math.nan, "acc_conflicting": 0.3, "val_acc": 0.7,
                    "acc_last": 0.4, "acc_val_selected": None, "selection": "last"}])
    assert s["accs"] == [0.2, 0.4] and s["n_repeats"] == 2 and s["selection"] == "last"
    assert s["acc_mean"] == pytest.approx(0.3) and s["acc_std"] == pytest.approx(0.1)
    assert s["acc_aligned_mean"] == pytest.approx(0.4)  # NaN repeats are left out
    assert s["networks"]["acc_aligned"] == [0.4, None] and s["networks"]["acc_val_selected"] == [0.25, None]
    assert s["acc_val_selected_mean"] == pytest.approx(0.25) and s["acc_last_mean"] == pytest.approx(0.3)


def test_findings_are_read_from_the_stored_evaluations_and_the_recorded_spec(tmp_path):
    store = ArtifactStore(tmp_path)
    stages = {f"e{s}{m}": stored_evaluation(store, f"e{s}{m}", s, [base + 0.01 * s, base + 0.02], method=m)
              for s in range(3) for m, base in (("dm", 0.6), ("random", 0.4))}
    claim = {"id": "dm-beats-random", "statement": "DM beats the random subset", "a": {"method": "dm"},
             "b": {"method": "random"}, "expect": "greater"}
    [f] = study_findings(store, {"stages": stages, "spec": {"findings": [claim]}})
    assert f["verdict"] == "holds" and f["effect"] == pytest.approx(20.0) and f["n"] == 12
    assert f["ci95"] == pytest.approx([20.0, 20.0])  # paired on seed and network: a constant difference
    assert study_findings(store, {"stages": stages, "spec": {}}) == []


def started(store, study_id, stages=None, name=None) -> StudyLog:
    log = StudyLog(store, study_id, Owner.here())
    log.start({"name": name or study_id.rsplit("-", 1)[0]}, stages or {})
    return log


def test_records_resolve_by_id_prefix_and_name(tmp_path):
    store = ArtifactStore(tmp_path)
    started(store, "alpha-12345678").finish("succeeded")
    started(store, "alpine-87654321").finish("succeeded")
    assert load_record(store, "alpha")["study_id"] == "alpha-12345678"
    assert load_record(store, "alpi")["study_id"] == "alpine-87654321"
    with pytest.raises(UserError, match="ambiguous"):
        load_record(store, "al")
    with pytest.raises(UserError, match=r"not found .* \(did you mean 'alpha-12345678'\?\)"):
        load_record(store, "alpha-12345679")
    started(store, "alpha-12345678").finish("succeeded")
    assert load_record(store, "alpha")["attempts"] == 2


@pytest.mark.parametrize("bad", ["../../x", "a/b", "", ".hidden", "x" * 200])
def test_study_ids_from_the_cli_must_name_a_study_inside_the_store(tmp_path, bad):
    with pytest.raises(UserError, match="study id"):
        load_record(ArtifactStore(tmp_path), bad)


def test_stage_states_are_the_record_plus_the_appended_events(tmp_path):
    store = ArtifactStore(tmp_path)
    stages = {k: {"kind": "ptm", "label": k, "state": "pending"} for k in ("a", "b", "c")}
    log = started(store, "s-1", stages)
    log.set("a", "running")
    log.set("a", "executed", attempts=2)
    log.set("b", "failed", "ValueError: x")
    rec = load_record(store, "s-1")
    assert rec["state"] == "running"  # the driver's heartbeat is fresh and it has no final state
    assert {k: v["state"] for k, v in rec["stages"].items()} == {"a": "executed", "b": "failed", "c": "pending"}
    assert rec["stages"]["a"]["attempts"] == 2 and rec["stages"]["b"]["error"] == "ValueError: x"
    assert rec["counts"]["executed"] == 1 and rec["counts"]["failed"] == 1
    log.finish("failed")
    assert load_record(store, "s-1")["state"] == "failed"
    lines = (tmp_path / "studies" / "s-1" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one appended line per transition, nothing rewritten


def test_a_driver_that_died_is_abandoned_not_running(tmp_path):
    import json

    store = ArtifactStore(tmp_path)
    log = started(store, "s-2", {"a": {"kind": "ptm", "label": "a", "state": "pending"}})
    path = tmp_path / "studies" / "s-2" / "drivers" / f"{log.owner.driver}.json"
    beat = json.loads(path.read_text())
    path.write_text(json.dumps({**beat, "pid": 2**22 + 12345}))  # a pid that does not exist on this host
    assert load_record(store, "s-2")["state"] == "abandoned"
    path.write_text(json.dumps({**beat, "host": "elsewhere", "place": "elsewhere.0123456789"}))
    assert load_record(store, "s-2")["state"] == "running"  # another host's driver, just heard from
    old = path.stat().st_mtime - 3600
    os.utime(path, (old, old))  # silent for an hour by the store's clock (its own "heartbeat" field is not read)
    assert load_record(store, "s-2")["state"] == "abandoned"
    assert list_studies(store)[0]["state"] == "abandoned"


def test_rows_are_scored_against_the_random_subset_evaluated_the_same_way(tmp_path):
    from orchestrator.reporting.results import scored

    def row(method, acc, ipc=1, protocol="dsa/5ep", reference=None, aligned=None, conflicting=None):
        return {"dataset": "d", "aligned_ratio": 0.95, "severity": 1, "method": method, "ipc": ipc,
                "guidance": "none", "eval_arch": "convnet", "eval_protocol": protocol, "acc_mean": acc,
                "acc_aligned": aligned, "acc_conflicting": conflicting, "reference": reference}
    rows = scored([row("dm", 0.7, aligned=0.9, conflicting=0.6), row("dm", 0.8, ipc=10),
                   row("dc", 0.65, protocol="none/5ep"),
                   row("random", 0.5, reference="random_subset"), row("random", 0.6, ipc=10, reference="random_subset"),
                   row("random", 0.55, protocol="none/5ep", reference="random_subset"),
                   row("whole", 0.9)])
    by = {(r["method"], r["ipc"]): r for r in rows}
    assert ("random", 1) not in by  # the baseline the study added is not a row itself
    assert by[("dm", 1)]["acc_random"] == 0.5 and by[("dm", 1)]["ior"] == pytest.approx(0.2)
    assert by[("dm", 10)]["ior"] == pytest.approx(0.2)
    assert by[("dc", 1)]["acc_random"] == 0.55  # DC's own protocol, not DM's
    assert by[("dm", 1)]["acc_whole"] == 0.9 and by[("dc", 1)]["acc_whole"] is None
    assert by[("dm", 1)]["gap"] == pytest.approx(0.3) and by[("dm", 10)]["gap"] is None


def test_cancel_reaches_a_running_study_and_leaves_a_finished_one_alone(tmp_path):
    store = ArtifactStore(tmp_path)
    running = started(store, "alpha-12345678")
    assert request_cancel(store, "alpha")["state"] == "running" and running.cancel_requested()
    running.finish("cancelled")
    started(store, "beta-12345678").finish("succeeded")
    assert request_cancel(store, "beta")["state"] == "succeeded"
    assert not (store.study_dir("beta-12345678") / "cancel").exists()  # no stale request for its next submit
