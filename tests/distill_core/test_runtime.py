"""The Runtime: execution decisions that never change the numbers, and the optional torch.compile lever.

None of these tests needs a GPU: a Runtime on device "cuda" is only a setting,
and the engines it picks are constructed, not run.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distill_core.compiled import MaybeCompiled
from distill_core.methods.engines import GradientMatcher, RealEmbedder
from distill_core.networks import build_network
from distill_core.runtime import COMPILE_MIN_CALLS, DEFAULT_RUNTIME, PREDICT_BATCH_CPU, PREDICT_BATCH_CUDA, Runtime
from distill_core.tiling import TILE_CPU

CPU, CUDA = Runtime(), Runtime(device="cuda")


def net(arch: str = "convnet"):
    return build_network(arch, 1, 10, 28, width=8)


# --- compile -----------------------------------------------------------------------------------

def test_compile_for_auto_compiles_only_long_cpu_runs():
    assert CPU.compile_for(COMPILE_MIN_CALLS)
    assert not CPU.compile_for(COMPILE_MIN_CALLS - 1)
    assert not CUDA.compile_for(10**9)  # auto never compiles on CUDA
    assert not Runtime(device="cuda:0").compile_for(10**9)


def test_compile_can_be_forced_either_way():
    assert Runtime(device="cuda", compile=True).compile_for(1)
    assert Runtime(compile=True).compile_for(0)
    assert not Runtime(compile=False).compile_for(10**9)
    assert Runtime(compile=True).compiled(lambda x: x, 1).compiled
    assert not Runtime(compile=False).compiled(lambda x: x, 10**9).compiled
    assert CPU.compiled(lambda x: x, COMPILE_MIN_CALLS).compiled  # the same rule as compile_for
    assert not CPU.compiled(lambda x: x, COMPILE_MIN_CALLS - 1).compiled


def test_a_failing_compiler_falls_back_to_eager():
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ toolchain here")

    def double(x):
        return x * 2

    fn = MaybeCompiled(double, True, backend=broken_backend)
    assert fn.compiled
    torch.testing.assert_close(fn(torch.ones(3)), torch.full((3,), 2.0))
    assert not fn.compiled  # switched to eager for the rest of the run


def test_disabled_is_the_plain_function():
    def inc(x):
        return x + 1

    fn = MaybeCompiled(inc, False)
    assert not fn.compiled and fn.fn is inc


# --- tiles, matching engine, prediction batches, folding ----------------------------------------

def test_tile_for_uses_cache_sized_tiles_on_cpu_only():
    assert CPU.tile_for(net("convnet")) == TILE_CPU
    assert CUDA.tile_for(net("convnet")) is None
    assert Runtime(tile=0).tile_for(net("convnet")) is None  # 0 = never tile
    assert Runtime(tile=7).tile_for(net("convnet")) == 7
    assert Runtime(device="cuda", tile=7).tile_for(net("convnet")) == 7  # forced


@pytest.mark.parametrize("runtime", [CPU, CUDA, Runtime(tile=7), Runtime(tile=16), Runtime(tile=0)],
                         ids=["auto-cpu", "auto-cuda", "tile7", "tile16", "tile0"])
def test_batchnorm_networks_are_never_tiled(runtime):
    """BatchNorm in train mode mixes a batch: tiling it would change the numbers, which no runtime may."""
    assert runtime.tile_for(net("convnet_bn")) is None
    assert runtime.tile_for(build_network("resnet18bn", 1, 10, 28)) is None


def test_matching_mode_follows_the_device_unless_set():
    assert CPU.matching_mode() == "tiled"
    assert CUDA.matching_mode() == "batched"
    for mode in ("batched", "tiled", "loop"):
        assert Runtime(matching=mode).matching_mode() == mode
        assert Runtime(device="cuda", matching=mode).matching_mode() == mode


def test_prediction_batch_and_folding_defaults():
    assert CPU.predict_batch_size() == PREDICT_BATCH_CPU == 32
    assert CUDA.predict_batch_size() == PREDICT_BATCH_CUDA == 1024
    assert Runtime(predict_batch=100).predict_batch_size() == 100
    assert not CPU.fold_repeats() and CUDA.fold_repeats()
    assert Runtime(fold=True).fold_repeats() and not Runtime(device="cuda", fold=False).fold_repeats()
    assert not CPU.memory_bounded and CPU.matching_tile == 16


def test_default_runtime_is_the_cpu_default():
    assert DEFAULT_RUNTIME == Runtime() and DEFAULT_RUNTIME.on_cpu and not CUDA.on_cpu
    assert DEFAULT_RUNTIME.torch_device == torch.device("cpu")


def test_runtime_is_a_strict_frozen_config():
    with pytest.raises(ValidationError):
        Runtime(matching="fast")
    with pytest.raises(ValidationError):
        Runtime(tile=-1)
    with pytest.raises(ValidationError):
        Runtime(predict_batch=0)
    with pytest.raises(ValidationError):
        Runtime(tiles=16)  # unknown field
    with pytest.raises(ValidationError):
        CPU.device = "cuda"  # frozen
    again = Runtime(**Runtime(device="cuda", tile=8, compile=False).to_dict())
    assert again == Runtime(device="cuda", tile=8, compile=False)


# --- the engines the runtime picks --------------------------------------------------------------

def test_gradient_matcher_from_runtime_picks_tiled_on_cpu_batched_on_cuda():
    short = dict(outer_steps=2, num_classes=10, batch_real=16)
    long = dict(outer_steps=1000, num_classes=10, batch_real=256)
    m = GradientMatcher.from_runtime(CPU, **short)
    assert m.mode == "tiled" and m.tile == 16 and not m.compiled
    assert GradientMatcher.from_runtime(CPU, **long).compiled  # long CPU runs compile the real side
    cuda = GradientMatcher.from_runtime(CUDA, **long)  # no GPU needed to construct it
    assert cuda.mode == "batched" and not cuda.compiled
    assert not GradientMatcher.from_runtime(Runtime(compile=False), **long).compiled
    loop = GradientMatcher.from_runtime(Runtime(matching="loop"), **long)
    assert loop.mode == "loop" and not loop.compiled  # only the tiled real side is compiled
    assert GradientMatcher.from_runtime(Runtime(matching_tile=5), **short).tile == 5


def test_gradient_matcher_compiles_from_the_threshold_in_tile_calls():
    # calls = outer steps x classes x ceil(batch_real / matching_tile): here 10 x ceil(20 / 16) = 20 per step
    steps = COMPILE_MIN_CALLS // 20
    assert GradientMatcher.from_runtime(CPU, steps, 10, 20).compiled
    assert not GradientMatcher.from_runtime(CPU, steps - 1, 10, 20).compiled
    # a larger matching tile means fewer calls for the same run
    assert not GradientMatcher.from_runtime(Runtime(matching_tile=20), steps, 10, 20).compiled


def test_real_embedder_from_runtime_compiles_only_long_cpu_runs():
    # calls = iterations x ceil(images / 32)
    assert RealEmbedder.from_runtime(CPU, COMPILE_MIN_CALLS // 10, 320).fn.compiled
    assert not RealEmbedder.from_runtime(CPU, COMPILE_MIN_CALLS // 10 - 1, 320).fn.compiled
    assert not RealEmbedder.from_runtime(CUDA, 10**6, 320).fn.compiled
    assert RealEmbedder.from_runtime(Runtime(compile=True), 1, 32).fn.compiled
