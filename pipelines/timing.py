"""Per-stage wall-clock timers (synchronising the accelerator so asynchronous kernels are charged correctly)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device: torch.device | str | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [stage, start of its current slice]
        # synchronise only when timing an accelerator whose kernels run asynchronously, and then
        # that device (not whichever CUDA device happens to be current)
        self.device = None if device is None else torch.device(device)
        self.sync = self.device is not None and self.device.type != "cpu" and torch.accelerator.is_available()

    def _sync(self) -> None:
        if self.sync:
            torch.accelerator.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        """Time a stage. Nested stages are exclusive: the outer stage pauses while the inner runs, so
        the stages add up to the wall time (e.g. a VAE decode inside alignment counts as "vae")."""
        self._sync()
        now = time.perf_counter()
        if self._stack:  # pause the enclosing stage
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append([stage, now])
        try:
            yield
        finally:
            self._sync()
            now = time.perf_counter()
            name, since = self._stack.pop()
            self.seconds[name] += now - since
            self.calls[name] += 1
            if self._stack:  # resume the enclosing stage
                self._stack[-1][1] = now

    def report(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class NullTimer(StageTimer):
    """A timer that measures nothing (no CUDA syncs in the hot loop)."""

    @contextmanager
    def __call__(self, stage: str):
        yield
