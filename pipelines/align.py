"""Alignment steps: how a frame uses its neighbour's approximated x0 during the sweep.

An alignment has two hooks, both optional:

* ``model_kwargs(nb, t)``: extra inputs for the model call *before* evaluation (StableVSR's trained
  temporal conditioning module plugs in here);
* ``fuse(x0, nb, t)``: a new x0 *after* evaluation, handed back to the unmodified scheduler step
  through the model output it implies (training-free fusion plugs in here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .flow import warp
from .timing import NullTimer

WeightSchedule = Literal["constant", "linear"]


@dataclass
class Neighbours:
    """The neighbours of one batch of frames, all tensors batched like the frames (B, ...).

    ``x0`` is each neighbour's current approximated x0 in sample space, ``flow`` maps a pixel of the
    frame to the neighbour (so ``warp(x0, flow)`` brings the neighbour onto the frame) and ``mask``
    is 1 where that warp is trustworthy (0 everywhere when a frame has no neighbour).
    """

    frames: torch.Tensor  # (B,) long
    index: torch.Tensor  # (B,) long, -1 where absent
    present: torch.Tensor  # (B,) bool
    x0: torch.Tensor  # (B, C, h, w)
    flow: torch.Tensor  # (B, 2, h, w)
    mask: torch.Tensor  # (B, 1, h, w)

    @classmethod
    def absent(cls, frames: torch.Tensor) -> "Neighbours":
        """Frames (B,) sampled without neighbours (x0, flow and mask are None)."""
        return cls(frames, torch.full_like(frames, -1), torch.zeros_like(frames, dtype=torch.bool), None, None, None)


class Alignment:
    """``none``: independent frame-wise sampling, the baseline."""

    name = "none"
    uses_neighbours = False
    # True while the model's inputs depend on the neighbours (the TCM's condition). False means a
    # frame's model output does not depend on the sweep, so the sampler may evaluate it ahead of the
    # frame's turn, batched with the frames that come next.
    conditions_model = False

    def model_kwargs(self, nb: Neighbours | None, t) -> dict:
        return {}

    def fuse(self, x0: torch.Tensor, nb: Neighbours | None, t) -> torch.Tensor:
        return x0


class Fusion(Alignment):
    """Training-free fusion of x0 estimates.

        x0' = x0 + w(t) * M * (W(x0_n) - x0)

    where ``W(x0_n)`` is the neighbour's x0 warped onto this frame, ``M`` the validity mask and
    ``w(t) = weight`` (``constant``) or ``weight * t / T`` (``linear``: strong while x0 is a blurry
    guess, fading out as the details settle). For residual models (x0 = (frame - base) / s) the
    default ``space="frame"`` warps whole frames: ``W(x0_n + base_n / s) - base_i / s``.
    """

    name = "fusion"
    uses_neighbours = True

    def __init__(self, weight: float = 0.5, schedule: WeightSchedule = "constant",
                 num_train_timesteps: int = 1000, space: Literal["frame", "sample"] = "frame"):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"fusion weight must be in [0, 1], not {weight}")
        if schedule not in ("constant", "linear"):
            raise ValueError(f"fusion weight schedule must be constant or linear, not {schedule!r}")
        if space not in ("frame", "sample"):
            raise ValueError(f"fusion space must be frame or sample, not {space!r}")
        self.weight, self.schedule, self.T, self.space = weight, schedule, num_train_timesteps, space
        self.offset = None

    def bind(self, pipe, frames: torch.Tensor | None = None, **_) -> None:
        """Called by the pipeline once per run with the clip's input ``frames``. Residual models sample
        ``x = (frame - base) / s``; fusing in ``frame`` space warps the whole neighbour frame, base
        included, so the base's own inconsistency is aligned too."""
        if self.space == "frame" and pipe.kind == "residual_sr" and frames is not None:
            self.offset = lambda idx: pipe.sample_offset(frames, idx)  # noqa: E731
        else:
            self.offset = None

    def weight_at(self, t) -> float:
        return self.weight * (float(t) / self.T if self.schedule == "linear" else 1.0)

    def fuse(self, x0, nb, t):
        if nb is None or not bool(nb.present.any()):
            return x0
        w = self.weight_at(t)
        if self.offset is None:
            warped = warp(nb.x0, nb.flow)
        else:  # x0 + base / s is the frame in sample units; align whole frames, keep the residual form
            src = torch.where(nb.present, nb.index, nb.frames)
            warped = warp(nb.x0 + self.offset(src).to(x0), nb.flow) - self.offset(nb.frames).to(x0)
        return x0 + (w * nb.mask.to(x0.dtype)) * (warped - x0)


def decode_latents(vae, latents: torch.Tensor, decoder=None, batch: int = 0) -> torch.Tensor:
    """``decoder.decode(latents / s).sample``, s the VAE's scaling factor (``decoder``: the VAE, or the TCM's
    preview decoder), in calls of at most ``batch`` frames (0: one call): the decode batch the job's memory
    check allows for, kept by the VAE calls during sampling (the TCM's conditions, decoded-space fusion)."""
    dec = decoder or vae
    n = batch or len(latents)
    return torch.cat([dec.decode(latents[a:a + n].to(dec.dtype) / vae.config.scaling_factor).sample
                      for a in range(0, len(latents), n)])


class DecodedFusion(Fusion):
    """Fusion of the *decoded* x0 estimates, for latent models (``alignment.space: decoded``): the same
    blend in RGB at the output size, carried back to the latents as a change of their encoding,

        X = D(x0 / s),   X_n = D(x0_n / s)
        X' = X + w(t) * M * (W(X_n) - X)
        x0' = x0 + s * (E(X') - E(X))

    with D the VAE's decoder, E the mean of its encoder, s its scaling factor, W the warp with the flow at
    the output size and M its validity mask. Where nothing is fused X' = X and x0 is returned unchanged:
    the encode-decode round trip's own error cancels in the difference. It costs two decodes and two
    encodes per frame and step, where latent fusion (``Fusion`` on the latents) costs one warp.
    """

    def __init__(self, weight: float = 0.5, schedule: WeightSchedule = "constant", num_train_timesteps: int = 1000):
        super().__init__(weight, schedule, num_train_timesteps, "frame")
        self.space = "decoded"
        self.pipe = self.flows = self.size = None
        self.timer, self.decode_batch = NullTimer(), 0

    def bind(self, pipe, flows=None, size=None, timer=None, decode_batch: int = 0, **_) -> None:
        if getattr(pipe, "vae", None) is None:
            raise ValueError("decoded-space fusion needs a latent model (one with a VAE)")
        self.pipe, self.flows, self.size, self.offset = pipe, flows, tuple(size), None
        self.timer = timer or NullTimer()
        self.decode_batch = decode_batch  # the most frames per VAE call (0: no limit)

    def fuse(self, x0, nb, t):
        if nb is None or not bool(nb.present.any()):
            return x0
        keep, vae = nb.present, self.pipe.vae
        s, n = vae.config.scaling_factor, int(keep.sum())
        with self.timer("vae"):
            rgb = decode_latents(vae, torch.cat([x0[keep], nb.x0[keep]]), batch=self.decode_batch).float()
        own, other = rgb[:n], rgb[n:]
        flow, mask = self.flows.pick(nb.frames[keep], nb.index[keep], self.size)
        with self.timer("align"):
            fused = own + (self.weight_at(t) * mask.to(own)) * (warp(other, flow.to(own)) - own)
        with self.timer("vae"):
            both, k = torch.cat([fused, own]), self.decode_batch or 2 * n
            z = torch.cat([vae.encode(both[a:a + k].to(vae.dtype)).latent_dist.mean.float()
                           for a in range(0, 2 * n, k)])
        out = x0.clone()
        out[keep] = x0[keep] + (s * (z[:n] - z[n:])).to(x0)
        return out
