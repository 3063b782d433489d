"""The benchmark-only vmap stacking form equals training one network at a time."""

import copy

import pytest
import torch

from benchmarks import stacked
from distill_core.data import build_biased_dataset, load_source
from distill_core.evaluation import EvalConfig
from distill_core.networks import build_network
from distill_core.sets import RealData, SyntheticSet


@pytest.fixture(scope="module")
def real() -> RealData:
    return RealData.from_dataset(build_biased_dataset(load_source("digits"), "none", 0.1, 1))


def real_subset(real: RealData, per_class: int) -> SyntheticSet:
    idx = torch.cat([i[:per_class] for i in real.class_index])
    return SyntheticSet(real.images[idx], real.labels[idx], real.norm)


@pytest.mark.parametrize("arch,augment", [("convnet", None), ("convnet", "dsa:color_crop_cutout_scale_rotate"),
                                          ("convnet_bn", None)])
def test_stacked_training_equals_one_at_a_time(real, arch, augment):
    torch.set_num_threads(1)
    syn = real_subset(real, 3)
    cfg = EvalConfig(arch=arch, arch_options={"width": 8}, epochs=4, batch_size=16, augment=augment)
    factory = stacked.architecture_factory(cfg, 1, 10, 28)
    seeds = stacked.default_seeds(cfg, 3)
    models = stacked.build_models(factory, seeds)
    copies = [copy.deepcopy(m) for m in models]
    together = stacked.train_stacked(models, syn.images, syn.labels, cfg, seeds=seeds)
    alone = [stacked.train_one(m, syn.images, syn.labels, cfg, s) for m, s in zip(copies, seeds)]
    for a, b in zip(together, alone):
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5, msg=name)
    # a factory gives the same networks as building them by hand
    again = stacked.train_stacked(factory, syn.images, syn.labels, cfg, seeds=seeds)
    torch.testing.assert_close(again[0].state_dict(), together[0].state_dict())


def test_stacked_predictions_match_each_network(real):
    models = stacked.build_models(lambda: build_network("convnet", 1, 10, 28, width=8), [0, 1])
    batch = stacked.StackedModels(models)
    x = real.images[:40]
    pred = batch.predict(x, batch_size=16)
    with torch.no_grad():
        for m, model in enumerate(models):
            assert torch.equal(pred[m], model.eval()(x).argmax(1))
