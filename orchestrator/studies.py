"""Study records in the store: state, per-stage state, and the results table.

`studies/<study_id>/record.json` is rewritten atomically on every state
change, so `ddray study status` shows live progress from another shell and a
crashed driver leaves an accurate record of what finished.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.store import ArtifactStore, atomic_write_json

RESULT_KEYS = ("dataset", "aligned_ratio", "severity", "method", "ipc", "guidance", "eval_arch")
# coordinates that tell rows apart beyond RESULT_KEYS; the distillation seed is averaged over instead
ROW_EXTRAS = ("iterations", "lr_img", "options", "eval_protocol")


class StudyRecord:
    def __init__(self, store: ArtifactStore, data: dict):
        self.store = store
        self.data = data

    @property
    def path(self) -> Path:
        return self.store.study_dir(self.data["study_id"]) / "record.json"

    def save(self) -> None:
        self.data["updated"] = time.time()
        atomic_write_json(self.path, self.data)

    def set_stage(self, key: str, state: str, error: str | None = None) -> None:
        self.data["stages"][key]["state"] = state
        if error:
            self.data["stages"][key]["error"] = error
        self.data["counts"] = self.counts()
        self.save()

    def counts(self) -> dict[str, int]:
        states = [s["state"] for s in self.data["stages"].values()]
        return {"total": len(states), **{k: states.count(k) for k in
                ("pending", "running", "executed", "cached", "failed", "skipped")}}


def open_record(store: ArtifactStore, study_id: str, fields: dict, stages: dict) -> StudyRecord:
    """Start a fresh attempt of a study, keeping its creation time and history."""
    path = store.study_dir(study_id) / "record.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    data = {**fields, "study_id": study_id, "created": previous.get("created", time.time()),
            "attempts": previous.get("attempts", 0) + 1, "state": "running", "stages": stages}
    record = StudyRecord(store, data)
    record.data["counts"] = record.counts()
    record.save()
    return record


def list_studies(store: ArtifactStore) -> list[dict]:
    out = []
    for path in sorted((store.root / "studies").glob("*/record.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda r: r.get("created", 0))


def load_study(store: ArtifactStore, study_id: str) -> dict:
    path = store.study_dir(study_id) / "record.json"
    if path.exists():
        return json.loads(path.read_text())
    matches = [r for r in list_studies(store) if r["study_id"].startswith(study_id) or r.get("name") == study_id]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"study id '{study_id}' is ambiguous: {', '.join(r['study_id'] for r in matches)}")
    raise UserError(f"study '{study_id}' not found in store '{store.root}'")


def study_results(store: ArtifactStore, record: dict) -> list[dict]:
    """One row per evaluated setting: grid coordinates and accuracy over distillation seeds x networks.

    Evaluation stages that differ only in their distillation seed are one row:
    `acc_mean` / `acc_std` are over every network of every distillation (as
    upstream reports mean +- std over experiments x evaluation models), with
    `n_distillations` and `n_repeats` (networks per distillation).
    """
    groups: dict[str, list[dict]] = {}
    for key, st in record["stages"].items():
        if st["kind"] != "evaluate" or st["state"] not in ("executed", "cached"):
            continue
        result = store.read_json("evaluate", key, "result.json")
        coords = result["coords"]
        row_key = json.dumps([coords.get(k) for k in (*RESULT_KEYS, *ROW_EXTRAS)], sort_keys=True, default=str)
        groups.setdefault(row_key, []).append(result)
    rows = [_row(results) for results in groups.values()]
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in (*RESULT_KEYS, *ROW_EXTRAS)))


def _row(results: list[dict]) -> dict:
    coords = results[0]["coords"]
    summaries = [r["summary"] for r in results]
    accs = [a for s in summaries for a in s["accs"]]

    def mean_of(name: str) -> float | None:
        vals = [s[name] for s in summaries if s.get(name) is not None and math.isfinite(s[name])]
        return sum(vals) / len(vals) if vals else None

    row = {k: coords.get(k) for k in (*RESULT_KEYS, *ROW_EXTRAS)}
    mean = sum(accs) / len(accs)
    row.update({
        "acc_mean": mean, "acc_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)),
        "acc_unbiased": mean_of("acc_unbiased_mean"), "acc_aligned": mean_of("acc_aligned_mean"),
        "acc_conflicting": mean_of("acc_conflicting_mean"),
        "n_distillations": len(results), "n_repeats": summaries[0]["n_repeats"],
    })
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
