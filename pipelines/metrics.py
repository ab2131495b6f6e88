"""Frame-quality and temporal-consistency metrics.

Frames are float tensors ``(F, 3, H, W)`` in [-1, 1] (RGB); flows are ``(F, 2, H, W)`` in
pixels (channel 0 = dx, 1 = dy), where ``flow[t]`` maps frame t onto frame t-1 and
``flow[0]`` is unused. Every metric returns a Python float and works on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BT601 = (0.299, 0.587, 0.114)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (F, C, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def luma(x: torch.Tensor) -> torch.Tensor:
    """``(F, 3, H, W)`` in [-1, 1] -> BT.601 luma ``(F, 1, H, W)`` in [0, 1]:
    Y = 0.299 R + 0.587 G + 0.114 B on (x + 1) / 2."""
    w = torch.tensor(_BT601, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return ((x.double() + 1) / 2 * w).sum(dim=1, keepdim=True)


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over frames of the per-frame PSNR, peak-to-peak 2 (the [-1, 1] range):

        PSNR_t = 10 log10(2^2 / MSE_t),   MSE_t = mean over (C, H, W) of (x_t - y_t)^2.

    A frame with MSE 0 has PSNR inf (so does the mean).
    """
    _check_pair(x, y)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(dim=1)
    return (10 * torch.log10(4.0 / mse)).mean().item()


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004) over frames, on BT.601 luma in [0, 1]:

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

    local statistics from an 11x11 Gaussian window (sigma 1.5), C1 = (0.01)^2, C2 = (0.03)^2,
    averaged over the positions where the window fits inside the frame ('valid'), which is
    what skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1) averages over.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11, got {tuple(x.shape[-2:])}")
    a, b = luma(x), luma(y)
    g = _gaussian_window(device=x.device)

    def blur(z):  # separable 'valid' Gaussian filter
        z = F.conv2d(z, g.view(1, 1, 1, -1))
        return F.conv2d(z, g.view(1, 1, -1, 1))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
         / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return s.flatten(1).mean(dim=1).mean().item()


@torch.no_grad()
def sharpness(x: torch.Tensor) -> float:
    """Mean gradient magnitude of BT.601 luma in [0, 1] (units: luma per pixel).

    Central differences on interior pixels:  gx = (Y[i, j+1] - Y[i, j-1]) / 2,
    gy = (Y[i+1, j] - Y[i-1, j]) / 2,  result = mean sqrt(gx^2 + gy^2). A ramp Y = a*j gives a.
    """
    if x.ndim != 4 or min(x.shape[-2:]) < 3:
        raise ValueError(f"expected (F, 3, H, W) with H, W >= 3, got {tuple(x.shape)}")
    y = luma(x)
    gx = (y[..., 1:-1, 2:] - y[..., 1:-1, :-2]) / 2
    gy = (y[..., 2:, 1:-1] - y[..., :-2, 1:-1]) / 2
    return torch.sqrt(gx ** 2 + gy ** 2).mean().item()


@torch.no_grad()
def warp_errors(frames: torch.Tensor, flows_to_prev: torch.Tensor, valid_prev: torch.Tensor) -> list[float]:
    """The per-pair terms E_t of :func:`warp_error` for t = 1..F-1 (nan where the mask is empty)."""
    from pipelines.flow import warp

    n = frames.shape[0]
    if flows_to_prev.shape != (n, 2, *frames.shape[-2:]) or valid_prev.shape[0] != n:
        raise ValueError(f"shape mismatch: frames {tuple(frames.shape)}, flows "
                         f"{tuple(flows_to_prev.shape)}, mask {tuple(valid_prev.shape)}")
    out = []
    for t in range(1, n):
        m = valid_prev[t : t + 1].float()
        total = m.sum()
        if total == 0:
            out.append(math.nan)
            continue
        warped = warp(frames[t - 1 : t].float(), flows_to_prev[t : t + 1].float())
        sq = (frames[t : t + 1].float() - warped) ** 2
        out.append(((m * sq).sum() / (frames.shape[1] * total)).item())
    return out


@torch.no_grad()
def warp_error(frames: torch.Tensor, flows_to_prev: torch.Tensor,
               valid_prev: torch.Tensor) -> float:
    """Warping error E_warp (Lai et al. 2018), on the [-1, 1] values as given:

        E_t = sum(M_t * (O_t - W(O_{t-1}, f_t))^2) / (3 * sum(M_t)),   E = mean_t E_t, t = 1..F-1

    ``frames`` (F, 3, H, W); ``flows_to_prev`` (F, 2, H, W), f_t maps frame t to t-1 (f_0
    unused); ``valid_prev`` (F, 1, H, W) mask M_t (1 = pixel visible in t-1). W is backward
    warping, W(x, f)(p) = x(p + f(p)). Frames with an empty mask are skipped; with no pair
    left the result is nan. On [0, 1] frames the value would be E / 4.
    """
    errors = [e for e in warp_errors(frames, flows_to_prev, valid_prev) if not math.isnan(e)]
    return float(sum(errors) / len(errors)) if errors else math.nan


@torch.no_grad()
def tof(flow_out: torch.Tensor, flow_ref: torch.Tensor) -> float:
    """Temporal optical-flow error, after tOF of TecoGAN (Chu et al. 2020), on magnitudes:

        tOF = mean over t = 1..F-1 and pixels of | ||f_out[t]|| - ||f_ref[t]|| |

    with ``flow_out``/``flow_ref`` (F, 2, H, W) the flows of the output and of the reference
    clip in the ``flows_to_prev`` layout (index 0 unused). In pixels; nan for F < 2.
    """
    _check_pair(flow_out, flow_ref)
    if flow_out.shape[0] < 2:
        return math.nan
    mag_out = flow_out[1:].double().norm(dim=1)
    mag_ref = flow_ref[1:].double().norm(dim=1)
    return (mag_out - mag_ref).abs().mean().item()
