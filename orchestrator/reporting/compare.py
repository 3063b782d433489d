"""Two studies' result rows side by side (`ddray study compare A B`): the difference per matched row."""

from __future__ import annotations

import json

from orchestrator.reporting.results import RESULT_KEYS, ROW_EXTRAS

KEYS = (*RESULT_KEYS, *ROW_EXTRAS)


def compare_rows(rows_a: list[dict], rows_b: list[dict]) -> list[dict]:
    """Rows of two studies matched on their coordinates: a's and b's accuracy and b - a (None where absent)."""
    def key(r):
        return json.dumps([r.get(k) for k in KEYS], default=str)

    a, b = {key(r): r for r in rows_a}, {key(r): r for r in rows_b}
    out = []
    for k in sorted(set(a) | set(b)):
        ra, rb = a.get(k), b.get(k)
        base = ra or rb
        entry = {name: base.get(name) for name in KEYS}
        for name in ("acc_mean", "ior"):
            va, vb = (ra or {}).get(name), (rb or {}).get(name)
            entry[f"{name}_a"], entry[f"{name}_b"] = va, vb
            entry[f"{name}_diff"] = vb - va if va is not None and vb is not None else None
        out.append(entry)
    return out
