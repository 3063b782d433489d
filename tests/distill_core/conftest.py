"""Shared fixtures for the distill_core tests: real data (scikit-learn's digits), built once per session.

Session-scoped objects are shared by many tests: tests must never modify them in place.
"""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from distill_core.data import SourceData, build_biased_dataset, load_source
from distill_core.evaluation import EvalSets
from distill_core.sets import RealData


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    """Unit tests run single-threaded: deterministic, and fair to a parallel pytest."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def digits_source():
    """scikit-learn's real 8x8 digits at 28x28 (1347 train, 450 test images); always installed."""
    with one_thread():  # session fixtures are built before the per-test thread setting
        return load_source("digits")


@pytest.fixture(scope="session")
def digits_dataset(digits_source):
    """The digits without bias (grey, 1x28x28), per-channel normalisation, 10% held out for validation."""
    with one_thread():
        return build_biased_dataset(digits_source, "none", 0.1, 1, val_fraction=0.1)


@pytest.fixture(scope="session")
def digits_real(digits_dataset) -> RealData:
    return RealData.from_dataset(digits_dataset)


@pytest.fixture(scope="session")
def colored_dataset(digits_source):
    """CMNIST-DD-style coloured digits (3x28x28) at p = 0.1: a biased dataset with all test sets and a
    biased validation split (10%)."""
    with one_thread():
        return build_biased_dataset(digits_source, "colored", 0.1, 1, val_fraction=0.1)


@pytest.fixture(scope="session")
def colored(colored_dataset):
    """Colored digits, as (dataset, real data, evaluation sets in the dataset's normalisation)."""
    ds = colored_dataset
    return ds, RealData.from_dataset(ds), EvalSets.from_dataset(ds, "cpu")


@pytest.fixture(scope="session")
def digits16_source(digits_source) -> SourceData:
    """The real digits resized to 16x16: ZCA fits a D x D covariance, and D = 3*16*16 fits in a second."""
    def small(x):
        x = F.interpolate(x.float(), size=(16, 16), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8)
    s = digits_source
    return SourceData("digits16", small(s.train_images), s.train_labels, small(s.test_images), s.test_labels,
                      s.num_classes)


@pytest.fixture(scope="session")
def zca_dataset(digits16_source):
    """Coloured 16x16 digits whitened with ZCA (MTT's CIFAR setting)."""
    with one_thread():
        return build_biased_dataset(digits16_source, "colored", 0.1, 1, zca=True, val_fraction=0.1)
