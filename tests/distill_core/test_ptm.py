"""PTM training: per-epoch checkpoints, and tiled steps that train the same network."""

from __future__ import annotations

import torch

from distill_core.data import build_biased_dataset, load_source
from distill_core.methods.base import RealData
from distill_core.ptm import PTMConfig, train_ptm


def test_tiled_training_equals_whole_batch_training():
    real = RealData.from_dataset(build_biased_dataset(load_source("digits"), "none", 0.1, 1))
    base = dict(arch_options={"width": 8}, epochs=2, seed=0, batch_size=100)
    whole = train_ptm(real, PTMConfig(**base, tile=0))
    tiled = train_ptm(real, PTMConfig(**base, tile=16))  # 100 = 6 x 16 + 4: a ragged last tile
    assert sorted(whole.checkpoints) == sorted(tiled.checkpoints) == [0, 1, 2]
    for name, w in whole.checkpoints[2].items():
        torch.testing.assert_close(tiled.checkpoints[2][name], w, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(whole.history, tiled.history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and a["train_acc"] == b["train_acc"]
