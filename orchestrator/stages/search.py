"""A search stage: Ray Tune over one distillation setting, its best trial's synthetic set as the output.

The stage's config (`SearchConfig`) is the distillation setting the grid gave
(`distill`), the fields of `distillation.search.space` that apply to it, and
the search's own settings; its key hashes them with the inputs, like any
stage. Each trial distils with its sampled values and, every `every`
iterations, trains `proxy.repeats` networks for `proxy.epochs` epochs on the
current synthetic set and reports their accuracy on the validation split
held out from the real training data (`distill_core.evaluation.proxy_accuracy`;
the test sets are never read), so ASHA can stop a bad trial early. A trial
that runs its whole budget saves its set as a Tune checkpoint; the best of
those (highest final validation accuracy) is published as the stage's
`synthetic.pt`, and evaluation stages read it as they read a distillation's.

Tune keeps its experiment state under the store (`searches/<stage key>/`):
a search whose driver was killed resumes from it on the next submit
(`Tuner.restore`, errored trials restarted), so finished trials are not run
again; a trial that was running restarts from iteration 0 (trials keep no
mid-run checkpoint). Tune rewrites that state every 10 seconds
(`TUNE_GLOBAL_CHECKPOINT_S=10`, not every second: each rewrite is a set of
uploads on an object store), so a trial that finished in the last ten
seconds or so before the driver died may run again. Tune unpickles that state on restore, and the
store is shared: the coordinator signs it (`search_state`: an HMAC with a key
the store never sees, every couple of seconds while Tune runs and when the run
ends) and restores only a state that verifies; any other is deleted and the
search starts afresh, with a warning in the stage's log. Once the stage is
published the directory is deleted: nothing reads it after that, and a crash
before publishing keeps it for the resume.

What Tune did is kept in `trials.json` (sampled values, the proxy curve,
stopped early or not), which the driver logs as nested MLflow runs under the
stage's run. The curves are read back at the end from Tune's own result files
(`result.json` in each trial's directory, one line per report), a line at a
time: the coordinator keeps nothing per result while Tune runs, and a trial
keeps only the history its setting's `log_every` asks for.

Deviation from a plain Tune setup: the best trial is chosen among trials that
ran their whole budget; ASHA's stopped trials are never picked, because their
last score is from a shorter run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from distill_core.evaluation import proxy_accuracy
from distill_core.methods import RealData, SyntheticSet, get_method
from distill_core.runtime import Runtime
from distill_core.utils import set_threads
from orchestrator.errors import first_line
from orchestrator.spec.search import SearchConfig
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import (
    build_guidance,
    finish_stage,
    json_bytes,
    load_checkpoints,
    load_dataset,
    png_bytes,
    synthetic_grid,
)
from orchestrator.stages.figures import png, pyplot
from orchestrator.stages.search_space import (
    METRIC,
    max_iterations,
    search_progress,
    trial_config,
    trial_count,
    tune_space,
)
from orchestrator.stages.search_state import Signer, remove_state, verify
from orchestrator.storage.files import atomic_write_json, tensors_to_bytes
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.objects import ObjectStore
from orchestrator.storage.opener import open_store

log = logging.getLogger("ddray.search")

SIGN_EVERY_S = 2.0  # the experiment state's signature, while Tune runs: a local store (a listing is cheap)
SIGN_EVERY_REMOTE_S = 10.0  # an object store: a listing and reads, about as often as Tune rewrites the state
RESULT_FILE = "result.json"  # Tune's own record of a trial's reports (JsonLoggerCallback), one JSON per line


def run_trial(sampled: dict, stage: Stage, store_root: str, runtime: dict, cpus: float, gpus: float) -> None:

    set_threads(cpus)
    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    rt = Runtime(**{**runtime, "device": device})
    store = open_store(store_root)
    cfg = SearchConfig(**stage.config)
    from ray import tune  # Tune: imported where a search runs, so planning a study never imports Ray

    trial_id = tune.get_context().get_trial_id()
    store.record_attempt(f"{stage.key}~{trial_id}")  # one file per trial execution: reruns are counted
    distill = trial_config(cfg.distill, sampled)
    ds = load_dataset(store, stage.inputs["dataset"])
    real = RealData.from_dataset(ds, rt.torch_device)
    val_x, val_y = ds.val_split()
    val = (real.norm.apply(val_x).to(real.device), val_y.to(real.device))
    experts = [load_checkpoints(store, k) for k in stage.inputs.get("experts", [])]

    def report(it: int, record: dict, syn: SyntheticSet) -> None:
        keep_setting_history(syn, it, distill)
        done = it + 1
        if done % cfg.every and done != distill.iterations:
            return
        acc = proxy_accuracy(syn, val, ds.num_classes, cfg.proxy, rt)
        metrics = {METRIC: acc, "iterations": done,
                   **{k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)
                      and k != "iteration"}}
        if done < distill.iterations:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:  # the finished set: a candidate for the stage's output
            final = SyntheticSet(syn.images.detach().cpu().clone(), syn.labels.cpu(), syn.norm, syn.lr)
            (Path(d) / "synthetic.pt").write_bytes(tensors_to_bytes(final.to_tensors()))
            (Path(d) / "meta.json").write_text(json.dumps({"synthetic_meta": final.meta(),
                                                           "history": syn.history}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    # every iteration reaches `report` (log_every 1); `report` drops what the setting's log_every would not keep
    get_method(distill.method).distill(
        real, distill.model_copy(update={"log_every": 1}), rt,
        guidance=build_guidance(store, stage, real, distill.guidance, distill.seed), experts=experts or None, progress=report)


def keep_setting_history(syn: SyntheticSet, it: int, distill) -> None:
    """Drop the history entry just logged for iteration `it` unless the setting's `log_every` keeps it (the
    trial logs every iteration so that `report` sees each one): the history stays the size a plain
    distillation's is, whatever the number of iterations."""
    if it % distill.log_every and it != distill.iterations - 1 and syn.history \
            and syn.history[-1].get("iteration") == it:
        syn.history.pop()


def _search_algorithm(cfg: SearchConfig):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter  # Tune: where a search runs

    if cfg.algorithm != "optuna":
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent or 0)
    import optuna  # only for algorithm: optuna
    from ray.tune.search.optuna import (
        OptunaSearch,  # Ray: imported where it is used (planning and `validate` start without it)
    )

    # TPE after a few random trials (Optuna's default of 10 would make short searches purely random)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(10, max(2, cfg.num_samples // 4)))
    searcher = OptunaSearch(sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent) if cfg.max_concurrent else searcher


def _scheduler(cfg: SearchConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # Tune: where a search runs

    if cfg.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="iterations", max_t=max_iterations(cfg.space, cfg.distill.iterations), grace_period=cfg.grace_period,
                         reduction_factor=cfg.reduction_factor)


def state_of(stage: Stage, store: ArtifactStore | ObjectStore) -> tuple[str, object]:
    """The search's experiment directory (Tune's state, `searches/<stage key>`) and its pyarrow filesystem
    (None: the local one)."""
    root, fs = store.searches()
    return f"{root}/{stage.key}", fs


def signer_for(stage: Stage, store: ArtifactStore | ObjectStore) -> Signer:
    path, fs = state_of(stage, store)
    return Signer(path, fs, every=SIGN_EVERY_S if fs is None else SIGN_EVERY_REMOTE_S)


def tuner_for(stage: Stage, store: ArtifactStore | ObjectStore, runtime: Runtime, signer: Signer | None = None):
    """A new Tuner for the stage's search, or the one restored from its saved experiment state when that
    state carries a valid signature (`search_state.verify`); an unsigned or changed state is deleted."""
    from ray import tune  # Tune: imported where a search runs, so planning a study never imports Ray

    cfg = SearchConfig(**stage.config)
    trial = stage.runtime.get("trial", {"cpus": 1.0, "gpus": 0.0})
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, stage=stage, store_root=str(store.root),
                             runtime=runtime.model_dump(exclude={"device"}), cpus=trial["cpus"], gpus=trial["gpus"]),
        {"cpu": trial["cpus"], "gpu": trial["gpus"]})
    root, fs = store.searches()
    path = f"{root}/{stage.key}"
    progress = store.search_progress_file(stage.key)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        refused = verify(path, fs)  # before anything in the directory is unpickled
        if refused is None:
            log.info("resuming the search from %s", path)
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                      storage_filesystem=fs)
        log.warning("not resuming the search from %s: %s; that state is deleted, never read, and the search "
                    "starts afresh", path, refused)
    # a fresh search starts in an empty directory, so nothing left or planted there is signed with its state
    remove_state(path, fs)
    return tune.Tuner(
        trainable, param_space=tune_space(cfg.space),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=_search_algorithm(cfg),
                                    scheduler=_scheduler(cfg), num_samples=cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent),
        run_config=tune.RunConfig(name=stage.key, storage_path=root, storage_filesystem=fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=stage.runtime.get("max_failures", 2)),
                                  callbacks=[trial_log(progress, cfg, signer or signer_for(stage, store))]))


def trial_log(progress: Path | None, cfg: SearchConfig, signer: Signer | None = None):
    """`TrialLog` as the Tune callback it is (Tune takes `Callback` instances; Ray is imported here only)."""
    from ray.tune import Callback  # Tune: imported where a search runs

    class TuneTrialLog(TrialLog, Callback):
        pass

    return TuneTrialLog(progress, cfg, signer)


def _uploading(trials) -> bool:
    """Whether Tune's driver is uploading its experiment state now (its background syncer, which the trials'
    storage contexts share): a signature taken mid-upload would not match the finished upload. Tune's private
    attribute, read defensively: without it a signature may be taken mid-upload and is retaken next time."""
    storage = getattr(trials[0], "storage", None) if trials else None
    process = getattr(getattr(storage, "syncer", None), "_sync_process", None)
    return bool(getattr(process, "is_running", False))


class TrialLog:
    """One line per trial report and end in the stage's log (`ddray study logs ID STAGE`), the search's
    progress for the live view (`ddray-progress.json`, local stores), and the experiment state's signature
    after Tune's steps (`Signer.maybe_sign`: every few seconds, when a file changed).

    Its state is per trial (ended, running), never per result: a result is logged and forgotten (Tune's
    `result.json` keeps it, and `summarise_trials` reads it back)."""

    def __init__(self, progress: Path | None, cfg: SearchConfig, signer: Signer | None = None):
        self.progress, self.cfg, self.total, self.signer = progress, cfg, trial_count(cfg), signer
        self.best: float | None = None
        self.ended: dict[str, str] = {}  # trial id -> finished | stopped early | failed
        self.running: set[str] = set()

    def _write(self) -> None:
        if self.progress is None:
            return
        states = list(self.ended.values())
        data = {"total": self.total, "done": len(states), "running": len(self.running - set(self.ended)),
                "stopped_early": states.count("stopped early"), "failed": states.count("failed"), "best": self.best}
        atomic_write_json(self.progress, data, fsync=False)  # the live view's: not worth a sync

    def budget(self, trial) -> int:
        return trial_config(self.cfg.distill, trial.config).iterations

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._write()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        log.info("trial %s: %s %.4f at %d iterations", trial.trial_id, METRIC, result[METRIC], result["iterations"])
        self.running.add(trial.trial_id)
        if result["iterations"] >= self.budget(trial):
            self.best = max(self.best or 0.0, result[METRIC])

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        early = last.get("iterations", 0) < self.budget(trial)
        self.ended[trial.trial_id] = "stopped early" if early else "finished"
        log.info("trial %s %s", trial.trial_id, self.ended[trial.trial_id])
        self._write()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "failed"
        log.info("trial %s failed", trial.trial_id)
        self._write()

    def on_step_end(self, iteration, trials, **info):
        # after Tune's step, which may have saved its experiment state (every TUNE_GLOBAL_CHECKPOINT_S)
        if self.signer is None:
            return
        try:
            self.signer.maybe_sign(busy=_uploading(trials))
        except (OSError, ValueError) as exc:  # an unsigned state only costs a clean restart: never fail the search
            log.warning("could not sign the search's state: %s", first_line(exc, 300))


def _lines(stream, chunk: int = 1 << 16):
    """The lines of a pyarrow input stream, a chunk at a time (its files have no readline)."""
    rest = b""
    while data := stream.read(chunk):
        *lines, rest = (rest + data).split(b"\n")
        yield from lines
    if rest:
        yield rest


def trial_curve(result) -> list[dict]:
    """A trial's proxy curve, read back a line at a time from Tune's `result.json` in the trial's directory
    (through the result's filesystem: the store's, local or an object store)."""
    if not result.path:
        return []
    fs = result.filesystem
    if fs is None:
        from pyarrow.fs import LocalFileSystem  # Tune's storage layer: where a search runs

        fs = LocalFileSystem()
    curve = []
    try:
        with fs.open_input_stream(f"{result.path}/{RESULT_FILE}") as f:
            for line in _lines(f):
                try:
                    row = json.loads(line)
                    point = {"iterations": int(row["iterations"]), METRIC: float(row[METRIC])}
                except (ValueError, KeyError, TypeError):
                    continue  # a blank line, or the last one cut short when the driver was killed
                curve.append(point)
    except FileNotFoundError:
        return []
    return curve


def summarise_trials(grid, cfg: SearchConfig) -> list[dict]:
    """One dict per trial: id, sampled values, proxy curve, budget, whether ASHA stopped it, its error."""
    out = []
    for result in grid:
        config = {k: (v.item() if hasattr(v, "item") else v) for k, v in (result.config or {}).items()}
        budget = trial_config(cfg.distill, config).iterations if config else cfg.distill.iterations
        curve = trial_curve(result)
        done = curve[-1]["iterations"] if curve else 0
        out.append({"trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
                    "config": config, "curve": curve, "iterations": done, "budget": budget,
                    METRIC: curve[-1][METRIC] if curve else None, "complete": result.error is None and done >= budget,
                    "stopped_early": result.error is None and 0 < done < budget,
                    "error": first_line(result.error, 300) if result.error else None,
                    "_checkpoint": result.checkpoint})
    return out


def run_search(stage: Stage, store: ArtifactStore | ObjectStore, runtime: Runtime) -> dict:

    started = time.time()
    cfg = SearchConfig(**stage.config)
    # Tune rewrites its experiment state every 10 s (its "auto" default starts there too, then stretches with
    # the time a save takes; fixed, the resume loses at most that much): each rewrite is uploads on an object store
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "10"
    path, fs = state_of(stage, store)
    signer = signer_for(stage, store)
    tuner = tuner_for(stage, store, runtime, signer)
    try:
        grid = tuner.fit()
    finally:
        sign_state(signer)  # ended or interrupted: what Tune left can be resumed
    trials = summarise_trials(grid, cfg)
    complete = [t for t in trials if t["complete"]]
    if not complete:
        errors = [t["error"] for t in trials if t["error"]]
        raise RuntimeError(f"no trial of the search finished ({len(trials)} trials; first error: "
                           f"{errors[0] if errors else 'none'})")
    best = max(complete, key=lambda t: (t[METRIC], -trials.index(t)))  # ties: the earliest trial
    with best["_checkpoint"].as_directory() as d:
        synthetic = (Path(d) / "synthetic.pt").read_bytes()
        kept = json.loads((Path(d) / "meta.json").read_text())
    for t in trials:
        t.pop("_checkpoint")
        t["best"] = t is best
    norm = load_dataset(store, stage.inputs["dataset"]).normalization
    syn = SyntheticSet.from_tensors(torch.load(io.BytesIO(synthetic), weights_only=True), kept["synthetic_meta"], norm)
    summary = {"trials": len(trials), "stopped_early": sum(t["stopped_early"] for t in trials),
               "failed": sum(bool(t["error"]) for t in trials), "best": {"trial_id": best["trial_id"],
               "config": best["config"], METRIC: best[METRIC]},
               "trial_iterations": sum(t["iterations"] for t in trials)}
    files = {"synthetic.pt": synthetic, "history.json": json_bytes(kept["history"]), "trials.json": json_bytes(trials),
             "best_config.json": json_bytes(best["config"]), "search.png": search_plot(trials),
             "synthetic_grid.png": png_bytes(synthetic_grid(syn, cfg.distill.ipc))}
    metrics = {f"best_{METRIC}": best[METRIC], "n_trials": len(trials), "n_stopped_early": summary["stopped_early"],
               "n_failed": summary["failed"], "trial_iterations": summary["trial_iterations"],
               "n_images": len(syn.labels)}
    if syn.lr is not None:
        metrics["synthetic_lr"] = syn.lr
    result = finish_stage(store, stage, files, metrics,
                          ["search.png", "trials.json", "best_config.json", "synthetic_grid.png", "history.json"],
                          {"synthetic_meta": kept["synthetic_meta"], "search": summary, "trials": trials}, started)
    # published: the stage's files are the search's result, and nothing reads Tune's state again (a crash
    # before this line keeps it, for the resume)
    try:
        remove_state(path, fs)
    except OSError as exc:
        log.warning("could not delete the search's state at %s: %s", path, first_line(exc, 300))
    return result


def sign_state(signer: Signer) -> None:
    try:
        signer.sign()
    except (OSError, ValueError) as exc:  # never hide the run's own outcome: an unsigned state is only not resumed
        log.warning("could not sign the search's state at %s: %s", signer.root, first_line(exc, 300))


def search_plot(trials: list[dict]) -> bytes:
    """Two panels: each trial's final proxy score in trial order, and every trial's proxy curve."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for i, t in enumerate(trials):
        if t[METRIC] is None:
            continue
        marker = "*" if t["best"] else ("x" if t["stopped_early"] else "o")
        left.scatter(i, t[METRIC], marker=marker, s=120 if t["best"] else 30, color="C1" if t["best"] else "C0")
        xs, ys = [p["iterations"] for p in t["curve"]], [p[METRIC] for p in t["curve"]]
        right.plot(xs, ys, lw=2.5 if t["best"] else 1, alpha=1 if t["best"] else 0.5,
                   ls="--" if t["stopped_early"] else "-")
    left.set(xlabel="trial", ylabel=f"final {METRIC} (x: stopped early, *: best)", title="search")
    right.set(xlabel="distillation iterations", ylabel=f"proxy {METRIC}", title="proxy curves")
    return png(fig, dpi=80)


def search_summary(result: dict) -> dict:
    """For the submit's summary: trials, how many ASHA stopped early, the best trial."""
    s = result["search"]
    return {"trials": s["trials"], "stopped_early": s["stopped_early"], "best": s["best"]}


# the coordinator holds resources.search; each of its trials, a Tune actor, holds resources.trial
register(StageKind("search", version=1, config=SearchConfig, run=run_search, resources="search", holds=("trial",),
                   progress=search_progress, summary=search_summary, needs_ray=True))
