"""Datasets outside a study's run: building variants (`ddray dataset build/show`), and what a spec's
sources need on this machine (`ddray study validate`).

Uses the same stage, key and store as a study's dataset stage, so a variant
built here is a cache hit inside any study that needs it, and vice versa.
"""

from __future__ import annotations

from pydantic import ValidationError

from distill_core.data import DatasetUnavailable
from distill_core.data.sources import downloads_allowed, stored_locally
from orchestrator.errors import UserError, suggest
from orchestrator.plan.graph import dataset_stage
from orchestrator.spec.models import DatasetSpec, StudySpec
from orchestrator.spec.problems import problems_from
from orchestrator.stages.worker import execute_stage
from orchestrator.storage.local import ArtifactStore


def dataset_spec_from_flags(source: str, bias: str, aligned_ratio: float, severity: int,
                             max_per_class: int | None, data_root: str | None) -> DatasetSpec:


    flags = {"aligned_ratios": "--aligned-ratio", "severities": "--severity", "source": "--source",
             "bias": "--bias", "max_per_class": "--max-per-class"}
    try:
        return DatasetSpec(name=source, source=source, bias=bias, aligned_ratios=[aligned_ratio],
                           severities=[severity], max_per_class=max_per_class, data_root=data_root)
    except ValidationError as exc:
        problems = problems_from(exc, DatasetSpec)
        raise UserError(*[f"{flags.get(p.loc[0], p.loc[0]) if p.loc else 'dataset'}: {p.message}"
                          for p in problems]) from None


def build_variants(ds: DatasetSpec, store: ArtifactStore, cpus: float = 1.0) -> list[dict]:
    """Build (or reuse) every variant of one dataset spec; returns result dicts with `cached`."""
    out = []
    for p, s in ds.variants():
        stage = dataset_stage(ds, p, s, ds.holdout(needed=False))  # a split only where the spec asks for one
        cached = store.is_complete("dataset", stage.key)
        if not cached:
            if store.manifest("dataset", stage.key) is not None:
                store.quarantine("dataset", stage.key)
            try:
                execute_stage(stage, str(store.root), cpus, 0)
            except DatasetUnavailable as exc:
                raise UserError(f"source: {exc}") from None
        result = store.read_json("dataset", stage.key, "result.json")
        result["cached"] = cached
        result["counts"] = store.read_json("dataset", stage.key, "counts.json")
        out.append(result)
    return out


def find_dataset(store: ArtifactStore, name: str) -> dict:
    """A stored dataset variant by key (or key prefix), by label (`cdigits[p=0.95,s=1]`) or by source and
    parameters (`digits[p=0.95,s=1]`, whatever a study named it)."""
    found, labels = [], []
    for key in store.stage_keys("dataset"):
        result = store.read_json("dataset", key, "result.json")
        coords = result.get("coords", {})
        by_source = coords.get("source", "") + result["label"][len(coords.get("dataset", "")):]
        labels += [result["label"], by_source]
        if key.startswith(name) or key.removeprefix("dataset-").startswith(name) or name in (result["label"], by_source):
            found.append(result)
    if not found:
        hint = suggest(name, set(labels)) if labels else " (the store has no datasets yet)"
        raise UserError(f"dataset '{name}' not found in store '{store.root}'{hint}; "
                        "build one with `ddray dataset build --source NAME --aligned-ratio P --severity S`")
    if len(found) > 1:
        raise UserError(f"dataset '{name}' is ambiguous: " + ", ".join(f"{r['label']} ({r['key']})" for r in found))
    result = found[0]
    result["counts"] = store.read_json("dataset", result["key"], "counts.json")
    result["grid_path"] = str(store.path("dataset", result["key"], "dataset_grid.png"))
    return result


def missing_data(spec: StudySpec) -> list[str]:
    """One line per dataset whose source is not on this machine (validation reads no data; submit would
    download it, or stop naming it when downloads are off)."""
    out = []
    for i, ds in enumerate(spec.datasets):
        if not stored_locally(ds.source, ds.data_root):
            then = "submit stops naming it (DDRAY_OFFLINE)" if not downloads_allowed() else "submit downloads it"
            out.append(f"needs data: datasets[{i}] ({ds.name}) needs {ds.source}, not stored on this machine; {then}")
    return out
