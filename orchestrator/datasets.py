"""Building dataset variants outside a study (`ddray dataset build/show`).

Uses the same stage, key and store as a study's dataset stage, so a variant
built here is a cache hit inside any study that needs it, and vice versa.
"""

from __future__ import annotations

from distill_core.data import DatasetUnavailable
from orchestrator.errors import UserError
from orchestrator.graph import dataset_stage
from orchestrator.spec import DatasetSpec
from orchestrator.stages import execute_stage
from orchestrator.store import ArtifactStore


def dataset_spec_from_flags(source: str, bias: str, aligned_ratio: float, severity: int,
                             max_per_class: int | None, data_root: str | None) -> DatasetSpec:
    from pydantic import ValidationError

    from orchestrator.spec_errors import problems_from

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
        stage = dataset_stage(ds, p, s)
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
    """A stored dataset variant by key (or key prefix) or by label, e.g. `digits[p=0.95,s=1]`."""
    found = []
    for key in store.stage_keys("dataset"):
        result = store.read_json("dataset", key, "result.json")
        if key.startswith(name) or key.removeprefix("dataset-").startswith(name) or result["label"] == name:
            found.append(result)
    if not found:
        raise UserError(f"dataset '{name}' not found in store '{store.root}' (build it with `ddray dataset build`)")
    if len(found) > 1:
        raise UserError(f"dataset '{name}' is ambiguous: {', '.join(r['key'] for r in found)}")
    result = found[0]
    result["counts"] = store.read_json("dataset", result["key"], "counts.json")
    result["grid_path"] = str(store.path("dataset", result["key"], "dataset_grid.png"))
    return result
