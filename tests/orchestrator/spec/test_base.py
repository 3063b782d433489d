"""Each science field is declared once, in its distill_core config; the spec refers to it and the plan passes it on."""

import ast
from pathlib import Path
from typing import Annotated, get_args, get_origin

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError

from distill_core.data.biased import DatasetConfig
from distill_core.evaluation import EvalConfig
from distill_core.guidance import GuidanceConfig
from distill_core.methods import DistillConfig
from distill_core.ptm import PTMConfig
from orchestrator.spec.base import Strict, bounded, same, shared
from orchestrator.spec.models import DatasetSpec, DistillationSpec, EvaluationSpec, GuidanceSpec, PTMPoolSpec
from orchestrator.spec.search import ProxySpec, SearchConfig, SearchSpec

ROOT = Path(__file__).parents[3]
PAIRS = [(DistillationSpec, DistillConfig), (EvaluationSpec, EvalConfig), (PTMPoolSpec, PTMConfig),
         (GuidanceSpec, GuidanceConfig), (DatasetSpec, DatasetConfig), (SearchSpec, SearchConfig),
         (ProxySpec, EvalConfig)]
# grid axes and renamed fields: spec name -> the config field it stands for
RENAMED = {"seeds": "seed", "aligned_ratios": "aligned_ratio", "checkpoint_epochs": "keep_epochs"}


BOUNDS = (Ge, Gt, Le, Lt)  # a value's bounds; a grid's own length limits are the spec's


def bounds(items) -> set[str]:
    return {repr(m) for m in items if isinstance(m, BOUNDS)}


def constraints(annotation) -> set[str]:
    """Every bound anywhere inside an annotation (Annotated metadata, list items, unions)."""
    out: set[str] = set()
    if get_origin(annotation) is Annotated:
        args = get_args(annotation)
        return bounds(args[1:]) | constraints(args[0])
    for arg in get_args(annotation):
        out |= constraints(arg)
    return out


@pytest.mark.parametrize("spec_model, config", PAIRS, ids=lambda m: m.__name__)
def test_a_field_the_spec_shares_with_a_config_has_exactly_the_configs_bounds(spec_model, config):
    checked = 0
    for name, info in spec_model.model_fields.items():
        target = RENAMED.get(name, name)
        if target not in config.model_fields:
            continue
        want = bounds(config.model_fields[target].metadata) | constraints(config.model_fields[target].annotation)
        got = bounds(info.metadata) | constraints(info.annotation)
        assert want == got, (spec_model.__name__, name, want, got)
        checked += 1
    assert checked >= 2  # the pair shares fields: the test reads something


def test_same_takes_the_default_and_bounds_and_shared_passes_the_value_on():
    class Block(Strict):
        lr_net: same(DistillConfig, "lr_net")
        ipcs: list[bounded(DistillConfig, "ipc")] = [10]
        note: str = "not a config field"

    assert Block().lr_net == DistillConfig.model_fields["lr_net"].default
    with pytest.raises(ValidationError):
        Block(lr_net=0.0)  # DistillConfig's gt=0
    with pytest.raises(ValidationError):
        Block(ipcs=[0])  # DistillConfig's ge=1, on each grid item
    assert shared(Block(lr_net=0.5), DistillConfig) == {"lr_net": 0.5}  # only the config's own fields
    assert shared(Block(), EvalConfig) == {}
    # a renamed field passes on under the config's name
    assert shared(PTMPoolSpec(name="p", dataset="d", architectures=["convnet"], checkpoint_epochs=[1, 2]),
                  PTMConfig)["keep_epochs"] == [1, 2]


# keywords that look like copies but are not: each says why
NOT_COPIES = {
    "seed=spec.seed": "the study's seed, which offsets every stage's seed, is the evaluation's",
    "kind=guide.kind": "the spec's kind also has 'none' (no guidance), which has no config",
    "arch=config.arch": "a search's proxy evaluates on the distillation's own network",
    "arch_options=config.arch_options": "(the same)",
}


def test_the_plan_copies_no_config_field_by_hand():
    """No `field=block.field` keyword in the plan: fields shared with a config travel with `shared(...)`."""
    copies = []
    for path in (ROOT / "orchestrator" / "plan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == node.arg and isinstance(node.value.value, ast.Name):
                if f"{node.arg}={ast.unparse(node.value)}" not in NOT_COPIES:
                    copies.append(f"{path.name}:{node.value.lineno} {node.arg}={ast.unparse(node.value)}")
    assert copies == []


def test_the_hand_copy_check_sees_a_copy():
    tree = ast.parse("EvalConfig(lr=e.lr, epochs=e.epochs or 1)")
    hits = [k.arg for k in ast.walk(tree) if isinstance(k, ast.keyword) and isinstance(k.value, ast.Attribute)
            and k.value.attr == k.arg]
    assert hits == ["lr"]
