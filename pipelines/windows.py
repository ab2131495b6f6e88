"""Chunked sampling of long clips: overlapping windows, optionally anchored on the previous window's result.

Window k covers frames ``[start_k, start_k + window)`` and shares its first ``overlap`` frames with
window k-1. With ``anchor_weight`` a > 0, while window k samples, the x0 of each overlap frame is
pulled towards the *finished* sample of window k-1 for that frame,

    x0' = x0 + a * (x_prev - x0),

so the fusion sweep carries the finished content into the new frames. After sampling, the
overlap frames are cross-faded linearly from window k-1's output to window k's. The job's default is
a = 0: measured on real clips, a = 0.8 made the overlap a copy of window k-1 and put the whole switch
on one pair (README, "Window seams"); the cross-fade alone spreads it over the overlap.

Trade-off: memory and the flow computation are bounded by the window, not the clip, and a killed
run loses at most one window; the price is ``overlap`` extra frame evaluations per window and a
seam where the two windows' details meet (measured with the no-reference warp error at seams
against the interior, see tests/test_windows.py and benchmarks/long_clip.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .align import Alignment, Neighbours
from .video_writer import WriteError, ordinary_mode


def plan_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end)] covering all frames; consecutive windows share ``overlap`` frames."""
    if window < 2 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 2 and 0 <= overlap < window, got window={window} overlap={overlap}")
    if num_frames <= window:
        return [(0, num_frames)]
    spans, start = [], 0
    while True:
        end = min(start + window, num_frames)
        spans.append((start, end))
        if end == num_frames:
            return spans
        start = end - overlap


class Anchored(Alignment):
    """Wrap an alignment: after it, pull the x0 of anchor frames towards fixed targets."""

    def __init__(self, base: Alignment, targets: dict[int, torch.Tensor], weight: float):
        self.base, self.targets, self.weight = base, targets, weight
        self.name = base.name
        # anchoring itself needs no neighbours, so alignment none keeps its batched, independent sweep
        self.uses_neighbours = base.uses_neighbours

    def bind(self, *args, **kwargs):
        if hasattr(self.base, "bind"):
            self.base.bind(*args, **kwargs)

    def begin_step(self, step: int, num_steps: int) -> None:
        if hasattr(self.base, "begin_step"):
            self.base.begin_step(step, num_steps)

    @property
    def conditions_model(self) -> bool:
        return self.base.uses_neighbours and self.base.conditions_model

    def model_kwargs(self, nb, t):
        return self.base.model_kwargs(nb, t) if self.base.uses_neighbours else {}

    def fuse(self, x0: torch.Tensor, nb: Neighbours | None, t) -> torch.Tensor:
        x0 = self.base.fuse(x0, nb, t) if self.base.uses_neighbours else x0
        if nb is None:
            return x0
        hits = [(k, self.targets[f]) for k, f in enumerate(nb.frames.tolist()) if f in self.targets]
        if not hits:
            return x0
        x0 = x0.clone()
        for k, target in hits:
            x0[k] += self.weight * (target.to(x0) - x0[k])
        return x0


def iter_windows(pipe, num_frames: int, read, *, window: int, overlap: int, anchor_weight: float,
                 make_alignment, options, flow=None, progress=None, timer=None, workdir: Path | None = None,
                 fingerprint: str = "", checkpoint_every: int = 1, seam_log: list | None = None,
                 crop: tuple[int, int] | None = None):
    """Sample a clip window by window and yield ``(first frame index, uint8 frames (n, H, W, 3))`` in
    order, each frame exactly once, as soon as no later window can change it.

    ``read(a, b)`` returns the model's input frames ``[a, b)`` (float ``(n, 3, h, w)`` in [-1, 1]), so
    only one window of input is ever held; ``crop`` = (H, W) crops each output (padding removed).
    ``make_alignment()`` builds a fresh alignment per window. With ``workdir``, each finished window is
    stored (its output frames and the final samples of the overlap) and each running window
    checkpoints its sampling state, so a restarted run continues where it stopped.
    """
    from dataclasses import replace

    from .checkpoint import Checkpointer
    from .sampler import img2img_timesteps

    spans = plan_windows(num_frames, window, overlap)
    steps = len(img2img_timesteps(pipe.scheduler, options.num_inference_steps, options.strength))
    held: torch.Tensor | None = None  # the previous window's output frames of the overlap, not yet yielded
    tail: torch.Tensor | None = None  # the previous window's final samples of the overlap (anchors)
    for k, (a, b) in enumerate(spans):
        done = None if workdir is None else Path(workdir) / f"window{k:04d}.safetensors"
        if done is not None and done.exists():
            out, tail = _finished_window(done, b - a, overlap if k + 1 < len(spans) else 0)
            if progress is not None:  # the window's frame-steps, done in the run that stored it
                progress((b - a) * steps)
        else:
            n_anchor = 0 if k == 0 else a_overlap(spans, k)
            targets = {} if tail is None else {j: tail[j] for j in range(n_anchor)}
            align = Anchored(make_alignment(), targets, anchor_weight) if targets else make_alignment()
            ckpt = None if workdir is None else Checkpointer(Path(workdir) / f"window{k:04d}", fingerprint,
                                                             checkpoint_every)
            keep = overlap if k + 1 < len(spans) else 0
            res = pipe(read(a, b), options=replace(options, frame_offset=options.frame_offset + a), alignment=align,
                       flow=flow, progress=progress, timer=timer, checkpoint=ckpt, output_uint8=True, keep_last=keep)
            out, tail = res.frames, res.samples
            if crop is not None:
                out = out[:, :crop[0], :crop[1]].contiguous()
            if done is not None:
                tensors = {"frames": out.contiguous()}
                if tail is not None:
                    tensors["tail"] = tail.contiguous()
                tmp = done.with_suffix(".tmp")
                try:
                    save_file(tensors, tmp)
                    ordinary_mode(tmp)  # safetensors writes 0600
                except Exception as e:  # safetensors reports a full disk as its own error
                    tmp.unlink(missing_ok=True)
                    raise WriteError(f"{tmp}: saving the finished window failed ({e})") from e
                tmp.replace(done)
        n = a_overlap(spans, k) if k > 0 else 0
        if n > 0:  # cross-fade the overlap from the previous window's frames to this one's
            ramp = torch.arange(1, n + 1, dtype=torch.float32).view(-1, 1, 1, 1) / (n + 1)
            out = out.clone()
            out[:n] = (held.float() * (1 - ramp) + out[:n].float() * ramp).round().to(torch.uint8)
        if seam_log is not None and k > 0:
            seam_log.append(a + n)  # first frame that only the new window made
        nxt = a_overlap(spans, k + 1) if k + 1 < len(spans) else 0
        held = out[len(out) - nxt:] if nxt else None
        yield a, out[:len(out) - nxt]


def _finished_window(path: Path, n: int, n_tail: int):
    """A finished window's stored frames (n, H, W, 3) uint8 and final samples of its last ``n_tail`` frames;
    WorkdirMismatch when the file is damaged or not one this code wrote for this window."""
    from .checkpoint import WorkdirMismatch

    try:
        saved = load_file(path)
        out, tail = saved["frames"], saved.get("tail")
        ok = out.dtype == torch.uint8 and out.dim() == 4 and len(out) == n and out.shape[-1] == 3 and \
            (tail is None if n_tail == 0 else tail is not None and len(tail) == n_tail)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own errors for a damaged file)
        raise WorkdirMismatch(f"work folder {path.parent}: {path.name} is damaged ({type(e).__name__}); delete it "
                              "to sample that window again") from e
    if not ok:
        raise WorkdirMismatch(f"work folder {path.parent}: {path.name} does not hold this window's {n} frames; "
                              "delete it to sample that window again")
    return out, tail


def sample_windowed(pipe, frames: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`iter_windows` over frames held in memory; returns all uint8 frames (F, H, W, 3)."""
    return torch.cat([out for _, out in iter_windows(pipe, len(frames), lambda a, b: frames[a:b], **kwargs)])


def a_overlap(spans, k: int) -> int:
    """Frames window k shares with window k-1."""
    return spans[k - 1][1] - spans[k][0]
