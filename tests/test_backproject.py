"""Back-projection (pipelines/backproject.py): checked against closed-form maths, streamed in chunks
against the whole clip at once, through the pipeline and the job, and on real footage with the shipped
models (the example clip, which no model was trained on)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.align import Fusion  # noqa: E402
from pipelines.backproject import average_along_flow, back_project, correction  # noqa: E402
from pipelines.degradation import bicubic_resize, downscale, upscale  # noqa: E402
from pipelines.flow import ClipFlows  # noqa: E402
from pipelines.metrics import psnr  # noqa: E402
from pipelines.video_io import read_clip, to_tensor  # noqa: E402
from pipelines.video_pipeline import SamplingOptions, VideoPipeline  # noqa: E402


def still_flows(n: int, h: int, w: int) -> ClipFlows:
    """Zero flows, every neighbour valid (none beyond the clip's ends)."""
    valid_prev, valid_next = torch.ones(n, 1, h, w), torch.ones(n, 1, h, w)
    valid_prev[0], valid_next[-1] = 0, 0
    return ClipFlows(torch.zeros(n, 2, h, w), torch.zeros(n, 2, h, w), valid_prev, valid_next)


def run(x, y, flows=None, sizes=None):
    """back_project over chunks of the given sizes (default: one chunk); returns the whole clip."""
    sizes = sizes or [len(x)]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    chunks = [(a, x[a:a + k], y[a:a + k]) for a, k in zip(starts, sizes)]
    out = list(back_project(chunks, 4, flows))
    assert [a for a, _ in out] == starts
    return torch.cat([o for _, o in out])


def test_an_output_that_already_explains_its_input_is_left_unchanged():
    # closed form: y = D(x) gives c = U(y - D(x)) = 0, with or without the temporal average
    x = torch.rand(3, 3, 32, 32) * 1.6 - 0.8
    y = downscale(x, 4)
    assert correction(x, y, 4).abs().max() < 1e-6
    torch.testing.assert_close(run(x, y, still_flows(3, 32, 32)), x, atol=1e-6, rtol=0)


def test_one_step_moves_the_output_towards_its_input_and_keeps_the_detail_the_degradation_removes():
    torch.manual_seed(0)
    gt = torch.rand(2, 3, 64, 64) * 2 - 1
    y = downscale(gt, 4)
    x = upscale(y, 4) * 0.6 + 0.2  # wrong contrast and brightness: a low-frequency error
    before = (downscale(x, 4) - y).square().mean()
    after = (downscale(run(x, y), 4) - y).square().mean()
    assert after < 0.1 * before  # D(U(r)) is close to r for the smooth residual here: measured 0.015x
    # a pattern at the output's Nyquist rate (+-a per pixel) is invisible to D, so the correction ignores it
    checker = 0.1 * (torch.arange(64)[:, None] + torch.arange(64)[None]).remainder(2).mul(2).sub(1).float()
    torch.testing.assert_close(correction(x + checker, y, 4), correction(x, y, 4), atol=2e-3, rtol=0)


def test_the_temporal_average_is_the_mean_over_the_frame_and_its_valid_neighbours():
    # closed form with zero flows: c_i' = (c_{i-1} + c_i + c_{i+1}) / 3 inside, the mean of two at the ends
    c = torch.randn(4, 3, 8, 8)
    got = average_along_flow(c, 0, still_flows(4, 8, 8), None, None)
    want = torch.stack([(c[0] + c[1]) / 2, (c[0] + c[1] + c[2]) / 3, (c[1] + c[2] + c[3]) / 3, (c[2] + c[3]) / 2])
    torch.testing.assert_close(got, want)
    # an occluded neighbour (mask 0) drops out of the mean
    flows = still_flows(4, 8, 8)
    flows.valid_prev[2] = 0
    got = average_along_flow(c, 0, flows, None, None)
    torch.testing.assert_close(got[2], (c[2] + c[3]) / 2)


def test_a_moving_pattern_keeps_its_correction_and_the_flow_is_followed():
    # corrections that move with the flow (a 2-pixel shift right per frame) average to themselves
    base = torch.randn(1, 3, 16, 24)
    c = torch.cat([torch.roll(base, 2 * i, dims=-1) for i in range(3)])
    n, h, w = 3, 16, 24
    to_prev = torch.zeros(n, 2, h, w)
    to_prev[:, 0] = -2.0  # pixel p of frame i came from p - 2 in frame i-1
    to_next = torch.zeros(n, 2, h, w)
    to_next[:, 0] = 2.0
    valid = torch.zeros(n, 1, h, w)
    valid[..., 2:-2] = 1  # away from the wrapped columns
    vp, vn = valid.clone(), valid.clone()
    vp[0], vn[-1] = 0, 0
    got = average_along_flow(c, 0, ClipFlows(to_prev, to_next, vp, vn), None, None)
    torch.testing.assert_close(got[1, ..., 2:-2], c[1, ..., 2:-2], atol=1e-5, rtol=0)
    # with zero flows instead, the middle frame's correction is blurred by the misaligned neighbours
    blurred = average_along_flow(c, 0, still_flows(n, h, w), None, None)
    assert (blurred[1] - c[1]).abs().mean() > 0.3


@pytest.mark.parametrize("sizes", [[2, 3, 1], [1, 1, 1, 1, 1, 1], [5, 1]])
def test_streaming_in_chunks_equals_the_whole_clip_at_once(sizes):
    torch.manual_seed(1)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    y = torch.rand(6, 3, 4, 4) * 2 - 1
    flows = still_flows(6, 8, 8)  # stored at half size: resized to the frames
    whole = run(x, y, flows)
    torch.testing.assert_close(run(x, y, flows, sizes), whole)
    # and the whole clip is x + the closed-form mean of the corrections, clamped
    c = correction(x, y, 4)
    mean = torch.stack([c[max(0, i - 1):i + 2].mean(0) for i in range(6)])
    torch.testing.assert_close(whole, (x + mean).clamp(-1, 1), atol=1e-5, rtol=0)


def example_crop(frames=4, size=128):
    gt = to_tensor(read_clip(ROOT / "assets" / "example_gt", max_frames=frames).frames)
    top = (gt.shape[-2] - size) // 2
    gt = gt[..., top:top + size, top:top + size]
    return gt, downscale(gt, 4).clamp(-1, 1)


@torch.no_grad()
@pytest.mark.parametrize("model", ["vsr-x4", "latent-x4"])
def test_back_projection_raises_psnr_on_the_example_clip_and_the_output_explains_its_input(model):
    # real footage no model was trained on; the pipeline call with and without sampling.back_projection
    pipe = VideoPipeline.from_pretrained(ROOT / "weights" / model)
    gt, lr = example_crop()
    opts = SamplingOptions(num_inference_steps=6, seed=0)
    plain = pipe(lr, options=opts, alignment=Fusion(0.3)).frames
    bp = pipe(lr, options=SamplingOptions(num_inference_steps=6, seed=0, back_projection=True),
              alignment=Fusion(0.3)).frames
    # measured on this crop: the error of D(output) against the input falls to 0.64x (vsr-x4) and 0.39x
    # (latent-x4), PSNR rises by 0.29 dB and 0.67 dB; a sign error or a wrong scale loses dBs instead
    assert (downscale(bp, 4) - lr).abs().mean() < 0.8 * (downscale(plain, 4) - lr).abs().mean()
    gain = psnr(bp, gt) - psnr(plain, gt)
    assert gain > 0.15, gain


@torch.no_grad()
def test_the_latent_model_with_back_projection_beats_bicubic_on_a_clip_it_never_saw():
    # issue 13: the example clip (woman-running) was never read by any training run
    pipe = VideoPipeline.from_pretrained(ROOT / "weights" / "latent-x4")
    gt, lr = example_crop(frames=4, size=128)
    out = pipe(lr, options=SamplingOptions(num_inference_steps=10, seed=0, back_projection=True),
               alignment=Fusion(0.3)).frames
    bicubic = upscale(lr, 4).clamp(-1, 1)
    # measured: 27.08 dB against bicubic 26.18 (without back-projection 26.37; 27.02 with the once-fine-tuned
    # VAE decoder, 25.89 without back-projection with the lease's)
    assert psnr(out, gt) > psnr(bicubic, gt) + 0.3, (psnr(out, gt), psnr(bicubic, gt))


@torch.no_grad()
def test_the_pipeline_decodes_in_any_chunking_to_the_same_frames(tmp_path):
    # iter_output streams with a one-frame look-ahead; chunks of 2 and decoder batches of 1 (as the job's
    # file-backed pass decodes) must give the frames of the pipeline call itself
    import tiny

    pipe = VideoPipeline.from_pretrained(tiny.save_residual_sr(tmp_path / "m", scale=2))
    frames = tiny.textured_clip(5, 16, shift=(0.8, 0.4))
    opts = SamplingOptions(num_inference_steps=2, seed=0, back_projection=True)
    res = pipe(frames, options=opts, alignment=Fusion(0.3), keep_last=5)
    streamed = list(pipe.iter_output(res.samples, frames, 1, chunk=2, back_projection=True, flows=res.flows))
    assert [a for a, _ in streamed] == [0, 2, 4]
    torch.testing.assert_close(torch.cat([f for _, f in streamed]), res.frames, atol=1e-6, rtol=0)
    plain = pipe.decode(res.samples, frames, 0)
    assert (res.frames - plain).abs().max() > 1e-3  # back-projection changed the frames


@pytest.mark.parametrize("shape, size", [((124, 4), (31, 1)), ((124, 1), (31, 1)), ((4, 124), (1, 31))])
def test_downscaling_to_one_pixel_column_or_row_keeps_the_other_sides_variation(shape, size):
    """torch's antialiased bicubic resize to one column returned one value for every row (while the height
    changed); back-projection of a 1-pixel-wide input then pulled the output towards a constant. Reference:
    frames constant along the collapsing side, where the result must be the other side resized alone (a
    resize of 4 columns, or 4 rows, keeping them, of which one is taken)."""
    g = torch.Generator().manual_seed(0)
    column = size[1] == 1
    line = torch.rand(1, 3, shape[0], 1, generator=g) if column else torch.rand(1, 3, 1, shape[1], generator=g)
    frames = line.expand(1, 3, *shape).contiguous()
    wide = line.expand(1, 3, shape[0], 4) if column else line.expand(1, 3, 4, shape[1])
    kept = (size[0], 4) if column else (4, size[1])
    want = torch.nn.functional.interpolate(wide.contiguous(), size=kept, mode="bicubic", align_corners=False,
                                           antialias=True)
    want = want[..., :1] if column else want[..., :1, :]
    got = bicubic_resize(frames, size)  # (downscale by 4 where both sides divide)
    assert got.shape[-2:] == size and got.std() > 0.05
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
