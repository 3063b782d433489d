"""What every method shares: the config, the synthetic initialisation, the history."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distill_core.guidance import GuidanceConfig
from distill_core.methods.base import DistillConfig, init_synthetic, log_iteration
from distill_core.sets import Normalization, RealData, SyntheticSet


def test_distill_config_round_trips_and_is_strict():
    cfg = DistillConfig(method="dsa", ipc=10, iterations=100, lr_img=0.1, augment="crop_scale",
                        options={"outer_loop": 2}, guidance=GuidanceConfig(kind="cclom", alpha={"convnet": 0.5}))
    assert DistillConfig(**cfg.to_dict()) == cfg
    assert cfg.to_dict()["guidance"] == {"kind": "cclom", "alpha": {"convnet": 0.5}, "checkpoint_epochs": None,
                                         "real_batch": 8196}
    for bad in ({"extra": {}}, {"dsa": True}, {"ipc": 0}, {"lr_img": float("inf")}, {"init": "zeros"}):
        with pytest.raises(ValidationError):
            DistillConfig(**{**dict(method="dc", ipc=1, iterations=1, lr_img=0.1), **bad})
    with pytest.raises(ValidationError):
        cfg.ipc = 5  # frozen


def uneven_real() -> RealData:
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    images = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 3, 3).contiguous()
    return RealData(images, labels, 3, Normalization([0.0], [1.0]))


def test_real_init_is_class_major_real_images_filled_with_replacement():
    real = uneven_real()
    syn = init_synthetic(real, DistillConfig(method="dc", ipc=3, iterations=1, lr_img=0.1),
                         torch.Generator().manual_seed(0))
    assert syn.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    source = syn.images[:, 0, 0, 0].long()
    assert torch.equal(real.labels[source], syn.labels)  # every image is a real image of its class
    assert sorted(source[:3].tolist()) == [0, 1, 2] and source[3:6].tolist() == [3, 3, 3]
    assert len(set(source[6:].tolist())) == 3  # without replacement while the class has enough
    syn.images += 1
    assert float(real.images.max()) == 7.0  # a copy, not a view


def test_noise_init_is_gaussian_in_normalised_space():
    real = uneven_real()
    cfg = DistillConfig(method="dc", ipc=200, iterations=1, lr_img=0.1, init="noise")
    syn = init_synthetic(real, cfg, torch.Generator().manual_seed(0))
    assert syn.images.shape == (600, 1, 3, 3) and syn.norm is real.norm
    assert abs(float(syn.images.mean())) < 0.05 and abs(float(syn.images.std()) - 1) < 0.05


def test_log_iteration_keeps_every_log_every_th_and_the_last():
    cfg = DistillConfig(method="dc", ipc=1, iterations=7, lr_img=0.1, log_every=3)
    syn = SyntheticSet(torch.zeros(1), torch.zeros(1), Normalization([0.0], [1.0]))
    seen = []
    for it in range(cfg.iterations):
        log_iteration(syn, it, cfg, {"loss": float(it)}, lambda i, r, live: seen.append((i, live is syn)))
    assert [r["iteration"] for r in syn.history] == [0, 3, 6] == [i for i, _ in seen]
    assert all(live for _, live in seen)  # progress sees the live set
    assert syn.history[1] == {"loss": 3.0, "iteration": 3}
    cfg = DistillConfig(method="dc", ipc=1, iterations=8, lr_img=0.1, log_every=3)
    syn.history.clear()
    for it in range(cfg.iterations):
        log_iteration(syn, it, cfg, {}, None)
    assert [r["iteration"] for r in syn.history] == [0, 3, 6, 7]
