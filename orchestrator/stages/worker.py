"""A stage's entry point in a worker (a Ray task or actor, or inline): threads and device from the task's
resources, an attempt recorded before computing, the stage's log beside it, then its kind's runner.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch

from distill_core.runtime import Runtime
from distill_core.utils import set_threads
from orchestrator.stages.base import Stage
from orchestrator.stages.common import CURRENT_RUN
from orchestrator.storage.opener import open_store

log = logging.getLogger("ddray.stage")


def _ray_node() -> str | None:
    if "ray" not in sys.modules:
        return None
    import ray  # Ray: imported where it is used (planning and `validate` start without it)

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def execute_stage(stage: Stage, store_root: str, cpus: float, gpus: float, runtime: dict | None = None) -> dict:
    """Entry point of a stage task: threads and device from the task's resources, the study's runtime settings.

    Every execution leaves an attempt file in the store before it computes, so
    retries (a worker killed mid-stage) and duplicate work are counted; its log
    (progress lines, warnings, the error) goes beside it (`ddray study logs`).
    """
    set_threads(cpus)
    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    store = open_store(store_root)
    attempt = store.record_attempt(stage.key)
    CURRENT_RUN.clear()
    CURRENT_RUN.update(host=socket.gethostname(), pid=os.getpid(), node=_ray_node(), started=time.time(),
                       attempt=Path(str(attempt)).stem, cpus=cpus, gpus=gpus, device=device)
    handler = logging.FileHandler(store.attempt_log(stage.key, attempt), delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, min(root.level, logging.INFO)
    log.info("%s %s on %s (%s, %g CPU, %g GPU)", stage.kind, stage.label, CURRENT_RUN["host"], device, cpus, gpus)
    try:
        with warnings_logged():
            return stage.record.run(stage, store, Runtime(**{**(runtime or {}), "device": device}))
    except BaseException:
        log.exception("stage failed")
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        store.publish_log(stage.key, attempt)


class warnings_logged:
    """Python warnings of a stage go to its log (logging.captureWarnings for the stage's duration)."""

    def __enter__(self):
        logging.captureWarnings(True)

    def __exit__(self, *exc):
        logging.captureWarnings(False)
