import pytest
import torch

from orchestrator.storage.files import CorruptArtifact, tensors_to_bytes
from orchestrator.storage.local import ArtifactStore


def test_write_and_read_back(tmp_path):
    store = ArtifactStore(tmp_path)
    t = {"x": torch.arange(10, dtype=torch.uint8)}
    store.write_stage("dataset", "k1", {"a.pt": tensors_to_bytes(t), "b.json": b"{}"}, {"m": 1})
    assert store.is_complete("dataset", "k1")
    assert torch.equal(store.read_tensors("dataset", "k1", "a.pt")["x"], t["x"])
    assert store.meta("dataset", "k1") == {"m": 1}
    # nothing but the final directory is left behind
    assert [p.name for p in (tmp_path / "stages" / "dataset").iterdir()] == ["k1"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damage_is_detected(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    store.write_stage("dataset", "k", {"a.bin": bytes(range(200))}, {})
    path = store.path("dataset", "k", "a.bin")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        store.path("dataset", "k", "manifest.json").write_text("{not json")
    assert not store.is_complete("dataset", "k", full=True)
    # the quick check (sizes) sees all but a flipped byte; reading the file catches that one
    assert store.is_complete("dataset", "k") == (damage == "flip")
    if damage in ("flip", "truncate"):
        with pytest.raises(CorruptArtifact) as exc:
            store.read_bytes("dataset", "k", "a.bin")
        assert (exc.value.kind, exc.value.key) == ("dataset", "k")


def test_quarantine_moves_damaged_stage_aside(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write_stage("ptm", "k", {"a": b"123"}, {})
    store.path("ptm", "k", "a").write_bytes(b"999")
    moved = store.quarantine("ptm", "k")
    assert moved is not None and moved.exists()
    assert not store.stage_dir("ptm", "k").exists()
    store.write_stage("ptm", "k", {"a": b"123"}, {})
    assert store.is_complete("ptm", "k")


def test_failed_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)


    with pytest.raises(TypeError):
        store.write_stage("distill", "k", {"a": 123}, {})  # not bytes: fails mid-write
    assert not store.stage_dir("distill", "k").exists()
    assert not any((tmp_path / "stages" / "distill").iterdir())


def test_corrupt_artifact_crosses_process_boundaries_with_its_key():
    import pickle

    exc = pickle.loads(pickle.dumps(CorruptArtifact("ptm", "ptm-1", "'a' fails its checksum")))
    assert (exc.kind, exc.key, str(exc)) == ("ptm", "ptm-1", "ptm ptm-1: 'a' fails its checksum")


def test_a_second_writer_of_the_same_key_keeps_the_first_copy(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write_stage("ptm", "k", {"a": b"first"}, {})
    store.write_stage("ptm", "k", {"a": b"first"}, {})  # a retried or duplicate task: same key, same bytes
    assert store.read_bytes("ptm", "k", "a") == b"first"
    assert [p.name for p in (tmp_path / "stages" / "ptm").iterdir()] == ["k"]
    assert not (tmp_path / "quarantine").exists()


def test_a_damaged_copy_is_quarantined_when_the_stage_is_written_again(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write_stage("ptm", "k", {"a": b"good"}, {})
    store.path("ptm", "k", "a").write_bytes(b"bad!")  # same size, wrong bytes
    store.write_stage("ptm", "k", {"a": b"good"}, {})
    assert store.read_bytes("ptm", "k", "a") == b"good"
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


def test_temp_dirs_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    import os

    from orchestrator.storage.files import PLACE, START

    store = ArtifactStore(tmp_path)
    kind_dir = tmp_path / "stages" / "ptm"
    dead = kind_dir / f".k1.tmp-{PLACE}-{2**22 + 4321}-0-abcd1234"
    live = kind_dir / f".k2.tmp-{PLACE}-{os.getpid()}-{START}-abcd1234"
    remote = kind_dir / ".k3.tmp-otherhost.1234567890-1-0-abcd1234"
    for d in (dead, live, remote):
        d.mkdir(parents=True)
    assert store.clean_temp() == [dead]
    assert live.exists() and remote.exists()
    assert store.clean_temp(now=remote.stat().st_mtime + 2 * 86400) == [remote]  # another host's: after a day


def test_attempts_are_counted_one_file_per_execution(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.attempts("k") == 0
    store.record_attempt("k")
    store.record_attempt("k")
    assert store.attempts("k") == 2
