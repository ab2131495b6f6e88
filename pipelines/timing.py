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
        self.cuda = torch.device(device).type == "cuda" if device is not None else False

    def _sync(self) -> None:
        if self.cuda:
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
