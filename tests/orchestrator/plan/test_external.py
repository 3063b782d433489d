"""`external_study`: a synthetic set made elsewhere, planned as a small study that evaluates it exactly as
the spec evaluates its own sets, beside the random real subset at the set's IPC; and the `external` stage
that imports the file, checked against the dataset variant it is evaluated on.

The set files are written as another codebase saves them: `torch.save({"images": N x C x H x W floats,
"labels": N class indices})`; the images are seeded noise in [0, 1] (pixel space)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.plan.external import external_study, ipc_of
from orchestrator.stages.base import Stage
from orchestrator.stages.common import RESULT
from orchestrator.stages.worker import execute_stage
from orchestrator.storage.files import sha256_file
from orchestrator.storage.local import ArtifactStore
from tests.orchestrator.spec.test_models import spec_of

SHAPE = (3, 28, 28)  # the spec's coloured digits


def save_set(path: Path, per_class=(2,) * 10, shape=SHAPE, seed=0, labels=None) -> Path:
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = torch.as_tensor(labels)
    torch.save({"images": torch.rand(len(labels), *shape, generator=g), "labels": labels}, path)
    return path


def plan(path: Path, spec=None, **kwargs):
    kwargs = {"dataset": None, "protocol": None, "space": "pixels", **kwargs}
    return external_study(spec or spec_of(), path, kwargs.pop("dataset"), kwargs.pop("protocol"),
                          kwargs.pop("space"), **kwargs)


def evaluations_of(graph, key: str) -> list:
    return [s for s in graph.of_kind("evaluate") if s.inputs["synthetic"] == key]


def test_ipc_is_the_largest_class_count(tmp_path):
    assert ipc_of(save_set(tmp_path / "a.pt")) == 2
    assert ipc_of(save_set(tmp_path / "b.pt", per_class=(1, 3, 2))) == 3


def test_one_external_stage_evaluated_on_the_specs_architectures_beside_the_random_subset(tmp_path):
    path = save_set(tmp_path / "mine.pt", per_class=(3,) * 10)
    spec = spec_of()  # evaluation on convnet and mlp; random_baseline off, yet an external set gets one
    study, graph = plan(path, spec, aligned_ratio=0.1)
    sha = sha256_file(path)
    (data,) = graph.of_kind("dataset")
    (ext,) = graph.of_kind("external")
    assert data.config["aligned_ratio"] == 0.1
    assert ext.inputs == {"dataset": data.key}
    assert ext.config == {"sha256": sha, "name": "mine", "space": "pixels", "ipc": 3}
    assert ext.runtime == {"path": str(path.resolve())}  # where it lies: not part of the key
    assert ext.coords["method"] == "external:mine" and ext.coords["ipc"] == 3
    evals = evaluations_of(graph, ext.key)
    assert sorted(s.coords["eval_arch"] for s in evals) == ["convnet", "mlp"]
    assert all(s.inputs["dataset"] == data.key for s in evals)
    (baseline,) = graph.of_kind("distill")
    assert baseline.config["method"] == "random" and baseline.config["ipc"] == 3
    assert baseline.coords["reference"] == "random_subset"
    # the baseline is evaluated exactly as the external set: the same evaluation configs
    assert sorted(map(str, (s.config for s in evals))) == \
        sorted(map(str, (s.config for s in evaluations_of(graph, baseline.key))))
    assert not graph.of_kind("ptm") and not graph.of_kind("search")
    # the study: the spec's dataset and evaluation, the protocol's one method at the set's IPC, no pools
    assert study.name == f"t-ext-{sha[:8]}" and study.ptm_pools == []
    assert study.distillation.methods == ["dm"] and study.distillation.ipc == [3]
    assert [g.kind for g in study.distillation.guidance] == ["none"]
    assert study.evaluation == spec.evaluation


def test_every_variant_of_the_dataset_unless_one_is_picked(tmp_path):
    path = save_set(tmp_path / "mine.pt")
    _, graph = plan(path)
    assert sorted(s.config["aligned_ratio"] for s in graph.of_kind("dataset")) == [0.1, 0.8]
    exts = graph.of_kind("external")
    assert len(exts) == 2 and len({s.key for s in exts}) == 2  # the same file on two variants: two imports
    assert {s.config["sha256"] for s in exts} == {sha256_file(path)}
    _, picked = plan(path, aligned_ratio=0.8, severity=1)
    assert [s.config["aligned_ratio"] for s in picked.of_kind("dataset")] == [0.8]


def test_the_key_hashes_the_files_content_not_its_path(tmp_path):
    first = save_set(tmp_path / "a.pt")
    _, graph = plan(first, aligned_ratio=0.1)
    (ext,) = graph.of_kind("external")

    copy = tmp_path / "elsewhere"
    copy.mkdir()
    (copy / "a.pt").write_bytes(first.read_bytes())  # the same bytes at another path
    _, same = plan(copy / "a.pt", aligned_ratio=0.1)
    assert [s.key for s in same.of_kind("external")] == [ext.key]
    assert set(same.stages) == set(graph.stages)  # the same study: every stage reused

    save_set(first, seed=1)  # the file changed: same name, same IPC, other images
    _, changed = plan(first, aligned_ratio=0.1)
    (ext2,) = changed.of_kind("external")
    assert ext2.key != ext.key and ext2.config["sha256"] == sha256_file(first)
    assert {s.key for s in evaluations_of(changed, ext2.key)}.isdisjoint(s.key for s in evaluations_of(graph, ext.key))
    # what does not depend on the file keeps its key: the dataset and the random subset at the same IPC
    assert [s.key for s in changed.of_kind("dataset")] == [s.key for s in graph.of_kind("dataset")]
    assert [s.key for s in changed.of_kind("distill")] == [s.key for s in graph.of_kind("distill")]


def test_a_set_at_another_ipc_gets_the_random_subset_at_that_ipc(tmp_path):
    _, two = plan(save_set(tmp_path / "two.pt", per_class=(2,) * 10), aligned_ratio=0.1)
    _, five = plan(save_set(tmp_path / "five.pt", per_class=(5,) * 10), aligned_ratio=0.1)
    assert [s.config["ipc"] for s in five.of_kind("distill")] == [5]
    assert [s.key for s in two.of_kind("distill")] != [s.key for s in five.of_kind("distill")]


def test_the_set_is_evaluated_with_the_protocols_augmentation(tmp_path):
    path = save_set(tmp_path / "mine.pt")

    def protocols(protocol):
        study, graph = plan(path, protocol=protocol, aligned_ratio=0.1)
        assert study.distillation.methods == [protocol or "dm"]
        ext = graph.of_kind("external")[0].key
        return {s.coords["eval_protocol"] for s in evaluations_of(graph, ext)}
    assert protocols(None) == protocols("dm") == {"dsa:color_crop_cutout_scale_rotate/5ep"}  # the spec's first
    assert protocols("dc") == {"dc:crop_scale_rotate/5ep"}  # DC's own augmentation, the spec's 5 epochs


@pytest.mark.parametrize("write, expected", [
    (None, "--synthetic: file not found: "),
    (lambda p: p.write_text("not a torch file"), "--synthetic: cannot read '"),
    (lambda p: torch.save({"images": torch.rand(2, *SHAPE)}, p), "as a torch file of tensors with labels (KeyError"),
    (lambda p: torch.save({"images": torch.rand(0, *SHAPE), "labels": torch.zeros(0, dtype=torch.long)}, p),
     "holds no labels"),
])
def test_an_unreadable_file_is_a_user_error_naming_it(tmp_path, write, expected):
    path = tmp_path / "bad.pt"
    if write is not None:
        write(path)
    with pytest.raises(UserError) as exc:
        plan(path)
    assert expected in str(exc.value) and str(path) in str(exc.value)


def test_negative_labels_are_a_user_error(tmp_path):
    path = save_set(tmp_path / "neg.pt", labels=[-1, 0, 1])
    with pytest.raises(UserError, match="labels"):
        plan(path)


@pytest.mark.parametrize("kwargs, expected", [
    ({"dataset": "dd"}, "--dataset: 'dd' is not a distillation dataset of the spec (did you mean 'd'?)"),
    ({"protocol": "dmm"}, "--protocol: unknown method 'dmm' (did you mean 'dm'?)"),
    ({"aligned_ratio": 0.5}, ("--aligned-ratio/--severity: dataset 'd' has no such variant (it has p=0.1 s=1, "
                              "p=0.8 s=1)")),
])
def test_bad_choices_are_user_errors_naming_the_flag(tmp_path, kwargs, expected):
    with pytest.raises(UserError) as exc:
        plan(save_set(tmp_path / "mine.pt"), **kwargs)
    assert expected in str(exc.value)


# --- the external stage: the import, checked against the dataset variant ----------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store holding the coloured digits variant p=0.1 the external stages read (built once)."""
    tmp = tmp_path_factory.mktemp("external")
    _, graph = plan(save_set(tmp / "seed.pt"), aligned_ratio=0.1)
    (data,) = graph.of_kind("dataset")
    root = str(tmp / "store")
    threads = torch.get_num_threads()
    try:
        execute_stage(data, root, 1, 0, {})
    finally:
        torch.set_num_threads(threads)
    return root, data.key


def external_stage(path: Path, data_key: str, space: str = "pixels"):
    _, graph = plan(path, aligned_ratio=0.1, space=space)
    (ext,) = graph.of_kind("external")
    assert ext.inputs["dataset"] == data_key
    return ext


def test_the_external_stage_imports_the_set(built, tmp_path):
    root, data_key = built
    ext = external_stage(save_set(tmp_path / "mine.pt"), data_key)
    result = execute_stage(ext, root, 1, 0, {})
    store = ArtifactStore(root)
    assert result["metrics"]["n_images"] == 20.0
    assert store.is_complete("external", ext.key, full=True)
    assert store.read_json("external", ext.key, RESULT)["source_file"] == str(tmp_path / "mine.pt")
    tensors = store.read_tensors("external", ext.key, "synthetic.pt")
    assert tuple(tensors["images"].shape) == (20, *SHAPE) and tensors["labels"].tolist() == [c for c in range(10)
                                                                                            for _ in range(2)]


@pytest.mark.parametrize("write, expected", [
    (lambda p: save_set(p, shape=(1, 28, 28)), "has images of shape 20x1x28x28; dataset 'd' needs 20x3x28x28"),
    (lambda p: save_set(p, labels=[0, 1, 10]), "has label 10, but dataset 'd' has 10 classes (0..9)"),
])
def test_planning_refuses_a_set_that_does_not_fit_the_dataset(tmp_path, write, expected):
    """Shape and labels are checked against the target when `ddray evaluate` plans (one line, exit 2),
    before any dataset is built."""
    path = tmp_path / "bad.pt"
    write(path)
    with pytest.raises(UserError) as exc:
        plan(path)
    assert expected in str(exc.value)


@pytest.mark.parametrize("write, expected", [
    (lambda p: save_set(p, shape=(1, 28, 28)), r"images of shape \(20, 1, 28, 28\); the dataset's are N x 3 x 28 x 28"),
    (lambda p: save_set(p, labels=[0, 1, 10]), r"labels outside 0\.\.9"),
    (lambda p: torch.save({"images": torch.rand(3, *SHAPE) * 2, "labels": torch.tensor([0, 1, 2])}, p),
     r"pixel values in \[.*\], not \[0, 1\]"),
])
def test_a_set_that_does_not_fit_the_dataset_fails_its_stage_naming_why(built, tmp_path, write, expected):
    """The stage checks again against the stored variant (the file may have been planned elsewhere): a
    stage planned with a good file that is then replaced fails naming why, and writes nothing."""
    root, data_key = built
    path = tmp_path / "bad.pt"
    save_set(path)
    ext = external_stage(path, data_key)
    write(path)
    ext = Stage("external", {**ext.config, "sha256": sha256_file(path)}, ext.inputs, ext.label, ext.coords,
                runtime={**ext.runtime, "path": str(path)})
    with pytest.raises(ValueError, match=expected):
        execute_stage(ext, root, 1, 0, {})
    assert not ArtifactStore(root).exists("external", ext.key)


def test_a_file_changed_after_planning_is_refused(built, tmp_path):
    root, data_key = built
    path = save_set(tmp_path / "mine.pt")
    ext = external_stage(path, data_key)
    save_set(path, seed=7)
    with pytest.raises(ValueError, match="changed since it was submitted"):
        execute_stage(ext, root, 1, 0, {})
