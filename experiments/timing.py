"""Timing and memory of one measurement, with the standard library alone.

Shared by the JAX rows (``experiments/benchmark.py``) and the PyTorch rows
(``experiments/torch_peer.py``), whose processes must not import JAX: its modules
would count in the peak memory of a row that never uses them.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports KiB, macOS bytes).

    Measured per child process, so it is the peak of exactly one configuration:
    parameters, optimizer state, activations, workspace and the runtime itself.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def time_steps(step, steps: int, warmup: int) -> dict:
    """Runs ``step`` (which must block until its results are ready) ``warmup`` times
    untimed, then ``steps`` times timed; returns the median wall and CPU seconds.

    The median ignores a step slowed by another process; CPU seconds (all threads of
    this process) change much less than wall time when the machine is shared.
    """
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "step_times_s": [round(t, 4) for t in wall]}
