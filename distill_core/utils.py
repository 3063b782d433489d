"""Runtime helper shared by the stage entry points: torch threads from a task's CPUs."""

from __future__ import annotations

import os

import torch


def set_threads(num_cpus: float | int | None) -> int:
    """Match torch's intra-op threads to the CPUs a task was given.

    Oversubscription is the main CPU slowdown on small machines: two processes
    with two threads each on two cores run several times slower than one.
    """
    n = max(1, int(num_cpus or os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n
