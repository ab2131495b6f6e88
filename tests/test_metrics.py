import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from pipelines.metrics import psnr, sharpness, ssim, tof, warp_error


def random_clip(n=3, h=32, w=40, seed=0, amplitude=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1) * amplitude


def gray_clip(y01: torch.Tensor) -> torch.Tensor:
    """(F, H, W) luma in [0, 1] -> (F, 3, H, W) gray RGB in [-1, 1] (its BT.601 luma is y01)."""
    return (y01 * 2 - 1)[:, None].expand(-1, 3, -1, -1)


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_closed_form():
    x = random_clip()
    d = 0.1
    assert psnr(x, x + d) == pytest.approx(10 * math.log10(4 / d**2))
    # per-frame PSNR, then the mean over frames
    y = x.clone()
    y[0] += 0.1
    y[1:] -= 0.2
    expected = (10 * math.log10(4 / 0.01) + 2 * 10 * math.log10(4 / 0.04)) / 3
    assert psnr(x, y) == pytest.approx(expected)
    assert psnr(x, x) == math.inf


def test_ssim_matches_skimage():
    x = random_clip(n=2, seed=1)
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1)  # a structured difference
    y = (blurred + 0.05 * random_clip(n=2, seed=2)).clamp(-1, 1)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)

    def luma(z):
        return (((z + 1) / 2) * weights).sum(1).numpy()

    expected = np.mean([
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for a, b in zip(luma(x), luma(y))
    ])
    assert 0.1 < expected < 0.95  # a non-trivial case
    assert ssim(x, y) == pytest.approx(expected, abs=1e-6)
    assert ssim(x.float(), y.float()) == pytest.approx(expected, abs=1e-4)


def test_ssim_identity_and_errors():
    x = random_clip()
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError):
        ssim(x[..., :10, :10], x[..., :10, :10])
    with pytest.raises(ValueError):
        ssim(x, x[:2])


# ----------------------------------------------------------------------------- sharpness


def test_sharpness_ramp_closed_form():
    h, w = 20, 30
    cols = torch.arange(w, dtype=torch.float64)
    rows = torch.arange(h, dtype=torch.float64)[:, None]
    ramp = (0.01 * cols + 0.1).expand(h, w)[None]
    assert sharpness(gray_clip(ramp)) == pytest.approx(0.01)
    diagonal = (0.012 * cols + 0.005 * rows + 0.1)[None]
    assert sharpness(gray_clip(diagonal)) == pytest.approx(0.013)
    assert sharpness(gray_clip(torch.full((2, h, w), 0.3))) == pytest.approx(0.0)
    # columns alternating 0, 0.2: central differences see 0, a one-sided difference would see 0.2
    stripes = (0.2 * (cols % 2)).expand(h, w)[None]
    assert sharpness(gray_clip(stripes)) == pytest.approx(0.0, abs=1e-12)


def test_sharpness_blur_is_lower():
    x = random_clip(n=2, seed=3)
    blurred = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    assert sharpness(blurred) < 0.5 * sharpness(x)


# ----------------------------------------------------------------------------- warp error


def shifted_clip(n=4, h=24, w=32):
    """Frame t is frame t-1 moved right by exactly 1 pixel (content wraps at the border)."""
    base = random_clip(n=1, h=h, w=w, seed=4)[0]
    return torch.stack([torch.roll(base, shifts=t, dims=-1) for t in range(n)])


def test_warp_error_integer_shift_is_zero():
    frames = shifted_clip()
    n, _, h, w = frames.shape
    flows = torch.zeros(n, 2, h, w, dtype=torch.float64)
    flows[:, 0] = -1.0  # pixel x of frame t is at x - 1 in frame t-1
    valid = torch.ones(n, 1, h, w)
    valid[:, :, :, 0] = 0  # column 0 has no source in frame t-1
    assert warp_error(frames, flows, valid) == pytest.approx(0.0, abs=1e-10)
    # the same check with the wrong direction must fail, so the test can tell
    assert warp_error(frames, -flows, valid) > 0.05


def test_warp_error_flicker_closed_form():
    base = random_clip(n=1, seed=5)[0]
    offsets = [0.0, 0.1, 0.3, 0.0]
    frames = torch.stack([base + o for o in offsets])
    n, _, h, w = frames.shape
    flows = torch.zeros(n, 2, h, w)
    valid = torch.ones(n, 1, h, w)
    expected = np.mean([(b - a) ** 2 for a, b in zip(offsets, offsets[1:])])
    assert warp_error(frames, flows, valid) == pytest.approx(expected)

    alternating = torch.stack([base + (0.1 if t % 2 else -0.1) for t in range(5)])
    ones = torch.ones(5, 1, h, w)
    assert warp_error(alternating, torch.zeros(5, 2, h, w), ones) == pytest.approx(0.2**2)

    # masked-out pixels do not count: garbage there leaves the value unchanged
    frames[1:, :, :8] = 5.0
    valid[:, :, :8] = 0
    assert warp_error(frames, flows, valid) == pytest.approx(expected)
    # each pair is normalised by its own mask and pairs weigh equally: a mask of a different size on
    # one pair leaves the mean of the per-pair terms unchanged (pooling the pairs would not)
    valid[2, :, 8:20] = 0
    assert warp_error(frames, flows, valid) == pytest.approx(expected)
    # a pair with an empty mask is skipped, not counted as 0 nor turning the result into nan
    valid[2] = 0
    assert warp_error(frames, flows, valid) == pytest.approx(np.mean([0.1**2, 0.3**2]))


def test_warp_error_undefined_is_nan():
    frames = random_clip(n=2, h=12, w=12)
    flows = torch.zeros(2, 2, 12, 12)
    assert math.isnan(warp_error(frames, flows, torch.zeros(2, 1, 12, 12)))
    assert math.isnan(warp_error(frames[:1], flows[:1], torch.ones(1, 1, 12, 12)))


# ----------------------------------------------------------------------------- tOF


def test_tof():
    g = torch.Generator().manual_seed(6)
    flow = torch.randn(4, 2, 10, 12, generator=g)
    assert tof(flow, flow) == 0.0
    out = torch.zeros(4, 2, 10, 12)
    out[:, 0], out[:, 1] = 3.0, 4.0  # |f| = 5
    ref = torch.zeros(4, 2, 10, 12)
    ref[:, 1, :, :6] = -6.0  # |f| = 6 on the left half
    ref[:, 1, :, 6:] = 4.0  # |f| = 4 on the right half: |5 - |f|| is 1 on both, their signed mean 0
    ref[0] = 100.0  # index 0 is unused
    assert tof(out, ref) == pytest.approx(1.0)
    assert tof(out, torch.zeros_like(out)) == pytest.approx(5.0)
    assert math.isnan(tof(out[:1], ref[:1]))
