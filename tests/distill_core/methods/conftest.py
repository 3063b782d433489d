import pytest

from distill_core.augment import DSA_STRATEGY_NO_FLIP
from distill_core.ptm import PTMConfig, recipe, train_ptm
from tests.distill_core.conftest import one_thread
from tests.distill_core.methods.helpers import WIDTH


@pytest.fixture(scope="session")
def expert(digits_real) -> dict:
    """A two-epoch expert trajectory {0, 1, 2: state_dict}, trained with the "expert" recipe (MTT's buffer.py)."""
    cfg = PTMConfig(**recipe("expert", 2, DSA_STRATEGY_NO_FLIP), arch_options=WIDTH, epochs=2, seed=0)
    with one_thread():
        return train_ptm(digits_real, cfg).checkpoints
