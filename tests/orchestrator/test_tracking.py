"""What the driver sends to MLflow: flattened params within MLflow's limits."""

import json

from orchestrator.tracking import MAX_PARAM, flatten


def test_flatten_nests_with_dots_and_serialises_the_rest():
    flat = flatten({"method": "dm", "guidance": {"kind": "clom", "alpha": {"convnet": 1.0}}, "options": {},
                    "arch_options": {"width": 32}, "keep": [1, 2], "none": None})
    assert flat == {"method": "dm", "guidance.kind": "clom", "guidance.alpha.convnet": "1.0", "options": "{}",
                    "arch_options.width": "32", "keep": "[1, 2]", "none": "null"}


def test_long_values_are_cut_to_mlflows_limit():
    flat = flatten({"epochs": list(range(1000))})
    assert len(flat["epochs"]) == MAX_PARAM and flat["epochs"].endswith("...")
    assert json.loads(flatten({"x": [1]})["x"]) == [1]
