"""Per-frame state kept in files, for one-pass sampling of clips longer than memory should hold.

:class:`FileTensor` is an ``(N, ...)`` tensor whose rows live in a file and are read and written
with ``pread``/``pwrite`` (no memory mapping: mapped pages would count as resident memory once
touched, so the process's peak would still grow with N). :class:`SteppedState` double-buffers the
samples of a denoising loop: step s reads every frame from one file and writes the next state to
the other, so a run killed mid-step still has the complete state of the last finished step.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch

from .video_writer import WriteError

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
_BITS = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: its bits are stored


class FileTensor:
    """``(N, *row)`` float tensor stored row-major in ``path`` (created zero-filled unless it exists; with
    ``must_exist``, a file of exactly that size must be there: the saved state a run resumes from)."""

    def __init__(self, path, shape, dtype: torch.dtype = torch.float32, must_exist: bool = False):
        if _NP.get(dtype) is None:
            raise ValueError(f"FileTensor holds float32, float16 or bfloat16, not {dtype}")
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), dtype
        self.row = tuple(self.shape[1:])
        self._np = _NP[dtype]
        self.row_bytes = int(np.prod(self.row, dtype=np.int64)) * np.dtype(self._np).itemsize
        size = self.row_bytes * self.shape[0]
        if must_exist:
            found = self.path.stat().st_size if self.path.is_file() else None
            if found != size:
                raise ValueError(f"{self.path} is {'missing' if found is None else f'{found} bytes'} where the saved "
                                 f"state has {size}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as open() would
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)

    device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def _rows(self, idx) -> list[int]:
        if isinstance(idx, slice):
            return list(range(*idx.indices(self.shape[0])))
        if torch.is_tensor(idx):
            idx = idx.reshape(-1).tolist()
        if isinstance(idx, int):
            idx = [idx]
        rows = [int(i) + self.shape[0] if int(i) < 0 else int(i) for i in idx]
        if any(not 0 <= i < self.shape[0] for i in rows):
            raise IndexError(f"rows {rows} outside 0..{self.shape[0] - 1}")
        return rows

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self._rows(idx)
        out = np.empty((len(rows), *self.row), self._np)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for k, i in enumerate(rows):
            got = os.preadv(self.fd, [flat[k]], i * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"{self.path}: short read of row {i}")
        t = torch.from_numpy(out).view(self.dtype)
        return t[0] if isinstance(idx, int) else t

    def __setitem__(self, idx, value) -> None:
        rows = self._rows(idx)
        v = torch.as_tensor(value).detach().to("cpu", self.dtype).reshape(len(rows), *self.row)
        data = np.ascontiguousarray(v.view(_BITS.get(self.dtype, self.dtype)).numpy())
        for k, i in enumerate(rows):
            row, done = data[k].tobytes(), 0
            try:
                while done < self.row_bytes:  # a short write is retried: a full disk then says so
                    wrote = os.pwrite(self.fd, row[done:], i * self.row_bytes + done)
                    if wrote == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += wrote
            except OSError as e:
                raise WriteError(f"{self.path}: writing row {i} failed ({e.strerror or e})") from e

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class SteppedState:
    """The samples of a denoising loop in two files: during step s, reads come from ``x{s % 2}`` and
    writes go to ``x{(s + 1) % 2}``; :meth:`begin_step` switches. Indexing looks like a tensor's."""

    def __init__(self, folder, shape, dtype: torch.dtype = torch.float32, resume: bool = False):
        folder = Path(folder)
        self.bufs = [FileTensor(folder / f"x{i}.bin", shape, dtype, must_exist=resume) for i in (0, 1)]
        self.shape, self.dtype, self.step = tuple(shape), dtype, 0

    device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def begin_step(self, step: int) -> None:
        self.step = step

    def __getitem__(self, idx) -> torch.Tensor:
        return self.bufs[self.step % 2][idx]

    def __setitem__(self, idx, value) -> None:
        self.bufs[(self.step + 1) % 2][idx] = value

    def init(self, idx, value) -> None:
        """Write the starting samples (read by step 0)."""
        self.bufs[0][idx] = value

    def final(self) -> FileTensor:
        """The samples after the last finished step (call ``begin_step(num_steps)`` first)."""
        return self.bufs[self.step % 2]

    def flush(self) -> None:
        for b in self.bufs:
            b.flush()
