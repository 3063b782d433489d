"""What the orchestration itself costs per stage, and whether that grows with the study.

    python benchmarks/orchestration.py [--quick] [--json]

(s) speedup / efficiency: a small real study (real digits, a pool of 4 ConvNet PTMs,
    4 DM distillations (seeds), every set evaluated on two networks: wide, as an
    ablation grid is) through ddray on a local Ray with 2 CPUs, against the same stage
    functions called one after another in this process on 1 thread. `speedup` is
    serial wall / ddray wall (Ray's start included); `efficiency` is (the sum of the
    stages' own compute times / CPUs) / ddray wall. The same study runs again through
    the warm-actor path (`resources.executor: actors`) for the side-by-side figures
    (`actor_speedup`, `actor_efficiency`). `cached_resubmit_s` is the wall clock of
    `ddray study submit` (a new process, as a user runs it) when every stage is stored.
(a) per_stage_overhead_ms: trivial stages (each writes a tiny result into the
    store, as a real stage does: temp dir, fsync, rename, manifest, attempt
    file) through the real scheduler (`orchestrator.execution.scheduler.Scheduler`:
    readiness counts, leases, the study's append-only event log) with the
    inline executor, at 1,000 and 10,000 stages; `scale_growth` is
    time(10,000) / time(1,000) (10x the stages: linear is 10, the target is at
    most 12). The graph has the study's shape: datasets feeding PTMs feeding
    distillations, each with two evaluations.
(b) tracking_ms_per_stage: MLflow logging of one stage's run (create, one
    log_batch with its params and metrics, terminate) on SQLite through the
    background `TrackingQueue`, drained before the end, per stage; and
    `mlflow_floor_ms`, the same three calls made directly, for scale.
(c) resync_queries_10k: the MLflow queries (search_runs + get_run) of a resubmit
    of a 10,000-stage study whose child runs were all lost in an outage (the
    parent exists, with no children; every stage is stored): open, log_stored,
    close, with the calls that log a run stubbed and counted. It pages, so it
    stays a handful whatever the size. `resync_queries_200` and
    `resync_wall_s_200`: the same with 200 stages, all logged for real on SQLite.
(d) lease_renew_pass_10k_s: one heartbeat pass of a driver holding 10,000 leases on moto's S3
    server (`benchmarks/leases.py`, which also times 1,000 leases, a local disk, and renewing
    every lease one by one for scale); the target is under 10% of the 60 s TTL.
The last stdout line with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import subprocess  # noqa: E402

import yaml  # noqa: E402

from orchestrator.execution.executors import InlineExecutor  # noqa: E402
from orchestrator.stages.base import Stage  # noqa: E402
from orchestrator.plan.graph import StageGraph
from orchestrator.storage.leases import Leases, Owner  # noqa: E402
from orchestrator.execution.scheduler import Scheduler  # noqa: E402
from orchestrator.spec.models import ResourcesSpec  # noqa: E402
from orchestrator.storage.local import ArtifactStore  # noqa: E402
from orchestrator.storage.studies import StudyLog  # noqa: E402
from benchmarks.leases import main as renew_passes  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def study_shaped_graph(n: int) -> StageGraph:
    """About n stages: 1 dataset per 100, 1 PTM per 20, distillations, 2 evaluations per distillation."""
    graph = StageGraph()
    ds = ptm = None
    while len(graph.stages) < n:
        i = len(graph.stages)
        if ds is None or i % 100 == 0:
            ds = graph.add(Stage("dataset", {"i": i}, {}, f"dataset {i}"))
        if ptm is None or i % 20 == 0:
            ptm = graph.add(Stage("ptm", {"i": i}, {"dataset": ds.key}, f"ptm {i}"))
        distill = graph.add(Stage("distill", {"i": i}, {"dataset": ds.key, "ptms": [ptm.key]}, f"distill {i}"))
        for arch in ("a", "b"):
            graph.add(Stage("evaluate", {"i": i, "arch": arch}, {"synthetic": distill.key, "dataset": ds.key},
                            f"eval {arch} {i}"))
    return graph


def trivial_stage(stage: Stage, root: str, cpus, gpus, runtime) -> dict:
    """What a real stage does to the store, with no compute: an attempt file and one small published stage."""
    store = ArtifactStore(root)
    store.record_attempt(stage.key)
    result = {"key": stage.key, "kind": stage.kind, "label": stage.label, "config": stage.config,
              "coords": {}, "metrics": {"x": 1.0}, "artifacts": []}
    store.write_stage(stage.kind, stage.key, {"result.json": json.dumps(result).encode()}, {})
    return result


def run_scheduler(n: int, root: Path) -> dict:
    graph = study_shaped_graph(n)
    store = ArtifactStore(root)
    owner = Owner.here()
    leases = Leases(store.root, owner)
    study = StudyLog(store, f"bench-{n}", owner)
    study.start({"name": "bench"}, {k: {"kind": s.kind, "label": s.label, "inputs": s.input_keys,
                                        "state": "pending"} for k, s in graph.stages.items()})
    scheduler = Scheduler(graph, ResourcesSpec(), store, study, leases,
                          InlineExecutor(str(store.root), {}, trivial_stage), lambda e: None,
                          lambda key, result: leases.release(key))
    t0 = time.perf_counter()
    state = scheduler.run()
    wall = time.perf_counter() - t0
    study.finish(state)
    assert state == "succeeded" and store.attempts(next(iter(graph.stages))) == 1
    return {"stages": len(graph.stages), "wall_s": wall, "ms_per_stage": 1e3 * wall / len(graph.stages)}


def small_study(epochs: int, iterations: int, eval_epochs: int, executor: str = "tasks") -> dict:
    return {
        "version": 1, "name": f"bench-{executor}",
        "datasets": [{"name": "cdigits", "source": "digits", "bias": "colored", "aligned_ratios": [0.5]}],
        "ptm_pools": [{"name": "pool", "dataset": "cdigits", "architectures": [{"name": "convnet", "width": 32}],
                       "seeds": [0, 1, 2, 3], "epochs": epochs}],
        "distillation": {"methods": ["dm"], "ipc": [10], "iterations": iterations, "seeds": [0, 1, 2, 3],
                         "arch": {"name": "convnet", "width": 32}, "batch_real": 32},
        "evaluation": {"architectures": [{"name": "convnet", "width": 32}, "mlp"], "repeats": 1,
                       "epochs": eval_epochs, "checkpoints": 2},
        "resources": {"executor": executor},
        "runtime": {"compile": False},  # compilation would be paid per process: not what is measured here
    }


def bench_study(root: Path, sizes: tuple[int, int, int]) -> dict:
    import ray

    from orchestrator.plan.graph import build_stage_graph
    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import parse_spec
    from orchestrator.stages.worker import execute_stage

    out = {}
    spec = parse_spec(small_study(*sizes))
    graph = build_stage_graph(spec)
    t0 = time.perf_counter()  # the baseline: every stage in this process, one after another, 1 thread
    for stage in graph.stages.values():
        execute_stage(stage, str(root / "serial"), 1, 0, spec.runtime.model_dump(exclude={"device"}))
    serial = time.perf_counter() - t0
    out["serial_s"] = serial
    log(f"(s) {len(graph.stages)} stages one after another in one process: {serial:.1f} s")
    for executor in ("tasks", "actors"):
        spec = parse_spec(small_study(*sizes, executor=executor))
        store = root / executor
        t0 = time.perf_counter()
        result = submit_study(spec, yaml.safe_dump(small_study(*sizes, executor=executor)), store_root=str(store),
                              tracking_uri=f"sqlite:///{root}/{executor}.db", num_cpus=2)
        wall = time.perf_counter() - t0
        ray.shutdown()
        assert result.state == "succeeded", result.errors
        compute = sum(json.loads(p.read_text())["metrics"]["wall_seconds"] for p in store.glob("stages/*/*/result.json"))
        prefix = "" if executor == "tasks" else "actor_"
        out[f"{prefix}wall_s"] = wall
        out[f"{prefix}speedup"] = serial / wall
        out[f"{prefix}efficiency"] = compute / 2 / wall
        log(f"(s) through ddray, {executor}: {wall:.1f} s on 2 CPUs -> speedup {serial / wall:.2f}, "
            f"efficiency {compute / 2 / wall:.2f} ({compute:.1f} s of stage compute)")
    spec_file = root / "study.yaml"
    spec_file.write_text(yaml.safe_dump(small_study(*sizes)))
    cmd = [sys.executable, "-m", "cli.main", "study", "submit", str(spec_file), "--json", "--store",
           str(root / "tasks"), "--tracking-uri", f"sqlite:///{root}/tasks.db"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    times = []
    for _ in range(2):  # the first resubmit notes that every run is tracked; the second is the one a user repeats
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - t0)
        assert r.returncode == 0 and '"cached": %d' % len(graph.stages) in r.stdout, r.stderr[-1000:]
    out["cached_resubmit_s"] = times[-1]
    log(f"(s) cached resubmit (ddray study submit, a new process): {times[-1]:.1f} s (the first: {times[0]:.1f} s)")
    return out


def bench_tracking(n: int, root: Path) -> dict:
    from mlflow.entities import Metric, Param

    from orchestrator.tracking.tracker import Tracker, TrackingQueue

    tracker = Tracker(f"sqlite:///{root}/mlflow.db", "bench")
    tracker.ensure_experiment()
    parent = tracker.start_parent("bench-1", None, "bench", "h", "spec", "0")
    config = {"method": "dm", "ipc": 10, "iterations": 1000, "lr_img": 1.0, "arch": "convnet",
              "arch_options": {"width": 128}, "seed": 0, "options": {}}
    results = [{"key": f"k{i}", "kind": "distill", "label": f"stage {i}", "config": config,
                "coords": {"method": "dm", "ipc": 10}, "metrics": {"final_loss": 0.1, "wall_seconds": 1.0},
                "artifacts": []} for i in range(n)]
    queue = TrackingQueue(tracker, parent, "bench-1", "d")
    t0 = time.perf_counter()
    for r in results:
        queue.stage(r, ArtifactStore(root), cached=False)
    enqueue_s = time.perf_counter() - t0
    summary = queue.drain(timeout=3600)
    wall = time.perf_counter() - t0
    assert summary["logged"] == n and not summary["not_logged"], summary

    client = tracker.client  # the floor: the same three calls, directly
    t0 = time.perf_counter()
    for i in range(n):
        run = client.create_run(tracker.experiment_id, run_name=f"floor {i}")
        client.log_batch(run.info.run_id, metrics=[Metric("x", 1.0, 0, 0)], params=[Param("p", "1")])
        client.set_terminated(run.info.run_id, "FINISHED")
    floor = time.perf_counter() - t0
    return {"tracking_ms_per_stage": 1e3 * wall / n, "tracking_enqueue_ms_per_stage": 1e3 * enqueue_s / n,
            "mlflow_floor_ms": 1e3 * floor / n, "tracking_stages": n}


# --- (c) resync after an outage: MLflow queries per page, not per stage ----------------------------------

class QueryCounter:
    """The tracker's MlflowClient with its queries counted (search_runs, get_run); with `stub_writes`, the
    calls that log a run (create, batches, inputs, artifacts, terminate) are counted and not sent."""

    WRITES = ("create_run", "log_batch", "log_inputs", "log_artifact", "set_terminated", "set_tag")

    def __init__(self, client, stub_writes: bool):
        self.client, self.stub_writes = client, stub_writes
        self.queries = self.writes = 0

    def search_runs(self, *args, **kwargs):
        self.queries += 1
        return self.client.search_runs(*args, **kwargs)

    def get_run(self, *args, **kwargs):
        self.queries += 1
        return self.client.get_run(*args, **kwargs)

    def create_run(self, *args, **kwargs):
        if not self.stub_writes:
            return self.client.create_run(*args, **kwargs)
        from types import SimpleNamespace

        self.writes += 1
        return SimpleNamespace(info=SimpleNamespace(run_id=f"stub-{self.writes}", start_time=0, status="RUNNING"))

    def __getattr__(self, name):
        real = getattr(self.client, name)
        if not (self.stub_writes and name in self.WRITES):
            return real

        def stub(*args, **kwargs):
            self.writes += 1
        return stub


class StubResults(ArtifactStore):
    """A store whose stages' result.json are made up on read: 10,000 stored stages without writing them."""

    def read_json(self, kind: str, key: str, name: str):
        if name != "result.json":
            return super().read_json(kind, key, name)
        return {"key": key, "kind": kind, "label": f"stage {key}", "config": {"seed": 0}, "coords": {},
                "metrics": {"x": 1.0}, "artifacts": []}


def resync(n: int, root: Path, stub_writes: bool) -> dict:
    """A resubmit of an n-stage study whose child runs were all lost: the parent exists with no children,
    every stage is stored. Counts the MLflow queries of `TrackingSession.open` + `log_stored` + `close`."""
    from orchestrator.tracking.session import TrackingSession
    from orchestrator.tracking.tracker import Tracker

    store = (StubResults if stub_writes else ArtifactStore)(root / "store")
    uri = f"sqlite:///{root}/mlflow.db"

    def session() -> TrackingSession:
        return TrackingSession(Tracker(uri, "bench-resync"), store, "resync-1", Leases(store.root, Owner.here()),
                               lambda e: None)

    first = session()  # the parent is made; then the server loses every child run (none is logged here)
    first.open("resync", "h", "spec", "0")
    first.close(None, {})
    kinds = {}
    for i in range(n):
        stage = Stage("distill", {"i": i}, {}, f"distill {i}")
        if not stub_writes:
            store.write_stage(stage.kind, stage.key, {"result.json": json.dumps(store_result(stage)).encode()}, {})
        kinds[stage.key] = stage.kind

    again = session()
    counter = again.tracker.client = QueryCounter(again.tracker.client, stub_writes)
    t0 = time.perf_counter()
    again.open("resync", "h", "spec", "0")
    again.log_stored(kinds)
    summary = again.close("succeeded", {"cached": n})
    wall, out = time.perf_counter() - t0, {"queries": counter.queries, "writes": counter.writes}
    assert summary["logged"] == n and not summary["not_logged"], summary
    if not stub_writes:
        assert len(again.tracker.children(again.parent, finished_only=True)) == n
    return {**out, "wall_s": wall}


def store_result(stage: Stage) -> dict:
    return {"key": stage.key, "kind": stage.kind, "label": stage.label, "config": stage.config, "coords": {},
            "metrics": {"x": 1.0}, "artifacts": []}


def bench_resync(root: Path, real: int = 200, counted: int = 10000) -> dict:
    """`resync_queries_200` and `resync_wall_s_200`: `real` stages logged for real on SQLite;
    `resync_queries_10k`: `counted` stages with the logging calls stubbed (the queries are real)."""
    small = resync(real, root / "real", stub_writes=False)
    large = resync(counted, root / "counted", stub_writes=True)
    log(f"(c) resubmit after an outage: {real} stages logged for real with {small['queries']} MLflow queries "
        f"in {small['wall_s']:.1f} s; {counted} stages (logging stubbed) with {large['queries']} queries")
    return {"resync_queries_200": small["queries"], "resync_wall_s_200": small["wall_s"],
            "resync_queries_10k": large["queries"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller study, 200 and 2,000 trivial stages, 100 tracked runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    small, large, tracked = (200, 2000, 100) if args.quick else (1000, 10000, 300)
    study_sizes = (2, 30, 20) if args.quick else (12, 300, 200)  # PTM epochs, DM iterations, evaluation epochs
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        study = bench_study(Path(tmp) / "study", study_sizes)
        runs = {}
        for n in (small, large):
            runs[n] = run_scheduler(n, Path(tmp) / f"store-{n}")
            log(f"(a) {runs[n]['stages']} trivial stages through the scheduler and store: {runs[n]['wall_s']:.2f} s, "
                f"{runs[n]['ms_per_stage']:.2f} ms per stage")
        growth = runs[large]["wall_s"] / runs[small]["wall_s"]
        log(f"(a) scale_growth {growth:.2f} for {large / small:.0f}x the stages (linear: {large / small:.0f})")
        tracking = bench_tracking(tracked, Path(tmp))
        log(f"(b) tracking {tracking['tracking_ms_per_stage']:.1f} ms per stage through the background queue "
            f"(enqueue {tracking['tracking_enqueue_ms_per_stage']:.3f} ms; the three MLflow calls alone "
            f"{tracking['mlflow_floor_ms']:.1f} ms)")
        resynced = bench_resync(Path(tmp) / "resync")
    renewal = renew_passes(["--json"] if not args.quick else ["--json", "--quick"])  # (d) benchmarks/leases.py
    out = {**study, "per_stage_overhead_ms": runs[large]["ms_per_stage"], "per_stage_overhead_ms_small": runs[small]["ms_per_stage"],
           "scale_growth": growth, "stages": [runs[small]["stages"], runs[large]["stages"]], **tracking,
           **resynced, **{k: v for k, v in renewal.items() if k.startswith(("lease_", "local_", "s3_"))}}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
