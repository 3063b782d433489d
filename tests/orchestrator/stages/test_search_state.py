"""A search's saved Tune state: signed, restored only when the signature verifies, deleted once published;
trial records read back from Tune's files rather than kept. Fast: Tune's Tuner is replaced by a recorder
(its restore unpickles `tuner.pkl` first, as Tune's does), so no Ray starts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill_core.methods.base import log_iteration
from distill_core.runtime import Runtime
from distill_core.sets import Normalization, SyntheticSet
from orchestrator.spec.search import SearchConfig
from orchestrator.stages import search
from orchestrator.stages.search_state import SIGNATURE, Signer, key_path, state_key, verify
from orchestrator.storage.files import tensors_to_bytes
from orchestrator.storage.local import ArtifactStore
from tests.orchestrator.stages.test_search_space import graph_of, searching


@pytest.fixture(autouse=True)
def own_key(tmp_path, monkeypatch):
    """Each test its own user: a fresh config directory and no key in the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DDRAY_STATE_KEY", raising=False)


@pytest.fixture
def stage():
    return graph_of(searching({"lr_img": {"loguniform": [0.01, 10.0]}})).of_kind("search")[0]


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


class Planted:
    """A pickle that, loaded, creates `marker`: what someone with write access to the store could plant."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def tuner(monkeypatch):
    """Tune's Tuner as a recorder; `restore` unpickles tuner.pkl as Tune's restore does before anything else."""
    from ray import tune

    calls = []

    class Recorder:
        @staticmethod
        def can_restore(path, storage_filesystem=None):
            return Path(path, "tuner.pkl").exists()

        @staticmethod
        def restore(path, trainable, **kwargs):
            pickle.loads(Path(path, "tuner.pkl").read_bytes())
            calls.append("restore")
            return "restored"

        def __init__(self, *args, **kwargs):
            calls.append("fresh")

    monkeypatch.setattr(tune, "Tuner", Recorder)
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: fn)  # no ray.put: no Ray started
    monkeypatch.setattr(tune, "with_resources", lambda fn, resources: fn)
    return calls


def saved_state(store: ArtifactStore, key: str) -> Path:
    """What Tune leaves in `searches/<key>/`: its pickles, its JSON state, a trial's directory."""
    d = store.root / "searches" / key
    (d / "trial_0").mkdir(parents=True)
    (d / "tuner.pkl").write_bytes(pickle.dumps({"benign": True}))
    (d / "experiment_state-2026.json").write_text(json.dumps({"trial_data": []}))
    (d / "trial_0" / "result.json").write_text('{"iterations": 10, "val_acc": 0.5}\n')
    return d


def test_a_tampered_state_is_not_restored_and_the_search_starts_clean(stage, store, tuner, tmp_path, caplog):
    d = saved_state(store, stage.key)
    assert Signer(str(d)).sign()
    marker = tmp_path / "code-ran"
    (d / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with caplog.at_level(logging.WARNING, logger="ddray.search"):
        search.tuner_for(stage, store, Runtime())
    assert tuner == ["fresh"] and not marker.exists()
    assert not (d / "tuner.pkl").exists()  # the refused state is deleted, never read
    assert "not resuming the search" in caplog.text and "tuner.pkl changed" in caplog.text


def test_an_intact_signed_state_is_restored(stage, store, tuner):
    d = saved_state(store, stage.key)
    (d / "ddray-progress.json").write_text("{}")  # the live view's file, rewritten as trials end: not signed
    Signer(str(d)).sign()
    (d / "ddray-progress.json").write_text('{"done": 3}')
    assert search.tuner_for(stage, store, Runtime()) == "restored" and tuner == ["restore"]


def test_a_state_without_a_signature_is_not_restored(stage, store, tuner, tmp_path):
    d = saved_state(store, stage.key)
    marker = tmp_path / "code-ran"
    (d / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    search.tuner_for(stage, store, Runtime())
    assert tuner == ["fresh"] and not marker.exists() and not (d / "tuner.pkl").exists()


def test_a_state_signed_with_another_users_key_is_not_restored(stage, store, tuner, monkeypatch):
    d = saved_state(store, stage.key)
    monkeypatch.setenv("DDRAY_STATE_KEY", "alice's key")
    Signer(str(d)).sign()
    assert verify(str(d)) is None
    monkeypatch.setenv("DDRAY_STATE_KEY", "bob's key")
    assert "does not verify" in verify(str(d))
    search.tuner_for(stage, store, Runtime())
    assert tuner == ["fresh"]


def test_a_file_added_to_a_signed_state_or_a_signature_copied_from_another_search_is_refused(store, tmp_path):
    d = saved_state(store, "search-a")
    Signer(str(d)).sign()
    (d / "searcher-state-2099.pkl").write_bytes(pickle.dumps(Planted(tmp_path / "m")))
    assert "not the signed ones" in verify(str(d))
    other = saved_state(store, "search-b")
    (other / SIGNATURE).write_bytes((d / SIGNATURE).read_bytes())
    (d / "searcher-state-2099.pkl").unlink()
    assert verify(str(d)) is None and "does not verify" in verify(str(other))  # the directory's name is signed


def test_the_key_file_is_made_once_private_and_never_pickled_with_the_signer(store, monkeypatch):
    key = state_key()
    path = key_path()
    assert path.parent.parent.name == "config" and len(key) == 32 and state_key() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    from ray import cloudpickle  # what Tune pickles its callbacks (and so our signer) into tuner.pkl with

    d = saved_state(store, "search-k")
    signer = Signer(str(d))
    signer.sign()
    log = search.trial_log(None, SearchConfig(**graph_of(searching({"lr_img": {"choice": [1.0]}}))
                                              .of_kind("search")[0].config), signer)
    assert key not in cloudpickle.dumps(log)
    monkeypatch.setenv("DDRAY_STATE_KEY", "a-distinctive-secret")
    signer.sign()
    assert b"a-distinctive-secret" not in cloudpickle.dumps(log)


class Frameless(SimpleNamespace):
    @property
    def metrics_dataframe(self):
        raise AssertionError("the records are read back from Tune's result file, not loaded as a frame")


def trial_result(trial_dir: Path, points: list[tuple[int, float]], config: dict, checkpoint=None) -> Frameless:
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "result.json", "w") as f:
        for it, acc in points:
            f.write(json.dumps({"iterations": it, "val_acc": acc, "config": config, "trial_id": trial_dir.name}) + "\n")
    return Frameless(config=config, path=str(trial_dir), filesystem=None, metrics={"trial_id": trial_dir.name},
                     error=None, checkpoint=checkpoint)


def test_trial_records_are_streamed_not_kept(stage, tmp_path):
    cfg = SearchConfig(**stage.config)
    trial_log = search.TrialLog(None, cfg)
    trial = SimpleNamespace(trial_id="t0", config={"lr_img": 1.0})

    def kept() -> int:
        return len(pickle.dumps({k: v for k, v in vars(trial_log).items() if k != "cfg"}))

    for i in range(100):
        trial_log.on_trial_result(0, [trial], trial, {"val_acc": 0.5, "iterations": i % 50})
    before = kept()
    for i in range(10_000):
        trial_log.on_trial_result(0, [trial], trial, {"val_acc": 0.5, "iterations": i % 50})
    assert kept() == before  # nothing per result

    points = [(i + 1, i / 10_000) for i in range(10_000)]
    result = trial_result(tmp_path / "t0", points, {"lr_img": 1.0})
    with open(tmp_path / "t0" / "result.json", "a") as f:
        f.write('{"iterations": 10001, "val_')  # the last line cut short by a killed driver
    (summary,) = search.summarise_trials([result], cfg)
    assert summary["curve"] == [{"iterations": i, "val_acc": a} for i, a in points]
    assert summary["iterations"] == 10_000 and summary["trial_id"] == "t0"


def test_a_trial_keeps_only_the_history_its_setting_asks_for(stage):
    distill = SearchConfig(**stage.config).distill.model_copy(update={"iterations": 10_000, "log_every": 100})
    syn = SyntheticSet(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), Normalization([0.5], [0.5]))
    seen = []

    def report(it, record, s):
        search.keep_setting_history(s, it, distill)
        seen.append(it)

    every_iteration = distill.model_copy(update={"log_every": 1})  # what a trial runs with
    for it in range(distill.iterations):
        log_iteration(syn, it, every_iteration, {"loss": 1.0}, report)
    assert len(seen) == 10_000  # the trial still sees every iteration
    assert [h["iteration"] for h in syn.history] == [*range(0, 10_000, 100), 9_999]


class Checkpoint:
    def __init__(self, d: Path):
        self.d = d

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.d))


def finished_search(stage, store, tmp_path, monkeypatch) -> Path:
    """run_search over a fake Tune run (one finished trial) in a store with Tune's state on disk."""
    cfg = SearchConfig(**stage.config)
    d = saved_state(store, stage.key)
    n = cfg.distill.ipc * 10
    syn = SyntheticSet(torch.zeros(n, 1, 8, 8), torch.arange(10).repeat_interleave(cfg.distill.ipc),
                       Normalization([0.5], [0.5]))
    ckpt = d / "trial_0" / "checkpoint_000000"
    ckpt.mkdir(parents=True)
    (ckpt / "synthetic.pt").write_bytes(tensors_to_bytes(syn.to_tensors()))
    (ckpt / "meta.json").write_text(json.dumps({"synthetic_meta": syn.meta(), "history": []}))
    budget = cfg.distill.iterations
    points = [(budget // 2, 0.4), (budget, 0.6)]
    result = SimpleNamespace(**vars(trial_result(d / "trial_0", points, {"lr_img": 1.0}, Checkpoint(ckpt))))
    import pandas  # Tune's metrics frame as well, so that only what this test checks differs from before

    result.metrics_dataframe = pandas.DataFrame(points, columns=["iterations", "val_acc"])
    monkeypatch.setattr(search, "tuner_for", lambda *a, **k: SimpleNamespace(fit=lambda: [result]))
    monkeypatch.setattr(search, "load_dataset", lambda store, key: SimpleNamespace(normalization=syn.norm))
    return d


def test_the_search_state_is_deleted_once_the_stage_is_published(stage, store, tmp_path, monkeypatch):
    d = finished_search(stage, store, tmp_path, monkeypatch)
    out = search.run_search(stage, store, Runtime())
    assert store.exists("search", stage.key) and out["search"]["best"]["val_acc"] == 0.6
    budget = SearchConfig(**stage.config).distill.iterations
    curve = store.read_json("search", stage.key, "trials.json")[0]["curve"]
    assert curve == [{"iterations": budget // 2, "val_acc": 0.4}, {"iterations": budget, "val_acc": 0.6}]
    assert not d.exists()


def test_a_search_that_fails_before_publishing_keeps_its_state_for_the_resume(stage, store, tmp_path, monkeypatch):
    d = finished_search(stage, store, tmp_path, monkeypatch)

    def crash(*args, **kwargs):
        raise OSError("the store went away")

    monkeypatch.setattr(search, "finish_stage", crash)
    with pytest.raises(OSError):
        search.run_search(stage, store, Runtime())
    assert (d / "tuner.pkl").exists() and verify(str(d)) is None  # signed when the run ended: resumable
