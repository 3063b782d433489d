"""Folded evaluation (distill_core.grouped): N ConvNets as one grouped network give the one-at-a-time numbers."""

from __future__ import annotations

import pytest
import torch

from distill_core import evaluation
from distill_core.augment import DSA_STRATEGY
from distill_core.evaluation import EvalConfig, evaluate_repeats, train_and_evaluate
from distill_core.grouped import FoldedConvNet, can_fold, predict_folded, train_and_evaluate_folded
from distill_core.networks import build_network
from distill_core.runtime import Runtime
from tests.distill_core.helpers import real_init


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "groupnorm", "layernorm", "none"])
def test_folded_forward_equals_each_network(norm):
    torch.manual_seed(0)
    models = [build_network("convnet", 3, 10, 28, width=8, depth=2, norm=norm) for _ in range(3)]
    folded = FoldedConvNet(models)
    xs = [torch.randn(5, 3, 28, 28) for _ in models]
    out = folded(torch.cat(xs, 1))
    assert out.shape == (5, 3, 10)
    for j, (m, x) in enumerate(zip(models, xs)):
        torch.testing.assert_close(out[:, j], m(x), rtol=1e-4, atol=1e-5)
    folded.eval()
    x = torch.randn(7, 3, 28, 28)
    pred = predict_folded(folded, x, batch_size=3)
    for j, m in enumerate(models):
        assert torch.equal(pred[:, j], m.eval()(x).argmax(1))
    assert folded.training is False


def test_only_convnets_fold():
    assert can_fold(build_network("convnet", 1, 10, 28, width=8))
    assert can_fold(build_network("convnetd1", 1, 10, 28, width=8))
    assert not can_fold(build_network("lenet", 1, 10, 28))
    assert not can_fold(build_network("mlp", 1, 10, 28))


def test_folded_evaluation_equals_one_at_a_time(colored):
    """Training repeats as one grouped network gives the one-network loop's numbers."""
    _, real, sets = colored
    syn = real_init(real, 3)
    for augment, norm, selection in ((None, "instancenorm", "val"), (f"dsa:{DSA_STRATEGY}", "batchnorm", "last")):
        cfg = EvalConfig(arch="convnet", arch_options={"width": 8, "norm": norm}, epochs=6, augment=augment,
                         checkpoints=3, selection=selection)
        one = [train_and_evaluate(syn, sets, cfg, r) for r in range(3)]
        folded = train_and_evaluate_folded(syn, sets, cfg, [0, 1, 2], Runtime())
        for a, b in zip(one, folded):
            assert a["epoch"] == b["epoch"] and a["at_val"]["epoch"] == b["at_val"]["epoch"]
            for name in ("acc", "acc_last", "acc_val_selected", "acc_conflicting"):
                assert abs(a[name] - b[name]) <= 1 / len(sets.test[1])
            assert abs(a["val_acc"] - b["val_acc"]) <= 1 / len(sets.val[1])
            assert [e for e, _ in a["val_curve"]] == [e for e, _ in b["val_curve"]]
            assert [v for _, v in a["val_curve"]] == pytest.approx([v for _, v in b["val_curve"]],
                                                                  abs=1 / len(sets.val[1]))


def test_tiled_folded_steps_equal_whole_batch_steps(colored):
    _, real, sets = colored
    syn = real_init(real, 5)
    cfg = EvalConfig(arch="convnet", arch_options={"width": 8}, epochs=6, checkpoints=3, augment=f"dsa:{DSA_STRATEGY}")
    whole = train_and_evaluate(syn, sets, cfg, 0, Runtime(tile=0))
    folded = train_and_evaluate_folded(syn, sets, cfg, [0, 1], Runtime(tile=7))
    assert folded[0]["epoch"] == whole["epoch"] and abs(folded[0]["acc"] - whole["acc"]) <= 1 / len(sets.test[1])


def test_evaluate_repeats_folds_when_the_runtime_says_so(colored, monkeypatch):
    _, real, sets = colored
    syn = real_init(real, 2)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=3, checkpoints=2, repeats=2)
    calls = []
    original = evaluation.train_and_evaluate_folded  # distill_core.grouped's, as evaluate_repeats calls it
    monkeypatch.setattr(evaluation, "train_and_evaluate_folded",
                        lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    folded = evaluate_repeats(syn, sets, cfg, Runtime(fold=True))
    assert calls == [[0, 1]]
    one = evaluate_repeats(syn, sets, cfg, Runtime(fold=False))
    assert calls == [[0, 1]]  # not folded
    for a, b in zip(one, folded):
        assert a["epoch"] == b["epoch"] and abs(a["acc"] - b["acc"]) <= 1 / len(sets.test[1])
    lenet = EvalConfig(arch="lenet", epochs=1, checkpoints=1, repeats=2)
    assert len(evaluate_repeats(syn, sets, lenet, Runtime(fold=True))) == 2 and calls == [[0, 1]]  # cannot fold
