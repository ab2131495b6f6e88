"""StableVSR's trained Temporal Conditioning Module (a ControlNet) as an alignment mode.

For every frame except the first of each sweep, the neighbour's approximated x0 (from this sweep)
is decoded to RGB, warped onto the frame with the flow of the bicubic-upscaled input frames, and
fed to the ControlNet as its condition. The first frame of a sweep runs without the TCM (the
paper's semantics). Options the original lacks, all off by default:

* ``masked``: zero the warped condition where the forward-backward check marks occlusions;
* ``fusion``: also fuse the x0 estimates (training-free, see :class:`pipelines.align.Fusion`).

``warp_mode`` picks the warp of the condition: ``exact`` (:func:`pipelines.flow.warp`) or
``stablevsr`` (:func:`pipelines.flow.warp_stablevsr`, the half-pixel-stretched, zero-padded warp the
published TCM was trained on; ``configs/stablevsr.yaml`` turns it on).
"""
from __future__ import annotations

import torch

from .align import Alignment, Fusion, Neighbours, decode_latents
from .flow import WARPS, ClipFlows
from .timing import NullTimer


class TCMAlignment(Alignment):
    name = "tcm"
    uses_neighbours = True

    def __init__(self, scale: float = 1.0, masked: bool = False, fusion: Fusion | None = None,
                 warp_mode: str = "exact", start: float = 0.0, end: float = 1.0, decoder: str = "vae"):
        if warp_mode not in WARPS:
            raise ValueError(f"TCM warp mode must be one of {', '.join(WARPS)}, not {warp_mode!r}")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= tcm start < end <= 1, got start={start}, end={end}")
        self.scale, self.masked, self.fusion, self.warp = scale, masked, fusion, WARPS[warp_mode]
        self.start, self.end, self.active = start, end, True
        if decoder not in ("vae", "preview"):
            raise ValueError(f"TCM decoder must be vae or preview, not {decoder!r}")
        self.decoder = decoder
        self.pipe = self.flows = None
        self.timer, self.decode_batch = NullTimer(), 0
        self.decoded_frames: list[int] = []  # every frame decoded in the last run, in order (for tests)

    def bind(self, pipe, flows: ClipFlows | None, size: tuple[int, int], timer=None, decode_batch: int = 0,
             **_) -> None:
        """Called by the pipeline once per run: the VAE, the clip's flows (None for a one-frame clip;
        left where they are, only each batch's flows go to the device), the pixel size the decoded
        x0 has (flows are resized to it per batch) and the most frames per decoder call (0: no limit)."""
        if pipe.controlnet is None or pipe.vae is None:
            raise ValueError("alignment.mode=tcm needs a latent model with a controlnet/ folder (StableVSR layout)")
        if self.decoder == "preview" and getattr(pipe, "preview", None) is None:
            raise ValueError("alignment.tcm_decoder=preview needs a model with a preview_decoder/ folder "
                             "(training/train_preview.py)")
        self.pipe, self.flows, self.size, self.decode_batch = pipe, flows, tuple(size), decode_batch
        self.timer = timer or NullTimer()
        self.decoded_frames = []
        if self.fusion is not None:
            self.fusion.bind(pipe, flows=flows, size=size, timer=timer, decode_batch=decode_batch, **_)

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Approximated x0 latents -> RGB: ``decoder.decode(x0 / scaling_factor)`` with the VAE's decoder or
        the preview decoder (trained to mimic it on the same unscaled latents)."""
        dec = self.pipe.vae if self.decoder == "vae" else self.pipe.preview
        with self.timer("vae" if self.decoder == "vae" else "preview"):
            return decode_latents(self.pipe.vae, x0, dec, self.decode_batch)

    def uses_step(self, step: int, num_steps: int) -> bool:
        """StableVSR's ControlNet guidance window: step i of N uses the TCM unless i / N < start or
        (i + 1) / N > end."""
        return not (step / num_steps < self.start or (step + 1) / num_steps > self.end)

    def begin_step(self, step: int, num_steps: int) -> None:
        """Steps outside the guidance window (``uses_step``) decode nothing."""
        self.active = self.uses_step(step, num_steps)

    @property
    def conditions_model(self) -> bool:
        """The ControlNet's condition is the neighbour's x0 from this sweep, on the steps it runs."""
        return self.active

    def model_kwargs(self, nb: Neighbours | None, t) -> dict:
        if nb is None or not bool(nb.present.any()) or not self.active:
            return {}  # first frame of the sweep, or a step outside [start, end]: no temporal conditioning
        keep = nb.present.nonzero().flatten()
        rgb = self._decode(nb.x0[keep])  # each neighbour x0 is decoded exactly once
        self.decoded_frames += nb.index[keep].tolist()
        flow, mask = self.flows.pick(nb.frames[keep], nb.index[keep], self.size)
        warped = self.warp(rgb.float(), flow.to(rgb.device))
        if self.masked:
            warped = warped * mask.to(rgb.device)
        control = warped.new_zeros((len(nb.frames), *warped.shape[1:]))
        control[keep] = warped
        return dict(control=control, control_scale=nb.present.float() * self.scale)

    def fuse(self, x0, nb, t):
        return self.fusion.fuse(x0, nb, t) if self.fusion is not None else x0
