"""ddray's orchestrator: spec -> plan -> stages -> execution on Ray, with storage, tracking and reporting.

Packages, by role (each imports only the ones below it; import-linter checks it):

    execution   scheduler, executors (inline, Ray tasks, Ray actors), Ray session, submit, sync, Jobs API
    reporting   result rows, findings, report, compare, the live view's progress
    tracking    MLflow: the tracker, its background session, the UI
    plan        a spec expanded into its stage graph; importing a synthetic set made elsewhere
    stages      stage kinds (`StageKind` records) and what each runs in a worker
    spec        the study spec: models, loading, cross-field checks, problems, claims
    storage     the `Store` protocol, local and object backends, leases, the study log
    errors      one-line user errors

This module exports what the CLI uses. Exports resolve on first use (PEP 562
`__getattr__`), so `import orchestrator` stays cheap: `ddray --help` imports
neither torch nor Ray nor MLflow.
"""

from __future__ import annotations

import importlib

EXPORTS = {
    "orchestrator.errors": ("UserError", "first_line", "suggest"),
    "orchestrator.spec.loading": ("load_spec", "read_spec", "profiles_of"),
    "orchestrator.spec.catalogue": ("CATALOGUE_KINDS", "catalogue", "version"),
    "orchestrator.spec.paths": ("sqlite_file",),
    "orchestrator.plan.graph": ("build_stage_graph",),
    "orchestrator.plan.external": ("external_study",),
    "orchestrator.storage.opener": ("open_store",),
    "orchestrator.storage.studies": ("STATES", "load_record", "list_studies", "stage_matching", "request_cancel"),
    "orchestrator.tracking.tracker": ("check_uri", "redact"),
    "orchestrator.tracking.secrets": ("redact_uri", "redact_text"),
    "orchestrator.tracking.ui": ("serve_ui", "check_ui"),
    "orchestrator.reporting.results": ("study_results", "study_findings"),
    "orchestrator.reporting.report": ("build_report", "log_report"),
    "orchestrator.reporting.compare": ("compare_rows",),
    "orchestrator.reporting.progress": ("StudyProgress", "study_transitions"),
    "orchestrator.execution.scheduler": ("Terminated",),
    "orchestrator.execution.datasets": ("missing_data", "build_variants", "dataset_spec_from_flags", "find_dataset"),
    "orchestrator.execution.jobs": ("Cluster", "is_jobs_address", "check_cluster_paths", "EVENT_PREFIX"),
    "orchestrator.execution.submit": ("submit_study",),
    "orchestrator.execution.sync": ("sync_study",),
}
_HOME = {name: module for module, names in EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'orchestrator' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
