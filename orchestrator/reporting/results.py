"""A study's result rows: one per (variant, method, IPC, guidance, evaluation architecture, ...), read from its
evaluation stages' stored results, with the random-subset and whole-dataset scores beside each row.
"""

from __future__ import annotations

import json
import math

from distill_core.methods.registry import reference_method
from orchestrator.errors import UserError
from orchestrator.reporting.findings import evaluate_findings, evaluation_of
from orchestrator.spec.claims import ClaimSpec
from orchestrator.storage.files import CorruptArtifact
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import DONE

RESULT_KEYS = ("dataset", "aligned_ratio", "severity", "method", "ipc", "guidance", "eval_arch")


# coordinates that tell rows apart beyond RESULT_KEYS; the distillation seed is averaged over instead
ROW_EXTRAS = ("iterations", "lr_img", "options", "debias", "eval_protocol", "selection", "val_split")


def evaluation_results(store: ArtifactStore, record: dict) -> list[dict]:
    """The stored results of the study's finished evaluation stages; a UserError naming the stages whose stored
    result fails its checksum (or is gone): a resubmit verifies them, sets them aside and rebuilds them."""
    results, damaged = [], []
    for key, st in record["stages"].items():
        if st["kind"] == "evaluate" and st["state"] in DONE:
            try:
                results.append(store.read_json("evaluate", key, "result.json"))
            except CorruptArtifact:
                damaged.append(st.get("label") or key)
    if damaged:
        names = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        study = record.get("study_id", "the study")
        raise UserError(f"results: {len(damaged)} evaluation stage(s) of {study} damaged in the store ({names}); "
                        "resubmit the study to rebuild them")
    return results


def study_findings(store: ArtifactStore, record: dict, results: list[dict] | None = None) -> list[dict]:
    """The spec's claims (`findings:`) evaluated on the study's finished evaluations (`orchestrator.reporting.findings`);
    `results`: those evaluations' stored results, where the caller has read them already."""
    claims = [ClaimSpec(**c) for c in (record.get("spec") or {}).get("findings") or []]
    if not claims:
        return []
    results = evaluation_results(store, record) if results is None else results
    return evaluate_findings(claims, [evaluation_of(r) for r in results])


def study_results(store: ArtifactStore, record: dict, results: list[dict] | None = None) -> list[dict]:
    """One row per evaluated setting: grid coordinates and accuracy over distillation seeds x networks.

    Evaluation stages that differ only in their distillation seed are one row:
    `acc_mean` / `acc_std` are over every network of every distillation (as
    upstream reports mean +- std over experiments x evaluation models), with
    `n_distillations` and `n_repeats` (networks per distillation).
    """
    groups: dict[str, list[dict]] = {}
    for result in evaluation_results(store, record) if results is None else results:
        coords = result["coords"]
        row_key = json.dumps([coords.get(k) for k in (*RESULT_KEYS, *ROW_EXTRAS)], sort_keys=True, default=str)
        groups.setdefault(row_key, []).append(result)
    rows = [_row(results) for results in groups.values()]
    return sorted(scored(rows), key=lambda r: tuple(str(r[k]) for k in (*RESULT_KEYS, *ROW_EXTRAS)))


VARIANT = ("dataset", "aligned_ratio", "severity")


RANDOM_AT = (*VARIANT, "ipc", "eval_arch", "eval_protocol")  # a random subset scores rows that match it on these


WHOLE_AT = (*VARIANT, "eval_arch", "eval_protocol")  # the whole training split has no IPC


def scored(rows: list[dict]) -> list[dict]:
    """Rows with the references beside them: `acc_random` (the random real subset at the row's IPC,
    evaluated with the row's protocol and architecture), `ior` = acc_mean - acc_random, `acc_whole` (the
    whole training split, same protocol, where the study has it) and, for biased data, `gap` =
    acc_aligned - acc_conflicting. The random subsets a study adds on its own are not rows themselves."""
    random = reference_method("random_subset")
    whole = reference_method("whole_dataset")

    def at(row, names):
        return json.dumps([row.get(k) for k in names], default=str)

    by_random = {at(r, RANDOM_AT): r["acc_mean"] for r in rows if random is not None and r["method"] == random.name}
    by_whole = {at(r, WHOLE_AT): r["acc_mean"] for r in rows if whole is not None and r["method"] == whole.name}
    out = []
    for r in rows:
        if r.pop("reference", None):
            continue
        r["acc_random"] = by_random.get(at(r, RANDOM_AT))
        r["ior"] = r["acc_mean"] - r["acc_random"] if r["acc_random"] is not None else None
        r["acc_whole"] = by_whole.get(at(r, WHOLE_AT))
        r["gap"] = r["acc_aligned"] - r["acc_conflicting"] \
            if r.get("acc_aligned") is not None and r.get("acc_conflicting") is not None else None
        out.append(r)
    return out


def _row(results: list[dict]) -> dict:
    coords = results[0]["coords"]
    summaries = [r["summary"] for r in results]

    def mean_of(name: str) -> float | None:
        vals = [s[name] for s in summaries if s.get(name) is not None and math.isfinite(s[name])]
        return sum(vals) / len(vals) if vals else None

    def over_networks(name: str) -> tuple[float | None, float | None]:
        """Mean and std over every network of every distillation."""
        vals = [v for s in summaries for v in (s.get("networks") or {}).get(name) or [] if v is not None]
        if not vals:
            return None, None
        mean = sum(vals) / len(vals)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))

    row = {k: coords.get(k) for k in (*RESULT_KEYS, *ROW_EXTRAS)}
    row["reference"] = coords.get("reference")  # a baseline the study added: scores rows, is not one
    row["debias"] = coords.get("debias", "none")  # a study distilled before debias existed: unweighted
    row["debias_oracle"] = bool(coords.get("debias_oracle"))  # weighted with the attribute labels (FairDD)
    accs = [a for s in summaries for a in s["accs"]]
    per_distillation = [sum(s["accs"]) / len(s["accs"]) for s in summaries]
    mean = sum(accs) / len(accs)
    between = sum(per_distillation) / len(per_distillation)
    (last, last_std), (val, val_std) = over_networks("acc_last"), over_networks("acc_val_selected")
    row.update({
        "acc_mean": mean, "acc_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)),
        # the spread of the per-distillation means: how much a new distillation moves the result
        "acc_std_distill": math.sqrt(sum((m - between) ** 2 for m in per_distillation) / len(per_distillation)),
        "acc_last": last, "acc_last_std": last_std, "acc_val_selected": val, "acc_val_selected_std": val_std,
        "acc_unbiased": mean_of("acc_unbiased_mean"), "acc_aligned": mean_of("acc_aligned_mean"),
        "acc_conflicting": mean_of("acc_conflicting_mean"),
        "n_distillations": len(results), "n_repeats": summaries[0]["n_repeats"],
    })
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
