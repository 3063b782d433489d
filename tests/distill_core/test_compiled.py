"""The optional torch.compile lever: when it is used, and its eager fallback."""

from __future__ import annotations

import torch

from distill_core.compiled import MaybeCompiled, compile_wanted


def test_compile_wanted_only_for_long_cpu_runs_unless_forced():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("auto", cpu, 1000, 1000)
    assert not compile_wanted("auto", cpu, 999, 1000)
    assert not compile_wanted(None, cuda, 10**6, 1000)
    assert compile_wanted(True, cuda, 1, 1000)
    assert not compile_wanted(False, cpu, 10**6, 1000)


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
