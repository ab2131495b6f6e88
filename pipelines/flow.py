"""Optical flow between neighbouring frames of a clip, backward warping and validity masks.

Conventions shared with the sampler:

- frames are float ``(F, 3, H, W)`` RGB in [-1, 1];
- a flow ``flow_ij`` is ``(2, H, W)`` (channel 0 = dx, 1 = dy, in pixels): pixel p of frame i is
  found at ``p + flow_ij(p)`` in frame j;
- warping frame j onto frame i is backward warping: ``warped(p) = frame_j(p + flow_ij(p))``.

Flows are estimated once per clip (OpenCV DIS or Farneback on grayscale frames, or torchvision
RAFT from a local weights file), optionally at a reduced resolution, and then resized to the size
the caller works at (pixels or latents), with the vectors rescaled to match.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, get_args

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

FlowMethod = Literal["dis", "farneback", "raft"]

_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_RAFT_BATCH = 4  # frame pairs per RAFT forward pass
# Smallest side each method takes at the flow resolution (measured: OpenCV's DIS raises below 8 px
# and crashes the process between 8 and 15 px; RAFT's 4-level correlation pyramid at 1/8 resolution).
MIN_FLOW_SIDE = {"dis": 16, "farneback": 1, "raft": 64}


@dataclass
class FlowConfig:
    """How flows are estimated and checked.

    The forward-backward check (Sundaram, Brox & Keutzer 2010) keeps pixel p when
    ``|f + b~|^2 < fb_alpha1 (|f|^2 + |b~|^2) + fb_alpha2`` with ``f = flow_ij(p)`` and
    ``b~ = flow_ji(p + f)``, measured at the resolution the flow is computed at.
    """

    method: str = "dis"  # one of FlowMethod
    dis_preset: str = "medium"  # ultrafast | fast | medium
    raft_weights: str | None = None  # local torchvision raft_small / raft_large weights file
    scale: float = 1.0  # flow is computed at this fraction of the frame size, 0 < scale <= 1
    fb_alpha1: float = 0.01
    fb_alpha2: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an unknown method or preset, scale outside (0, 1] or RAFT without weights."""
        methods, presets = ", ".join(get_args(FlowMethod)), ", ".join(_DIS_PRESETS)
        if self.method not in get_args(FlowMethod):
            raise ValueError(f"unknown flow method {self.method!r}; expected one of {methods}")
        if self.dis_preset not in _DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {self.dis_preset!r}; expected one of {presets}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"flow scale {self.scale} is out of range; expected 0 < scale <= 1")
        if self.fb_alpha1 < 0 or self.fb_alpha2 < 0:
            raise ValueError(f"fb_alpha1={self.fb_alpha1}, fb_alpha2={self.fb_alpha2}; expected both >= 0")
        if self.method == "raft" and not self.raft_weights:
            raise ValueError(
                "flow method 'raft' needs flow.raft_weights: a local torchvision RAFT weights file"
            )


# ----------------------------------------------------------------------------- warping and masks


def _pixel_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 2, h, w) pixel coordinates (x, y) on the device and dtype of ``like``."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=like.device, dtype=like.dtype),
        torch.arange(w, device=like.device, dtype=like.dtype),
        indexing="ij",
    )
    return torch.stack((xs, ys))[None]


def warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Backward-warp ``x`` (N, C, H, W) with ``flow`` (N, 2, H, W): ``out(p) = x(p + flow(p))``.

    Bilinear sampling; pixel centres are the integer coordinates 0..W-1 and 0..H-1, which
    ``grid_sample(align_corners=True)`` maps to -1..1. Samples outside the image follow
    ``padding_mode`` ("zeros", "border" or "reflection"). Returns x's device and dtype.
    """
    if x.ndim != 4 or flow.shape != (x.shape[0], 2, *x.shape[-2:]):
        shapes = f"x {tuple(x.shape)} and flow {tuple(flow.shape)}"
        raise ValueError(f"warp got {shapes}; expected (N, C, H, W) and (N, 2, H, W)")
    h, w = x.shape[-2:]
    dtype = torch.promote_types(x.dtype, torch.float32)  # sample half precision inputs in float32
    flow = flow.to(x.device, dtype)
    target = _pixel_grid(h, w, flow) + flow  # (N, 2, H, W) absolute (x, y) in pixels
    extent = torch.tensor([max(w - 1, 1), max(h - 1, 1)], device=x.device, dtype=dtype)
    grid = rearrange(target, "n c h w -> n h w c") / extent * 2 - 1  # pixel 0 -> -1, last pixel -> 1
    out = F.grid_sample(
        x.to(dtype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
    )
    return out.to(x.dtype)


def warp_stablevsr(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """StableVSR's ``flow_warp`` convention (util/flow_utils.py), which the published TCM was trained on.

    The target ``p + flow(p)`` is normalised by (W-1, H-1) like :func:`warp`, but sampled with
    ``grid_sample(align_corners=False)`` and zero padding, so pixel x is read at
    ``x * W / (W-1) - 1/2``: even a zero flow stretches the image by half a pixel towards the
    bottom-right and darkens the first row and column. x: (N, C, H, W), flow: (N, 2, H, W).
    """
    if x.ndim != 4 or flow.shape != (x.shape[0], 2, *x.shape[-2:]):
        raise ValueError(f"warp_stablevsr got x {tuple(x.shape)} and flow {tuple(flow.shape)}; "
                         "expected (N, C, H, W) and (N, 2, H, W)")
    h, w = x.shape[-2:]
    dtype = torch.promote_types(x.dtype, torch.float32)
    flow = flow.to(x.device, dtype)
    target = _pixel_grid(h, w, flow) + flow
    extent = torch.tensor([max(w - 1, 1), max(h - 1, 1)], device=x.device, dtype=dtype)
    grid = rearrange(target, "n c h w -> n h w c") / extent * 2 - 1
    out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


WARPS = {"exact": warp, "stablevsr": warp_stablevsr}


def check_flow_size(size: tuple[int, int], cfg: "FlowConfig") -> None:
    """Raise ValueError when ``size`` = (h, w) at ``cfg.scale`` is below what ``cfg.method`` can take."""
    h, w = max(1, round(size[0] * cfg.scale)), max(1, round(size[1] * cfg.scale))
    need = MIN_FLOW_SIDE[cfg.method]
    if min(h, w) < need:
        raise ValueError(f"frames of {size[1]}x{size[0]} give {w}x{h} at flow.scale={cfg.scale:g}, below the "
                         f"{need} px that flow.method={cfg.method} needs; use larger frames, a larger flow.scale "
                         "or flow.method=farneback")


def consistency_mask(
    flow_ij: torch.Tensor, flow_ji: torch.Tensor, alpha1: float, alpha2: float
) -> torch.Tensor:
    """(N, 2, H, W) flows i->j and j->i -> (N, 1, H, W) float mask in {0, 1} for frame i.

    With ``f = flow_ij(p)`` and ``b~ = flow_ji(p + f)`` (flow_ji backward-warped by flow_ij), p is 1 when
    ``|f + b~|^2 < alpha1 (|f|^2 + |b~|^2) + alpha2`` and ``p + f`` lies in ``[0, W-1] x [0, H-1]``.
    """
    if flow_ij.shape != flow_ji.shape or flow_ij.ndim != 4 or flow_ij.shape[1] != 2:
        shapes = f"{tuple(flow_ij.shape)} and {tuple(flow_ji.shape)}"
        raise ValueError(f"consistency_mask got {shapes}; expected two (N, 2, H, W) flows")
    h, w = flow_ij.shape[-2:]
    back = warp(flow_ji, flow_ij, padding_mode="border")

    def sq(v: torch.Tensor) -> torch.Tensor:
        return v.square().sum(1, keepdim=True)

    consistent = sq(flow_ij + back) < alpha1 * (sq(flow_ij) + sq(back)) + alpha2
    target = _pixel_grid(h, w, flow_ij) + flow_ij
    upper = torch.tensor([w - 1, h - 1], device=flow_ij.device, dtype=flow_ij.dtype).view(1, 2, 1, 1)
    inside = ((target >= 0) & (target <= upper)).all(1, keepdim=True)
    return (consistent & inside).to(flow_ij.dtype)


def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, h, w) to ``size`` = (H, W): area average when shrinking, bilinear otherwise."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- per-clip flows


@dataclass
class ClipFlows:
    """Flows between neighbouring frames of one clip, all at one size (h, w).

    to_prev, to_next: (F, 2, h, w); ``to_prev[i]`` is the flow i -> i-1 (zeros for i = 0) and
    ``to_next[i]`` the flow i -> i+1 (zeros for i = F-1).
    valid_prev, valid_next: (F, 1, h, w) float in {0, 1}: where frame i-1 (resp. i+1) warped onto
    frame i is trustworthy; all zero for the missing neighbour of the first (resp. last) frame.
    """

    to_prev: torch.Tensor
    to_next: torch.Tensor
    valid_prev: torch.Tensor
    valid_next: torch.Tensor

    def __len__(self) -> int:
        return self.to_next.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the flows and masks."""
        return tuple(self.to_next.shape[-2:])

    def to(self, device) -> ClipFlows:
        """The same flows and masks on ``device``."""
        return ClipFlows(*(getattr(self, f.name).to(device) for f in fields(self)))

    def resized(self, size: tuple[int, int]) -> ClipFlows:
        """Flows and masks at ``size`` = (h', w'); vectors rescaled: dx *= w'/w, dy *= h'/h.

        Shrinking averages over each output pixel's footprint (area), growing is bilinear; a mask
        pixel stays valid when more than half of it is valid (resampled mask > 0.5).
        """
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise ValueError(f"flow size {size} is invalid; expected (h, w) with h, w >= 1")
        if size == self.size:
            return self
        h, w = self.size
        gain = torch.tensor([size[1] / w, size[0] / h], device=self.to_next.device).view(1, 2, 1, 1)

        def flow(f: torch.Tensor) -> torch.Tensor:
            return _resample(f, size) * gain.to(f.dtype)

        def mask(m: torch.Tensor) -> torch.Tensor:
            return (_resample(m, size) > 0.5).to(m.dtype)

        return ClipFlows(
            flow(self.to_prev), flow(self.to_next), mask(self.valid_prev), mask(self.valid_next)
        )

    def pick(self, frames: torch.Tensor, index: torch.Tensor, size: tuple[int, int] | None = None):
        """Batched neighbour lookup: for frames (B,) and neighbours index (B,) (each i-1 or i+1),
        the flows (B, 2, h, w) and masks (B, 1, h, w), resized to ``size`` (default: stored size).

        Flows may be stored at a reduced resolution (or on the host) and are resized per batch, so
        only the frames being processed are ever held at full resolution.
        """
        frames = frames.to(self.to_next.device)
        after = (index.to(frames.device) > frames).view(-1, 1, 1, 1)
        flow = torch.where(after, self.to_next[frames], self.to_prev[frames])
        mask = torch.where(after, self.valid_next[frames], self.valid_prev[frames])
        if size is None or tuple(size) == self.size:
            return flow, mask
        h, w = self.size
        gain = torch.tensor([size[1] / w, size[0] / h], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
        return _resample(flow, size) * gain, (_resample(mask, size) > 0.5).to(mask.dtype)

    def neighbour(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow i -> j (2, h, w) and mask (1, h, w) of where frame j warped onto frame i is valid.

        ``warp(frame_j[None], flow[None])`` aligns frame j to frame i; j must be i - 1 or i + 1.
        """
        n = len(self)
        if not (0 <= i < n and 0 <= j < n and abs(i - j) == 1):
            raise ValueError(f"neighbour({i}, {j}) is invalid; expected 0 <= i, j < {n}, j = i - 1 or i + 1")
        if j == i - 1:
            return self.to_prev[i], self.valid_prev[i]
        return self.to_next[i], self.valid_next[i]


def to_gray_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) RGB in [-1, 1] -> uint8 (F, H, W) luma, Y = 0.299 R + 0.587 G + 0.114 B."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=frames.device)
    luma = torch.einsum("fchw,c->fhw", frames.float(), weights)
    return ((luma + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _opencv_estimator(cfg: FlowConfig) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function (src, dst) uint8 (H, W) -> float32 (H, W, 2) flow src -> dst, for DIS or Farneback."""
    if cfg.method == "dis":
        dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[cfg.dis_preset])
        return lambda src, dst: dis.calc(src, dst, None)
    if cfg.method == "farneback":
        # pyramid scale 0.5, 3 levels, 15 px window, 3 iterations, poly_n 5, poly_sigma 1.2
        return lambda src, dst: cv2.calcOpticalFlowFarneback(src, dst, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    raise ValueError(f"flow method {cfg.method!r} has no OpenCV estimator; expected dis or farneback")


def compute_flow(src: np.ndarray, dst: np.ndarray, cfg: FlowConfig) -> np.ndarray:
    """uint8 gray (H, W) images -> float32 (H, W, 2) flow from src to dst: ``src(p) ~ dst(p + flow(p))``.

    OpenCV DIS or Farneback at the images' own resolution (``compute_clip_flows`` applies cfg.scale).
    """
    cfg.validate()
    for name, img in (("src", src), ("dst", dst)):
        if img.dtype != np.uint8 or img.ndim != 2:
            raise ValueError(f"compute_flow {name} is {img.dtype} {img.shape}; expected uint8 (H, W)")
    if src.shape != dst.shape:
        raise ValueError(f"compute_flow got src {src.shape} and dst {dst.shape}; expected equal shapes")
    return _opencv_estimator(cfg)(src, dst).astype(np.float32, copy=False)


@lru_cache(maxsize=2)
def _load_raft(path: str, device: str) -> torch.nn.Module:
    """torchvision raft_large or raft_small (only large has a mask_predictor), weights from a local file.

    Cached, so a clip after the first reuses the model on that device.
    """
    try:
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError as err:
        raise ValueError("flow method 'raft' needs torchvision, which is not importable here") from err
    if not Path(path).is_file():
        raise ValueError(f"flow.raft_weights {path!r} is not a file; expected a local RAFT weights file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    large = any(key.startswith("mask_predictor.") for key in state)
    model = (raft_large if large else raft_small)(weights=None)
    model.load_state_dict(state)
    return model.eval().to(device)


def _raft_pair_flows(frames: torch.Tensor, size: tuple[int, int], cfg: FlowConfig, device, compute_device):
    """(F, 3, H, W) in [-1, 1] -> (2(F-1), 2, h, w) on device: flows i -> i+1, then i+1 -> i, at size."""
    model = _load_raft(str(cfg.raft_weights), str(torch.device(compute_device)))
    model_device = next(model.parameters()).device
    pairs = [(i, i + 1) for i in range(len(frames) - 1)]
    pairs += [(j, i) for i, j in pairs]

    def prepare(idx: list[int]) -> torch.Tensor:  # only this batch's frames go to the device
        x = _resample(frames[idx].to(model_device, torch.float32), size)
        return F.pad(x, (0, -size[1] % 8, 0, -size[0] % 8), mode="replicate")  # sides divisible by 8

    flows = []
    with torch.no_grad():
        for lo in range(0, len(pairs), _RAFT_BATCH):
            batch = pairs[lo:lo + _RAFT_BATCH]
            src, dst = prepare([i for i, _ in batch]), prepare([j for _, j in batch])
            flows.append(model(src, dst)[-1][..., : size[0], : size[1]].to(device))
    return torch.cat(flows)


def _opencv_pair_flows(frames: torch.Tensor, size: tuple[int, int], cfg: FlowConfig) -> torch.Tensor:
    """(F, 3, H, W) in [-1, 1] -> (2(F-1), 2, h, w) on CPU: flows i -> i+1, then i+1 -> i, at size."""
    gray = to_gray_uint8(frames)
    if size != tuple(gray.shape[-2:]):
        gray = np.stack([cv2.resize(g, (size[1], size[0]), interpolation=cv2.INTER_AREA) for g in gray])
    estimate = _opencv_estimator(cfg)
    pairs = [(i, i + 1) for i in range(len(gray) - 1)]
    pairs += [(j, i) for i, j in pairs]
    flows = np.stack([estimate(gray[i], gray[j]) for i, j in pairs])
    return torch.from_numpy(rearrange(flows, "n h w c -> n c h w").astype(np.float32))


def compute_clip_flows(
    frames: torch.Tensor, cfg: FlowConfig, size: tuple[int, int] | None = None, device=None,
    compute_device=None,
) -> ClipFlows:
    """Flows both ways between neighbouring frames of a clip, with validity masks.

    frames: (F, 3, H, W) RGB in [-1, 1]. The 2(F-1) flows are computed once at ``cfg.scale`` of
    (H, W); each direction's mask is the forward-backward check AND "target inside the image"
    (see ``consistency_mask``), evaluated at that resolution. The result is resized to ``size``
    (default (H, W)) with vectors rescaled, on ``device`` (default: the frames'). RAFT runs on
    ``compute_device`` (default: ``device``) a few frame pairs at a time.
    """
    cfg.validate()
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames have shape {tuple(frames.shape)}; expected (F, 3, H, W) with F >= 1")
    device = frames.device if device is None else torch.device(device)
    n, _, height, width = frames.shape
    work = (max(1, round(height * cfg.scale)), max(1, round(width * cfg.scale)))

    flow_zero = torch.zeros(1, 2, *work, device=device)
    mask_zero = torch.zeros(1, 1, *work, device=device)
    if n == 1:
        clip = ClipFlows(flow_zero, flow_zero.clone(), mask_zero, mask_zero.clone())
        return clip.resized(size or (height, width))

    check_flow_size((height, width), cfg)
    if cfg.method == "raft":
        pair_flows = _raft_pair_flows(frames, work, cfg, device, compute_device or device)
    else:
        pair_flows = _opencv_pair_flows(frames, work, cfg).to(device)
    forward, backward = pair_flows.chunk(2)  # (F-1, 2, h, w): i -> i+1 and i+1 -> i
    valid_forward = consistency_mask(forward, backward, cfg.fb_alpha1, cfg.fb_alpha2)
    valid_backward = consistency_mask(backward, forward, cfg.fb_alpha1, cfg.fb_alpha2)
    clip = ClipFlows(
        to_prev=torch.cat([flow_zero, backward]),
        to_next=torch.cat([forward, flow_zero]),
        valid_prev=torch.cat([mask_zero, valid_backward]),
        valid_next=torch.cat([valid_forward, mask_zero]),
    )
    return clip.resized(size or (height, width))


def compute_clip_flows_chunked(read: Callable[[int, int], torch.Tensor], n: int, cfg: FlowConfig,
                               size: tuple[int, int], folder, chunk: int = 16, compute_device=None) -> ClipFlows:
    """:func:`compute_clip_flows` for a clip too long to hold: ``read(a, b)`` gives frames ``[a, b)``
    (float ``(k, 3, H, W)`` in [-1, 1]); flows and masks at ``size`` go to files in ``folder``
    (:class:`pipelines.filestore.FileTensor`), computed ``chunk`` frames at a time with one frame of
    overlap, so each neighbouring pair is seen once. The result indexes like an in-memory ClipFlows."""
    from pathlib import Path

    from .filestore import FileTensor

    folder = Path(folder)
    h, w = size
    out = ClipFlows(FileTensor(folder / "to_prev.bin", (n, 2, h, w)), FileTensor(folder / "to_next.bin", (n, 2, h, w)),
                    FileTensor(folder / "valid_prev.bin", (n, 1, h, w)),
                    FileTensor(folder / "valid_next.bin", (n, 1, h, w)))
    if n == 1:
        return out  # zero-filled: no neighbours
    for a in range(0, n - 1, chunk):
        b = min(n, a + chunk + 1)  # frames a..b-1: pairs (a, a+1) .. (b-2, b-1)
        part = compute_clip_flows(read(a, b), cfg, size=size, device="cpu", compute_device=compute_device)
        idx = torch.arange(a, b)
        # the chunk's first frame has no "previous" inside it and its last no "next": keep what neighbours wrote
        out.to_next[idx[:-1]] = part.to_next[:-1]
        out.valid_next[idx[:-1]] = part.valid_next[:-1]
        out.to_prev[idx[1:]] = part.to_prev[1:]
        out.valid_prev[idx[1:]] = part.valid_prev[1:]
    return out
