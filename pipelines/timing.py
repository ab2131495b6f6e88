"""Per-stage wall-clock timers (synchronising CUDA so asynchronous kernels are charged correctly)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device: torch.device | str | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        # synchronise only when timing an accelerator whose kernels run asynchronously
        self.sync = device is not None and torch.device(device).type != "cpu" and torch.cuda.is_available()

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1

    def report(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class NullTimer(StageTimer):
    """A timer that measures nothing (no CUDA syncs in the hot loop)."""

    @contextmanager
    def __call__(self, stage: str):
        yield
