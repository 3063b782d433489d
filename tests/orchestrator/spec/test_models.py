import copy
import os
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.plan.graph import build_stage_graph
from orchestrator.spec.loading import MAX_SPEC_BYTES, load_spec, parse_spec, profiles_of, read_spec

CONFIGS = sorted((Path(__file__).parents[3] / "configs").rglob("*.yaml"))

BASE = {
    "version": 1,
    "name": "t",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.1, 0.8]}],
    "ptm_pools": [{"name": "p", "dataset": "d", "architectures": ["convnet"], "seeds": [0, 1], "epochs": 3}],
    "distillation": {"methods": ["dm"], "ipc": [1, 10], "iterations": 5,
                     "guidance": ["none", {"kind": "clom", "pool": "p", "alpha": 10}]},
    "evaluation": {"architectures": ["convnet", "mlp"], "repeats": 2, "epochs": 5, "random_baseline": False},
}


def spec_of(mutate=lambda d: None):
    data = copy.deepcopy(BASE)
    mutate(data)
    return parse_spec(data)


def errors_of(mutate) -> list[str]:
    with pytest.raises(UserError) as exc:
        spec_of(mutate)
    return exc.value.lines


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    spec = load_spec(path)
    assert spec.version == 1
    for profile in profiles_of(path):  # and every profile over it builds its graph
        build_stage_graph(load_spec(path, profile))


def test_a_profile_overlays_the_spec_and_an_unknown_one_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "profiles": {"smoke": {"name": "t-smoke", "distillation": {"ipc": [1]}}}}))
    full, smoke = load_spec(path), load_spec(path, "smoke")
    assert (full.name, full.distillation.ipc) == ("t", [1, 10])
    assert (smoke.name, smoke.distillation.ipc, smoke.distillation.methods) == ("t-smoke", [1], ["dm"])  # merged
    assert smoke.study_id != full.study_id
    spec, text = read_spec(path, "smoke")
    assert "t-smoke" in text and "profiles" not in text
    with pytest.raises(UserError) as exc:
        load_spec(path, "smokey")
    assert exc.value.lines == [f"--profile: 'smokey' is not a profile of {path} (known: smoke)"]


def test_valid_spec_defaults():
    spec = spec_of()
    assert spec.tracking.uri == "sqlite:///mlflow.db"
    assert spec.store.root == "./ddray-store"
    assert spec.distillation.iterations == [5]  # scalars become one-point grids
    assert spec.distillation.seeds == [0]
    assert spec.study_id.startswith("t-")


def test_spec_hash_ignores_resources_runtime_and_tracking():
    a = spec_of()
    b = spec_of(lambda d: d.update(resources={"distill": {"cpus": 2}}, tracking={"uri": "sqlite:///x.db"},
                                   runtime={"matching": "loop", "compile": False, "tile": 0}))
    c = spec_of(lambda d: d.update(seed=1))
    assert a.study_id == b.study_id != c.study_id


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(distilation={}), "distilation: unknown key (did you mean 'distillation'?)"),
    (lambda d: d["distillation"].update(ipc=[1, -1]), "distillation.ipc[1]: must be >= 1"),
    (lambda d: d["evaluation"].update(architectures=["convnet", "resnet19"]),
     "evaluation.architectures[1].name: unknown architecture 'resnet19' (did you mean 'resnet18'?)"),
    (lambda d: d["distillation"].update(methods=["dmm"]),
     "distillation.methods[0]: unknown method 'dmm' (did you mean 'dm'?)"),
    (lambda d: d["datasets"][0].update(aligned_ratios=[1.5]), "datasets[0].aligned_ratios[0]: must be <= 1.0"),
    (lambda d: d["datasets"][0].update(severities=[7]), "datasets[0].severities[0]: must be 1, 2, 3 or 4, got 7"),
    (lambda d: d["datasets"][0].update(source="cifar1"),
     "datasets[0].source: unknown source 'cifar1' (did you mean 'cifar10'?)"),
    (lambda d: d.update(version=2), "version: must be 1, got 2"),
    (lambda d: d.pop("datasets"), "datasets: field required"),
    (lambda d: d["evaluation"].update(repeats=0), "evaluation.repeats: must be >= 1"),
    (lambda d: d["evaluation"].update(architectures=[{"name": "convnet", "widht": 3}]),
     "evaluation.architectures[0].widht: unknown key (did you mean 'width'?)"),
    (lambda d: d.update(runtime={"matching": "fast"}),
     "runtime.matching: must be 'auto', 'batched', 'tiled' or 'loop', got 'fast'"),
    (lambda d: d.update(runtime={"device": "cuda"}), "runtime: device: set by resources.<kind>.gpus, not here"),
    (lambda d: d["datasets"][0].update(source="cifar10"),
     "datasets[0]: bias 'colored' needs a grayscale source (digits, fashion_mnist, mnist)"),
    (lambda d: d["distillation"]["guidance"][1].update(kind="clom", pool=None),
     "distillation.guidance[1]: guidance 'clom' needs a ptm pool (set pool: NAME)"),
    (lambda d: d["distillation"].update(iterations="many"),
     "distillation.iterations[0]: input should be a valid integer, unable to parse string as an integer"),
])
def test_bad_spec_messages_name_the_field(mutate, expected):
    lines = errors_of(mutate)
    assert all("\n" not in line for line in lines)
    assert expected in lines, lines


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["distillation"].update(lr_img=float("nan")), "distillation.lr_img[0]: must be a finite number, got nan"),
    (lambda d: d["evaluation"].update(lr=float("inf")), "evaluation.lr: must be a finite number, got inf"),
    (lambda d: d["distillation"].update(ipc=[10**8]), "distillation.ipc[0]: must be <= 100000"),
    (lambda d: d["distillation"].update(arch={"name": "convnet", "width": 10**8}),
     "distillation.arch.width: must be <= 4096"),
    (lambda d: d["evaluation"].update(epochs=10**9), "evaluation.epochs: must be <= 100000"),
    (lambda d: d["ptm_pools"][0].update(seeds=[-1]), "ptm_pools[0].seeds[0]: must be >= 0"),
    (lambda d: d.update(name="x" * 300), "name: too long (at most 64 characters)"),
    (lambda d: d.update(name="../escape"),
     "name: use letters, digits, '.', '_' and '-' only, starting with a letter or digit"),
    (lambda d: d["distillation"].update(ipc=list(range(1, 1002))), "distillation.ipc: too many entries (at most 1000)"),
])
def test_hostile_numbers_and_names_are_refused(mutate, expected):
    assert expected in errors_of(mutate)


def test_every_problem_is_reported_once_per_line():
    def two_problems(d):
        d["distillation"].update(ipc=[0])
        d["evaluation"].update(epochs=0)
    lines = errors_of(two_problems)
    assert "distillation.ipc[0]: must be >= 1" in lines
    assert "evaluation.epochs: must be >= 1" in lines
    assert len(lines) == len(set(lines))


def test_yaml_syntax_error_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nname: [unclosed\n")
    with pytest.raises(UserError) as exc:
        load_spec(p)
    assert len(exc.value.lines) == 1 and "YAML error" in exc.value.lines[0]


def test_duplicate_yaml_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("version: 1\nname: a\nname: b\ndatasets: []\n")
    with pytest.raises(UserError) as exc:
        load_spec(p)
    assert exc.value.lines == [f"{p}:3:1: YAML error: duplicate key 'name'"]


def test_oversized_spec_file_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("version: 1\n# " + "x" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(UserError, match="spec too large"):
        load_spec(p)


def test_alias_bomb_is_bounded(tmp_path):
    """Aliases are shared objects in YAML; a nest of them must not expand into the hash or a grid."""
    lines = ["version: 1", "name: bomb", "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as exc:
        load_spec(p)
    # refused by the loader, counted once per distinct node (10^9 once expanded), before any model sees it
    assert len(exc.value.lines) == 1
    assert exc.value.lines[0].startswith(f"{p}:") and "expands to more than 1,000,000 nodes" in exc.value.lines[0]


def test_missing_spec_file(tmp_path):
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_relative_paths_in_a_spec_file_resolve_against_its_directory(tmp_path, monkeypatch):
    data = copy.deepcopy(BASE)
    data["store"] = {"root": "../store"}
    data["tracking"] = {"uri": "sqlite:///runs/mlflow.db"}
    data["datasets"][0]["data_root"] = "raw"
    data["profiles"] = {"smoke": {"store": {"root": "smoke-store"}}}
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for where in (path, os.path.relpath(path)):  # however the file is named, from another directory
        spec = load_spec(where)
        assert spec.store.root == str(tmp_path / "store")
        assert spec.tracking.uri == f"sqlite:///{tmp_path}/configs/runs/mlflow.db"
        assert spec.datasets[0].data_root == str(tmp_path / "configs" / "raw")
    assert load_spec(path, "smoke").store.root == str(tmp_path / "configs" / "smoke-store")
    as_written, _ = read_spec(path, anchored=False)  # a cluster submission checks what was written
    assert as_written.store.root == "../store" and as_written.tracking.uri == "sqlite:///runs/mlflow.db"
    # where the raw data is read from is not what the study computes: the same study from anywhere
    assert as_written.study_id == spec.study_id == parse_spec(BASE).study_id


# paper 2's published alpha per (dataset, method, IPC), and the CIFAR-10 IPC-50 weights of the four-architecture
# pool (ConvNet, VGG11, ResNet18, AlexNet) per method (reference protocols, section 3)
PUBLISHED_ALPHA = {
    "fmnist": {("dc", 10): 100, ("dc", 50): 100, ("dsa", 10): 100, ("dsa", 50): 100, ("dm", 10): 100, ("dm", 50): 100},
    "cifar10": {("dc", 10): 1000, ("dc", 50): 5000, ("dsa", 10): 5000, ("dsa", 50): 1000, ("dm", 10): 2000,
                ("dm", 50): 1000},
    "cifar100": {("dc", 10): 10000, ("dc", 50): 1000, ("dsa", 10): 10000, ("dsa", 50): 10, ("dm", 10): 500,
                 ("dm", 50): 1},
}
POOL_WEIGHTS = {"dc": {"convnet": 5000, "vgg11": 5000, "resnet18": 5000, "alexnet": 100},
                "dsa": {"convnet": 1000, "vgg11": 1000, "resnet18": 1000, "alexnet": 2000},
                "dm": {"convnet": 1000, "vgg11": 1000, "resnet18": 1000, "alexnet": 1000}}
PTM_OPTIONS = Path(__file__).parents[3] / "configs" / "ptm-options"


def _same_alpha(a, b) -> bool:
    """Equal weights: a scalar equals a mapping giving every architecture that value."""
    values = lambda x: set(x.values()) if isinstance(x, dict) else {x}  # noqa: E731
    return a == b or (not (isinstance(a, dict) and isinstance(b, dict)) and values(a) == values(b) and len(values(a)) == 1)


def _guided_cells(path) -> dict[tuple, list]:
    """(guidance setting without its alpha, method, ipc) -> the alphas the full study distils with."""
    cells: dict[tuple, list] = {}
    for s in build_stage_graph(load_spec(path)).of_kind("distill"):
        if s.config["guidance"] is not None:
            setting = s.coords["guidance"].rsplit(":a", 1)[0]  # clom:pool@epochs
            cells.setdefault((setting, s.config["method"], s.config["ipc"]), []).append(s.config["guidance"]["alpha"])
    return cells


@pytest.mark.parametrize("option", ["init", "architecture", "epoch"])
@pytest.mark.parametrize("dataset", sorted(PUBLISHED_ALPHA))
def test_paper2_configs_hold_the_published_grid_at_the_published_alpha(option, dataset):
    path = PTM_OPTIONS / (f"{option}.yaml" if dataset == "fmnist" else f"{option}-{dataset}.yaml")
    spec = load_spec(path)
    assert [d.source for d in spec.datasets] == [{"fmnist": "fashion_mnist"}.get(dataset, dataset)]
    assert (spec.evaluation.repeats, spec.distillation.seeds) == (20, [0])  # DDInterpreter: 1 distillation x 20 nets
    cells = _guided_cells(path)
    settings = {setting for setting, _, _ in cells}
    assert len(settings) >= 2
    # every published cell runs under each setting at its published alpha, and at no other (nor any other cell)
    assert {(method, ipc) for _, method, ipc in cells} == set(PUBLISHED_ALPHA[dataset])
    for setting in settings:
        for (method, ipc), alpha in PUBLISHED_ALPHA[dataset].items():
            if dataset == "cifar10" and ipc == 50 and "four-archs" in setting:
                alpha = POOL_WEIGHTS[method]
            ran = cells.get((setting, method, ipc), [])
            assert len(ran) == 1 and _same_alpha(ran[0], alpha), (setting, method, ipc, ran)


def test_cross_arch_holds_each_methods_published_pool_weights_on_six_architectures():
    path = Path(__file__).parents[3] / "configs" / "cross-arch.yaml"
    spec = load_spec(path)
    assert [d.source for d in spec.datasets] == ["cifar10"] and spec.distillation.ipc == [50]
    assert [a.name for a in spec.evaluation.architectures] == ["mlp", "convnet", "lenet", "alexnet", "vgg11",
                                                              "resnet18"]
    cells = _guided_cells(path)  # each method at its own weights only
    assert cells == {("clom:four-archs", method, 50): [weights] for method, weights in POOL_WEIGHTS.items()}


def test_the_domain_study_guides_cifar10_with_near_and_far_sources_at_its_shape():
    spec = load_spec(PTM_OPTIONS / "domain.yaml")
    sources = {d.name: d for d in spec.datasets}
    assert [d.source for d in spec.datasets if d.distill] == ["cifar10"]
    assert {d.source for d in spec.datasets if not d.distill} == {"cifar100", "svhn", "mnist"}
    assert (sources["mnist"].channels, sources["mnist"].image_size) == (3, 32)
    kinds = {g.pool: g.kind for g in spec.distillation.guidance if g.kind != "none"}
    assert kinds == {"c10-pool": "clom", "c100-pool": "cclom", "svhn-pool": "cclom", "mnist-pool": "cclom"}


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["distillation"].update(iterations=[2_000_000], log_every=1),
     ("distillation: log_every: 2,000,000 iterations every 1 keep 2,000,000 history records per distillation; "
      "at most 1,000,000 (raise log_every)")),
    (lambda d: d["distillation"].update(iterations=None, search={
        "space": {"iterations": {"randint": [10, 2_000_000]}}, "num_samples": 2}),
     "distillation: search: a trial keeps every iteration's record, 2,000,000 iterations; at most 1,000,000"),
    (lambda d: d["distillation"].update(search={
        "space": {"lr_img": {"grid": list(range(1, 1001))}, "guidance.alpha": {"grid": list(range(1, 101))}},
        "num_samples": 2}),
     "distillation.search: num_samples: 2 x 1000 x 100 grid points = 200,000 trials per search; at most 100,000"),
    (lambda d: d["ptm_pools"][0].update(epochs=3, checkpoint_epochs=[0, 1, 2, 3, 3]),
     "ptm_pools[0]: checkpoint_epochs: 5 entries, but a pool keeps at most 4 checkpoints (epochs 0..3, at most 1,001)"),
    (lambda d: d["ptm_pools"][0].update(epochs=100_000),
     ("ptm_pools[0]: epochs: keeping every epoch (checkpoint_epochs unset) of 100,000 epochs is 100,001 "
      "checkpoints in one stage; at most 1,001 (list the epochs to keep in checkpoint_epochs)")),
])
def test_work_a_stage_keeps_in_memory_is_bounded(mutate, expected):
    assert expected in errors_of(mutate)


def test_history_and_checkpoints_at_their_bounds_are_valid():
    spec_of(lambda d: d["distillation"].update(iterations=[1_000_000], log_every=1))
    spec_of(lambda d: d["ptm_pools"][0].update(epochs=1_000))
    spec_of(lambda d: d["ptm_pools"][0].update(epochs=100_000, checkpoint_epochs=[0, 100_000]))


@pytest.mark.parametrize("text, expected", [
    ("version: 1\nname: " + "[" * 50_000 + "]" * 50_000 + "\n", ":2:70: YAML error: nested deeper than 64 levels"),
    ("version: 1\n" + "".join(" " * i + f"k{i}:\n" for i in range(100)), ":65:64: YAML error: nested deeper than 64 levels"),
    ("version: 1\na: &a [" + "[" * 40 + "1" + "]" * 40 + "]\nb: [[[[[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n",
     ":3:9: YAML error: nested deeper than 64 levels through its aliases"),
    ("version: 1\na: &a [*a]\n", ":2:4: YAML error: an alias refers to a node that contains it"),
    ("version: 1\n? [1, 2]\n: 3\n", ":2:3: YAML error: a mapping key must be a plain value, not a list or mapping"),
    ("version: 1\nseed: " + "9" * 5000 + "\n", ":2:7: YAML error: an integer of 5,000 digits (at most 100)"),
])
def test_hostile_yaml_is_one_line_naming_the_file(tmp_path, text, expected):
    p = tmp_path / "hostile.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as exc:
        load_spec(p)
    assert exc.value.lines == [f"{p}{expected}"]  # file:line:column, before any recursion or expansion


def test_aliases_within_the_limits_still_load(tmp_path):
    p = tmp_path / "anchored.yaml"
    p.write_text("version: 1\nname: t\ndatasets: [{name: d, source: digits, bias: colored}]\n"
                 "distillation: {methods: [dm], arch: &net {name: convnet, width: 16}}\n"
                 "evaluation: {architectures: [*net, mlp]}\n")
    assert load_spec(p).evaluation.architectures[0].width == 16
