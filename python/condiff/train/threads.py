"""The intra-op thread count for CPU training on a machine that other work shares, chosen by measurement.

With more OpenMP threads than free cores, every op waits for its slowest thread, and a thread the kernel
has descheduled for another process stalls the op for a whole time slice: on a 2-core machine with one
competing CPU-bound process, 2 threads can be several times slower per step than 1. The load average cannot
decide this reliably: it is a 1-minute moving average, so right after another job ends it still counts it
(and a job that starts later is not seen at all). `ThreadTuner` therefore times real training steps at each
candidate thread count, keeps the fastest, and measures again every `every` steps as the load changes. The
probe steps are ordinary training steps (nothing is wasted but the time of the slower candidates).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_threads(cores: int, load_1min: float) -> int:
    """A first guess from the load: cores minus the 1-minute load average, rounded, in [1, cores]."""
    return max(1, min(cores, int(cores - load_1min + 0.5)))


def candidate_threads(cores: int, load_1min: float) -> list[int]:
    """The thread counts worth timing: 1, the load-based guess and all cores (ascending, distinct)."""
    return sorted({1, free_threads(cores, load_1min), cores})


class ThreadTuner:
    """Choose torch's intra-op thread count from measured step times.

    Call `before_step()` before and `after_step(seconds)` after each training step (or wrap the step
    function with `wrap`). The first `warmup` steps run on `candidates[0]` untimed (allocator and cache
    warm-up); then each candidate runs `probe_steps` steps (the first after a switch is dropped) and the one
    with the lowest median step time is kept for `every` steps, after which the candidates are timed again.
    `record()` is the JSON-able history: every probe's median s/step per candidate and the choice."""

    def __init__(self, candidates: Sequence[int], *, probe_steps: int = 6, every: int = 300, warmup: int = 3,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        if not candidates or any(int(c) < 1 for c in candidates):
            raise ValueError(f"ThreadTuner: candidates must be thread counts >= 1, got {list(candidates)!r}")
        if probe_steps < 2 or every < 1 or warmup < 0:
            raise ValueError(f"ThreadTuner: need probe_steps >= 2, every >= 1, warmup >= 0 "
                             f"(got {probe_steps}, {every}, {warmup})")
        self.candidates = [int(c) for c in candidates]
        self.probe_steps, self.every, self.warmup = probe_steps, every, warmup
        self._set = set_threads
        self.step = 0
        self.threads = self._applied = self.candidates[0]
        self._set(self.threads)
        self._schedule_probe(start=warmup)
        self.probes: list[dict] = []

    def _schedule_probe(self, start: int) -> None:
        """Probe every candidate from step `start`: candidate k owns steps [start + k * probe_steps, ...)."""
        self._probe_start = start
        self._times: dict[int, list[float]] = {c: [] for c in self.candidates}

    def _probing(self) -> int | None:
        """The candidate this step probes, or None outside a probe."""
        k = (self.step - self._probe_start) // self.probe_steps
        return self.candidates[k] if self.step >= self._probe_start and k < len(self.candidates) else None

    def before_step(self) -> None:
        probe = self._probing()
        want = probe if probe is not None else self.threads
        if want != self._applied:
            self._set(want)
            self._applied = want

    def after_step(self, seconds: float) -> None:
        probe = self._probing()
        if probe is not None and (self.step - self._probe_start) % self.probe_steps:  # drop the first after a switch
            self._times[probe].append(float(seconds))
        self.step += 1
        if probe is not None and self._probing() is None:  # the probe's last step: decide
            medians = {c: statistics.median(t) for c, t in self._times.items()}
            self.threads = min(medians, key=lambda c: (medians[c], c))
            if self.threads != self._applied:
                self._set(self.threads)
                self._applied = self.threads
            self.probes.append({"step": self.step, "sec_per_step": {str(c): round(m, 4) for c, m in medians.items()},
                                "chose": self.threads})
            self._schedule_probe(start=self.step + self.every)

    def wrap(self, step_fn: Callable[[], dict]) -> Callable[[], dict]:
        """`step_fn` timed and run at the tuner's thread count."""

        def timed_step() -> dict:
            self.before_step()
            t0 = time.perf_counter()
            out = step_fn()
            self.after_step(time.perf_counter() - t0)
            return out

        return timed_step

    def record(self) -> dict:
        return {"rule": "measured: median s/step of each candidate, fastest kept, re-measured every "
                        f"{self.every} steps", "candidates": self.candidates, "threads": self.threads,
                "probes": self.probes}
