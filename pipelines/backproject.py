"""Back-projection: the output made to agree with its low-res input.

A super-resolved frame ``x`` explains its input ``y`` when degrading it gives ``y`` back,
``D(x) = y``, with ``D`` the project's degradation (antialiased bicubic downscale,
:mod:`pipelines.degradation`). One step of iterative back-projection (Irani and Peleg, 1991) adds the
upscaled residual:

    x' = x + U(y - D(x))            U: plain bicubic upscale

It corrects what the input determines (colour, shading, where edges lie), which a diffusion model
samples loosely, and leaves the detail that ``D`` removes to the model.

For video, the correction ``c_i = U(y_i - D(x_i))`` of frame ``i`` is averaged with its neighbours'
corrections warped onto it, where the occlusion check trusts them (``m`` in {0, 1}):

    c_i' = (c_i + m_p W(c_{i-1}) + m_n W(c_{i+1})) / (1 + m_p + m_n)

because the low-res frames alias differently from frame to frame, and a per-frame correction would add
that flicker to a consistent output. Without flows (frames sampled independently) ``c_i' = c_i``.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .degradation import downscale, upscale
from .flow import ClipFlows, warp


def correction(x: torch.Tensor, y: torch.Tensor, scale: int) -> torch.Tensor:
    """``c = U(y - D(x))`` for outputs ``x`` (N, 3, H, W) and their inputs ``y`` (N, 3, H/s, W/s)."""
    if tuple(x.shape[-2:]) != (y.shape[-2] * scale, y.shape[-1] * scale):
        raise ValueError(f"output {tuple(x.shape[-2:])} is not x{scale} the input {tuple(y.shape[-2:])}")
    return upscale(y.to(x) - downscale(x, scale), scale)


def average_along_flow(c: torch.Tensor, first: int, flows: ClipFlows, before: torch.Tensor | None,
                       after: torch.Tensor | None) -> torch.Tensor:
    """``c_i' = (c_i + m_p W(c_{i-1}) + m_n W(c_{i+1})) / (1 + m_p + m_n)`` for the corrections ``c``
    (k, 3, H, W) of frames ``first .. first + k - 1``.

    ``before`` / ``after``: the corrections (1, 3, H, W) of the frames just before and after the run
    (None at the clip's ends, where the masks are zero anyway). ``flows`` are the clip's, at any size.
    """
    k = len(c)
    frames = torch.arange(first, first + k)
    prev = torch.cat([c[:1] if before is None else before.to(c), c[:-1]])
    nxt = torch.cat([c[1:], c[-1:] if after is None else after.to(c)])
    size = tuple(c.shape[-2:])
    num, den = c.clone(), torch.ones_like(c[:, :1])
    for index, src in ((frames - 1, prev), (frames + 1, nxt)):
        # pick compares index with frames only: at a clip end it returns the zero mask of the missing side
        flow, mask = flows.pick(frames, index, size)
        mask = mask.to(c)
        num += mask * warp(src, flow.to(c))
        den += mask
    return num / den


def back_project(chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor]], scale: int,
                 flows: ClipFlows | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Back-project a clip given as consecutive chunks ``(first frame, x (k, 3, H, W), y (k, 3, h, w))``
    in order; yields ``(first frame, x' (k, 3, H, W))`` with ``x' = x + c'`` (module docstring),
    clamped to [-1, 1]. With ``flows`` each chunk waits for the next one's first correction, so only
    two chunks are ever held."""
    pending, before = None, None
    for first, x, y in chunks:
        c = correction(x, y, scale)
        if pending is not None:
            yield _finish(*pending, before, c[:1], flows)
            before = pending[2][-1:]
        pending = (first, x, c)
    if pending is not None:
        yield _finish(*pending, before, None, flows)


def _finish(first, x, c, before, after, flows):
    if flows is not None and len(flows) > 1:
        c = average_along_flow(c, first, flows, before, after)
    return first, (x + c).clamp(-1, 1)
