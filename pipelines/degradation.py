"""Bicubic resampling shared by training, the CLI and the benchmarks.

The low-resolution input of every super-resolution experiment here is made the same way: an
antialiased bicubic downscale of the ground truth, then a plain bicubic upscale back to the
output size (the model's conditioning frame).
"""
import torch
import torch.nn.functional as F


def bicubic_resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(..., C, H, W)`` frames to ``size = (h, w)`` with bicubic filtering.

    Downscaling is antialiased (the standard degradation); upscaling is plain bicubic.
    """
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).float()
    h, w = x.shape[-2:]
    down = size[0] < h or size[1] < w
    if down and size[1] == 1 and size[0] != h:
        # torch (2.13) resizing with antialiasing to one column while the height changes returns one value
        # for every row; to one row it is right: resize the transpose
        out = F.interpolate(x.transpose(-1, -2), size=(1, size[0]), mode="bicubic", align_corners=False,
                            antialias=True).transpose(-1, -2)
    else:
        out = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=down)
    return out.to(frames.dtype).reshape(*lead, *out.shape[-3:])


def downscale(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downscale by an integer ``scale`` (sides must be divisible by it)."""
    h, w = frames.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"frame size {h}x{w} is not divisible by the scale {scale}")
    return bicubic_resize(frames, (h // scale, w // scale))


def upscale(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """Plain bicubic upscale by an integer ``scale``."""
    h, w = frames.shape[-2:]
    return bicubic_resize(frames, (h * scale, w * scale))
