"""Long clips: overlapping windows anchored on the previous window (issue 7)."""
from pathlib import Path

import pytest
import torch

import tiny
from pipelines.align import Fusion
from pipelines.flow import FlowConfig, compute_clip_flows
from pipelines.metrics import warp_error
from pipelines.video_io import read_clip, to_tensor
from pipelines.video_pipeline import SamplingOptions, VideoPipeline
from pipelines.windows import plan_windows, sample_windowed

ROOT = Path(__file__).resolve().parents[1]


def test_plan_windows_cover_the_clip_with_overlaps():
    assert plan_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert plan_windows(5, 8, 2) == [(0, 5)]
    assert plan_windows(9, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 9)]
    with pytest.raises(ValueError):
        plan_windows(10, 4, 4)


def test_pinned_anchors_continue_the_previous_window_exactly():
    pipe = VideoPipeline(tiny.pixel_unet(6), tiny.ddpm_v(), scale=2, residual_scale=0.1)
    clip = tiny.textured_clip(7, 16)
    opts = SamplingOptions(num_inference_steps=3, seed=2)
    seams = []
    out = sample_windowed(pipe, clip, window=4, overlap=2, anchor_weight=1.0, make_alignment=lambda: Fusion(0.5),
                          options=opts, seam_log=seams)
    assert out.shape == (7, 32, 32, 3) and out.dtype == torch.uint8 and seams == [4, 6]
    first = pipe(clip[:4], options=opts, alignment=Fusion(0.5), output_uint8=True).frames
    # frames 0-1 belong to window 0 only; 2-3 are cross-faded with window 1, whose anchors were pinned
    # to window 0's final samples, so the fade changes nothing beyond rounding
    assert torch.equal(out[:2], first[:2])
    assert (out[2:4].int() - first[2:4].int()).abs().max() <= 1


def per_pair_warp_error(frames, flows):
    return [warp_error(frames[t - 1:t + 1], flows.to_prev[t - 1:t + 1], flows.valid_prev[t - 1:t + 1])
            for t in range(1, len(frames))]


@torch.no_grad()
def test_window_seams_on_a_real_clip_are_close_to_the_interior():
    """The shipped model on the example clip (cut from woman-running.mp4): windows of 6 frames
    overlapping by 2. The warp error across the seams is within 1.5x the interior's."""
    pipe = VideoPipeline.from_pretrained(ROOT / "weights" / "vsr-x4")
    lr = to_tensor(read_clip(ROOT / "assets" / "example.mp4").frames)[:, :, 16:48, 16:48]  # 32x32 crop
    opts = SamplingOptions(num_inference_steps=10, strength=0.5, seed=0)
    seams = []
    out = sample_windowed(pipe, lr, window=6, overlap=2, anchor_weight=0.8, make_alignment=lambda: Fusion(0.5),
                          options=opts, seam_log=seams)
    out = out.permute(0, 3, 1, 2).float() / 127.5 - 1
    flows = compute_clip_flows(pipe.conditioning_frames(lr), FlowConfig())
    err = per_pair_warp_error(out, flows)  # err[t-1] is the pair (t-1, t)
    seam_pairs = {t for s in seams for t in range(s - 2, s + 1)}  # the cross-faded overlap and the hand-over
    seam = [err[t - 1] for t in seam_pairs]
    interior = [err[t - 1] for t in range(1, len(out)) if t not in seam_pairs]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"seam {mean(seam):.5f} interior {mean(interior):.5f}")
    assert mean(seam) <= 1.5 * mean(interior)


def test_windows_loaded_from_the_workdir_count_their_frame_steps(tmp_path):
    """A restarted run that loads finished windows from the work folder advances the progress bar by their
    frame-steps, so it ends at the total (it ended at the frame-steps sampled in this run only)."""
    pipe = VideoPipeline(tiny.pixel_unet(6), tiny.ddpm_v(), scale=2, residual_scale=0.1)
    clip = tiny.textured_clip(7, 16)
    opts = SamplingOptions(num_inference_steps=3, seed=2)
    kw = dict(window=4, overlap=2, anchor_weight=0.8, make_alignment=lambda: Fusion(0.5), options=opts,
              workdir=tmp_path)
    first, again = [], []
    want = sample_windowed(pipe, clip, progress=first.append, **kw)
    total = 3 * sum(b - a for a, b in plan_windows(7, 4, 2))
    assert sum(first) == total
    assert torch.equal(sample_windowed(pipe, clip, progress=again.append, **kw), want)  # all loaded
    assert sum(again) == total


def test_the_default_jobs_window_hand_over_is_close_to_one_pass(tmp_path):
    """Through the command line, the example clip (16 frames) in windows of 8 overlapping by 2 against one
    pass: the warp error of each hand-over pair (the first pair only the new window made) within 1.3x one
    pass's on the same pair. With the old default anchor (0.8) the overlap copied the previous window and the
    whole switch fell on that pair: 1.51x and 1.58x here (1.66x and 1.81x on 120 frames of two real clips)."""
    from pipelines.degradation import upscale
    from pipelines.metrics import warp_errors
    from run_video import main

    def run(name, *extra):
        assert main(["--input", str(ROOT / "assets" / "example.mp4"), "--output", str(tmp_path / f"{name}.mp4"),
                     f"output.frames_dir={tmp_path / name}", "runtime.threads=1", *extra]) == 0
        return to_tensor(read_clip(tmp_path / name).frames)

    lr = to_tensor(read_clip(ROOT / "assets" / "example.mp4").frames)
    flows = compute_clip_flows(upscale(lr, 4).clamp(-1, 1), FlowConfig())
    one = warp_errors(run("one", "runtime.mode=one_pass"), flows.to_prev, flows.valid_prev)
    win = warp_errors(run("win", "runtime.mode=windows", "runtime.window=8", "runtime.overlap=2"), flows.to_prev,
                      flows.valid_prev)
    spans = plan_windows(16, 8, 2)
    hand_over = [spans[k - 1][1] for k in range(1, len(spans))]  # a + n: 8 and 14
    ratios = [win[t - 1] / one[t - 1] for t in hand_over]
    assert hand_over == [8, 14] and max(ratios) <= 1.3, ratios

