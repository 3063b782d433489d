import copy
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.spec import load_spec, parse_spec

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))

BASE = {
    "version": 1,
    "name": "t",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.1, 0.8]}],
    "ptm_pools": [{"name": "p", "dataset": "d", "architectures": ["convnet"], "seeds": [0, 1], "epochs": 3}],
    "distillation": {"methods": ["dm"], "ipc": [1, 10], "iterations": 5,
                     "guidance": ["none", {"kind": "clom", "pool": "p", "alpha": 10}]},
    "evaluation": {"architectures": ["convnet", "mlp"], "repeats": 2, "epochs": 5},
}


def errors_of(mutate) -> list[str]:
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(UserError) as exc:
        parse_spec(data)
    return exc.value.lines


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    spec = load_spec(path)
    assert spec.version == 1


def test_valid_spec_defaults():
    spec = parse_spec(BASE)
    assert spec.tracking.uri == "sqlite:///mlflow.db"
    assert spec.store.root == "./ddray-store"
    assert spec.distillation.iterations == [5]  # scalars become one-point grids
    assert spec.study_id.startswith("t-")


def test_spec_hash_ignores_resources_and_tracking():
    a = parse_spec(BASE)
    b = parse_spec({**BASE, "resources": {"distill": {"cpus": 2}}, "tracking": {"uri": "sqlite:///x.db"}})
    c = parse_spec({**BASE, "seed": 1})
    assert a.study_id == b.study_id != c.study_id


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(distilation={}), "distilation: unknown key (did you mean 'distillation'?)"),
    (lambda d: d["distillation"].update(ipc=[1, -1]), "distillation.ipc[1]: must be >= 1"),
    (lambda d: d["evaluation"].update(architectures=["convnet", "resnet19"]),
     "evaluation.architectures[1].name: unknown architecture 'resnet19' (did you mean 'resnet18'?)"),
    (lambda d: d["distillation"].update(methods=["dmm"]),
     "distillation.methods[0]: unknown method 'dmm' (did you mean 'dm'?)"),
    (lambda d: d["datasets"][0].update(aligned_ratios=[1.5]),
     "datasets[0].aligned_ratios[0]: must be within [0, 1], got 1.5"),
    (lambda d: d["datasets"][0].update(severities=[7]), "datasets[0].severities[0]: must be one of 1, 2, 3, 4, got 7"),
    (lambda d: d["ptm_pools"][0].update(dataset="dd"), "ptm_pools[0].dataset: unknown dataset 'dd' (did you mean 'd'?)"),
    (lambda d: d["distillation"]["guidance"][1].update(pool="q"),
     "distillation.guidance[1].pool: unknown ptm pool 'q' (known: p)"),
    (lambda d: d.update(version=2), "version: must be 1, got 2"),
    (lambda d: d.pop("datasets"), "datasets: field required"),
    (lambda d: d["evaluation"].update(repeats=0), "evaluation.repeats: must be >= 1"),
    (lambda d: d["evaluation"].update(architectures=[{"name": "convnet", "widht": 3}]),
     "evaluation.architectures[0].widht: unknown key (did you mean 'width'?)"),
    (lambda d: d["distillation"].update(extra={"matching": "fast"}),
     "distillation.extra.matching: must be one of batched, tiled, loop, got 'fast'"),
    (lambda d: d["datasets"][0].update(source="cifar10"),
     "datasets[0]: bias 'colored' needs a grayscale source (digits, fashion_mnist, mnist)"),
])
def test_bad_spec_messages_name_the_field(mutate, expected):
    lines = errors_of(mutate)
    assert all("\n" not in line for line in lines)
    assert expected in lines, lines


def test_every_problem_is_reported_once_per_line():
    def two_problems(d):
        d["distillation"].update(ipc=[0])
        d["evaluation"].update(epochs=0)
    lines = errors_of(two_problems)
    assert "distillation.ipc[0]: must be >= 1" in lines
    assert "evaluation.epochs: must be >= 1" in lines


def test_yaml_syntax_error_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nname: [unclosed\n")
    with pytest.raises(UserError) as exc:
        load_spec(p)
    assert len(exc.value.lines) == 1 and "YAML syntax error" in exc.value.lines[0]


def test_missing_spec_file(tmp_path):
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_guidance_pool_must_see_the_targets_image_shape():
    def cross_domain(d):
        d["datasets"].append({"name": "f", "source": "fashion_mnist", "bias": "none", "distill": False})
        d["ptm_pools"].append({"name": "fp", "dataset": "f", "architectures": ["convnet"]})
        d["distillation"]["guidance"] = [{"kind": "cclom", "pool": "fp"}]
    assert "distillation.guidance[0]: pool 'fp' sees 1x28x28 images but the targets are 3x28x28" in errors_of(cross_domain)


def test_mtt_needs_a_trajectory_pool_keeping_every_epoch():
    lines = errors_of(lambda d: d["distillation"].update(methods=["mtt"]))
    assert "distillation.trajectories: method 'mtt' needs a ptm pool of expert trajectories" in lines

    def pinned(d):
        d["distillation"].update(methods=["mtt"], trajectories="p")
        d["ptm_pools"][0]["checkpoint_epochs"] = [3]
    assert "distillation.trajectories: pool 'p' must keep every epoch (leave checkpoint_epochs unset)" in errors_of(pinned)
