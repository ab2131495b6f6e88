"""The library entry points as a script or notebook calls them (a cold reading of the API found these)."""
import time

import numpy as np
import pytest
import torch

import tiny
from pipelines.align import Alignment
from pipelines.config import ConfigError, load_config
from pipelines.loading import ModelLoadError
from pipelines.video_io import read_clip, to_uint8, write_video
from pipelines.video_pipeline import SamplingOptions, VideoPipeline
from pipelines.windows import sample_windowed


def pixel_pipe():
    return VideoPipeline(tiny.pixel_unet(6), tiny.ddpm_v(), scale=2, residual_scale=0.1)


def test_frames_that_are_not_float_tensors_are_refused():
    """uint8 frames ran without a word and came out clipped to +-1 over half the image; a numpy array or a
    list failed with an AttributeError deep inside."""
    pipe, o = pixel_pipe(), SamplingOptions(num_inference_steps=1)
    u8 = torch.from_numpy(to_uint8(tiny.textured_clip(2, 16))).permute(0, 3, 1, 2)
    for bad in (u8, u8.numpy().astype(np.float32), [u8]):
        with pytest.raises(ValueError, match="float tensor.*to_tensor"):
            pipe(bad, options=o)


def test_sides_the_unet_cannot_take_keep_last_and_options_are_checked():
    """A 15x17 frame crashed inside diffusers ("Sizes of tensors must match"); keep_last beyond the frames
    returned the wrong ones; batch_size=-1 denoised nothing, noise="Shared" ran independent noise, start="fwd"
    ran backward; chain_length=0 (the config's "exact sweep") was refused."""
    same_size = VideoPipeline(tiny.pixel_unet(6), tiny.ddpm_v(), scale=1, residual_scale=0.1)  # 2-level UNet
    with pytest.raises(ValueError, match="multiples of 2.*pad_to_multiple"):
        same_size(torch.zeros(2, 3, 15, 17), options=SamplingOptions(num_inference_steps=1))
    pipe = pixel_pipe()
    with pytest.raises(ValueError, match="keep_last"):
        pipe(tiny.textured_clip(3, 16), options=SamplingOptions(num_inference_steps=1), keep_last=5)
    for bad in (dict(batch_size=-1), dict(decode_batch_size=-1), dict(noise="Shared"), dict(start="fwd"),
                dict(direction="both"), dict(eta=float("inf")), dict(num_inference_steps=0), dict(strength=0.0)):
        with pytest.raises(ValueError, match=f"SamplingOptions.{next(iter(bad))}"):
            SamplingOptions(**bad)
    assert SamplingOptions(chain_length=0).chain_length is None


@pytest.mark.parametrize("noise", ["independent", "shared"])
def test_windows_draw_the_same_noise_as_one_pass(noise):
    """Each window ran with seed + its first frame, so a "shared" draw changed from window to window (a seam
    every window on clips beyond 48 frames); without alignment, windows must give the one-pass frames."""
    pipe, clip = pixel_pipe(), tiny.textured_clip(4, 16)
    o = SamplingOptions(num_inference_steps=2, noise=noise, seed=5)
    one = to_uint8(pipe(clip, options=o).frames)
    win = sample_windowed(pipe, clip, window=2, overlap=0, anchor_weight=0.0, make_alignment=Alignment, options=o)
    assert np.array_equal(win.numpy(), one)  # shared: windows 2-3 drew from seed 7 before, not 5


def test_a_missing_local_model_is_no_hub_lookup(tmp_path, monkeypatch):
    """"weights/vsr-x4-typo" was tried as a hub repository: 46 s of retries, then an error about the network."""
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="does not exist"):
        VideoPipeline.from_pretrained("weights/vsr-x4-typo")
    assert time.perf_counter() - t0 < 5


def test_dtype_names_load_that_dtype(tmp_path):
    """dtype="float16" loaded float32 with one diffusers warning."""
    path = tiny.save_residual_sr(tmp_path / "m")
    assert VideoPipeline.from_pretrained(path, dtype="bfloat16").unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        VideoPipeline.from_pretrained(path, dtype="half")


def test_the_writers_take_the_pipelines_uint8_frames(tmp_path):
    """``output_uint8=True`` frames (a uint8 tensor) were refused by write_video with "expected uint8 frames,
    got torch.uint8"."""
    frames = pixel_pipe()(tiny.textured_clip(2, 16), options=SamplingOptions(num_inference_steps=1),
                          output_uint8=True).frames
    write_video(tmp_path / "o.mp4", frames, 10)
    assert read_clip(tmp_path / "o.mp4").frames.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="to_uint8"):
        write_video(tmp_path / "p.mp4", torch.zeros(2, 3, 32, 32), 10)


def test_run_clip_checks_a_config_edited_after_loading(tmp_path):
    """cfg.sampling.batch_size = -1 after load_config ran (19 dB instead of 30, no error)."""
    from pipelines.job import run_clip

    cfg = load_config(None, ["input.max_frames=2"])
    cfg.sampling.batch_size = -1
    with pytest.raises(ConfigError, match="sampling.batch_size"):
        run_clip(cfg, "assets/example.mp4", tmp_path / "o.mp4")
