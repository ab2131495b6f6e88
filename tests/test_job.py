"""The streaming clip job (pipelines.job.run_clip) through run_video.py: bounded memory, streaming equals
the in-memory library call bit for bit, audio kept and trimmed, timestamps kept."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from pipelines.align import Fusion
from pipelines.config import load_config, sampling_options
from pipelines.flow import FlowConfig
from pipelines.job import run_clip
from pipelines.video_io import read_clip, to_tensor, to_uint8, write_video
from pipelines.video_pipeline import VideoPipeline
from pipelines.windows import sample_windowed
from test_video_io import audio_packet_at, count_decoded_frames, make_av_clip, mux_tone, streams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.save_residual_sr(tmp_path_factory.mktemp("model") / "m", scale=2)


def job_cfg(model, *overrides):
    return load_config(ROOT / "configs" / "default.yaml",
                       [f"model.path={model}", "sampling.num_inference_steps=2", "runtime.threads=1", *overrides])


def pngs(folder):
    import cv2

    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(Path(folder).glob("*.png"))])


@pytest.mark.parametrize("mode", ["one_pass", "one_pass_files", "windows", "windows_anchored"])
def test_streaming_job_equals_the_library_call_bit_for_bit(model, tmp_path, mode):
    """The job (lazy reading, chunked writing and scoring; for one_pass_files also the samples, flows and
    input in files) gives exactly the frames of the in-memory library call, before encoding. Windows with
    an anchor weight (the default is 0) check that the job hands it on."""
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(9, 16, shift=(0.8, 0.4))), 10)
    extra = {"one_pass_files": ["runtime.files_above=0"], "windows_anchored": ["runtime.anchor_weight=0.8"]}
    extra = extra.get(mode, [])
    mode = mode.replace("_files", "").replace("_anchored", "")
    cfg = job_cfg(model, f"runtime.mode={mode}", "runtime.window=4", "runtime.overlap=2",
                  f"output.frames_dir={tmp_path / 'png'}", *extra)
    run_clip(cfg, clip, tmp_path / "out.mp4", log=lambda m: None, progress=False)
    got = pngs(tmp_path / "png")
    frames = to_tensor(read_clip(clip).frames)
    pipe = VideoPipeline.from_pretrained(model)
    align = lambda: Fusion(0.3, num_train_timesteps=1000)  # noqa: E731  (the default config's fusion)
    if mode == "one_pass":
        want = pipe(frames, options=sampling_options(cfg), alignment=align(), flow=FlowConfig(),
                    output_uint8=True).frames.numpy()
    else:
        assert cfg.runtime.anchor_weight == (0.8 if extra else 0.0)
        want = sample_windowed(pipe, frames, window=4, overlap=2, anchor_weight=cfg.runtime.anchor_weight,
                               make_alignment=align, options=sampling_options(cfg), flow=FlowConfig()).numpy()
    assert got.shape == want.shape == (9, 32, 32, 3)
    assert np.array_equal(got, want)


def test_cli_memory_is_bounded_by_the_window(tmp_path):
    """Through run_video.py: 200 frames peak no higher than 20 frames plus a little. Holding the clip's
    float outputs, conditioning frames and flows (the old CLI) would add ~0.6 MB per frame here (>100 MB).
    One frame per model call: auto would batch 7 of these small frames, whose ~180 MB of transient
    activations make the peak noisy (growth 7-42 MB over runs) without growing with the clip.
    A narrow UNet (8, 16 channels): the growth is the job's, not the model's (the same ~10 MB as with the
    (32, 64) one, and ~100 MB with the outputs, conditioning frames and flows kept), in a third of the time."""
    import long_clip

    model = tiny.save_residual_sr(tmp_path / "narrow", scale=2, channels=(8, 16))
    rows = [long_clip.cli_measure(n, 48, "windows", model=str(model), tmp=tmp_path,
                                  extra=("runtime.window=8", "runtime.overlap=2", "sampling.batch_size=1"))
            for n in (20, 200)]
    growth = rows[1]["rss_peak_mb"] - rows[0]["rss_peak_mb"]
    assert rows[1]["run_mode"] == "windows" and growth < 40, rows


def _late_video_clip(path, fps=20, frames=10, size=32):
    """Video frames shown from t = 0.5 s, an AAC tone (rising in pitch, so packets differ) from t = 0."""
    from fractions import Fraction

    import av

    tb = Fraction(1, 16000)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        v.codec_context.time_base = v.time_base = tb
        a = c.add_stream("aac", rate=16000)
        for i, img in enumerate(to_uint8(tiny.textured_clip(frames, size, shift=(0.5, 0.0)))):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = round((0.5 + i / fps) / tb)
            for packet in v.encode(f):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
        t = np.arange(16000 * 2) / 16000
        mux_tone(c, a, (0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)).astype(np.float32), "fltp")
    return path


def test_audio_is_kept_trimmed_and_absent_audio_is_handled(model, tmp_path):
    src = make_av_clip(tmp_path / "in.mp4", frames=48, fps=24, audio_s=2.0, size=32)
    cfg = job_cfg(model, "input.start=12", "input.end=36")
    rep = run_clip(cfg, src, tmp_path / "out.mp4", log=lambda m: None, progress=False)
    got = streams(tmp_path / "out.mp4")
    assert rep["video"]["audio"] == "copied" and got["video"][0] == "h264" and got["audio"][0] == "aac"
    assert abs(got["audio"][1] - 24 / 24) <= 1 / 24 + 0.025  # 24 frames at 24 fps: 1 s of audio, +-1 frame
    assert audio_packet_at(tmp_path / "out.mp4", 0.0) == audio_packet_at(src, 0.5)  # from frame 12 = 0.5 s on
    # a video stream that starts 0.5 s after its audio (a camera starting the sound first): the output's
    # audio starts where its first frame was shown, on the streams' shared timeline
    late = _late_video_clip(tmp_path / "late.mp4")
    run_clip(job_cfg(model), late, tmp_path / "late_out.mp4", log=lambda m: None, progress=False)
    assert audio_packet_at(tmp_path / "late_out.mp4", 0.0) == audio_packet_at(late, 0.5)
    silent = make_av_clip(tmp_path / "silent.mp4", frames=6, fps=24, audio_s=0, size=32)
    rep = run_clip(job_cfg(model), silent, tmp_path / "s.mp4", log=lambda m: None, progress=False)
    assert rep["video"]["audio"] == "input has no audio" and "audio" not in streams(tmp_path / "s.mp4")
    # a folder of images has no audio either; no "audio not copied" line (it said "no readable container")
    import cv2

    (tmp_path / "pngs").mkdir()
    for i, img in enumerate(to_uint8(tiny.textured_clip(3, 16))):
        cv2.imwrite(str(tmp_path / "pngs" / f"{i}.png"), img[..., ::-1])
    lines = []
    rep = run_clip(job_cfg(model), tmp_path / "pngs", tmp_path / "p.mp4", log=lines.append, progress=False)
    assert rep["video"]["audio"] == "input has no audio" and not any("audio not copied" in m for m in lines)


def test_output_fps_that_changes_the_speed_leaves_the_audio_out(model, tmp_path):
    """output.fps=8 on a 24 fps clip plays its 24 frames in 3 s: the copied audio was 3 s of the input's sound
    from the first frame on, out of step with the picture after the first frame, and the report said "copied".
    It is now left out, the reason in the report; output.fps equal to the input's rate keeps it."""
    src = make_av_clip(tmp_path / "in.mp4", frames=24, fps=24, audio_s=4.0, size=32)
    lines = []
    rep = run_clip(job_cfg(model, "output.fps=8"), src, tmp_path / "slow.mp4", log=lines.append, progress=False)
    assert "audio" not in streams(tmp_path / "slow.mp4") and "output.fps=8" in rep["video"]["audio"]
    assert any(m.startswith("audio not copied: output.fps=8") for m in lines)
    rep = run_clip(job_cfg(model, "output.fps=24"), src, tmp_path / "same.mp4", log=lambda m: None, progress=False)
    assert rep["video"]["audio"] == "copied" and "audio" in streams(tmp_path / "same.mp4")


def test_variable_frame_rate_input_keeps_its_timestamps(model, tmp_path):
    import av
    from fractions import Fraction

    pts = [0, 40, 80, 200, 240, 400]  # ms: a stall in the middle
    src = tmp_path / "vfr.mp4"
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        for i, (p, img) in enumerate(zip(pts, to_uint8(tiny.textured_clip(6, 32)))):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = p
            for pk in s.encode(f):
                out.mux(pk)
        for pk in s.encode():
            out.mux(pk)
    rep = run_clip(job_cfg(model, "flow.method=farneback"), src, tmp_path / "o.mp4", log=lambda m: None,
                   progress=False)
    assert rep["video"]["timestamps"] == "kept from the input"
    back = read_clip(tmp_path / "o.mp4")
    assert [round(float(p * back.time_base), 3) for p in back.pts] == [p / 1000 for p in pts]


def test_avi_output_and_file_backed_state_fallbacks(model, tmp_path):
    """An .avi output keeps the clip's frame rate (AVI has no presentation times: writing them declared
    600 fps); a long one-pass job whose scheduler cannot keep its state in files keeps it in memory
    with a log line instead of failing after the model loads."""
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(5, 16, shift=(0.5, 0.0))), 12)
    run_clip(job_cfg(model), clip, tmp_path / "out.avi", log=lambda m: None, progress=False)
    back = read_clip(tmp_path / "out.avi")
    assert len(back.frames) == 5 and back.fps == pytest.approx(12)
    lines = []
    rep = run_clip(job_cfg(model, "runtime.files_above=2", "scheduler.kind=dpm++"), clip, tmp_path / "dpm.mp4",
                   log=lines.append, progress=False)
    assert rep["frames"] == 5 and any("samples stay in memory" in m and "DDPM or DDIM" in m for m in lines)
    # windows asked for a clip that one window holds: one pass runs, and the report and the log say so
    lines = []
    rep = run_clip(job_cfg(model, "runtime.mode=windows", "runtime.window=8", "runtime.overlap=2"), clip,
                   tmp_path / "w.mp4", log=lines.append, progress=False)
    assert rep["mode"] == "one_pass" and any("(one pass)" in m for m in lines)



@pytest.mark.parametrize("fail", [None, "sampling", "png writer", "video writer", "closing the input"])
def test_the_temporary_state_folder_is_removed_on_every_exit(model, tmp_path, monkeypatch, fail):
    """Without --workdir a long one pass keeps its state in a temporary folder beside the output. An error or a
    Ctrl-C while the writers were being opened (after the folder was made, before the job's try) left it
    behind, with the video writer's temporary file: both are removed now, as on success and on an error
    while sampling. An error closing the input (after the outputs are in place) left the folder too: it is
    removed now, and the error still raised."""
    from pipelines import job, video_writer
    from pipelines.clip_source import ClipSource

    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 16)), 10)
    out = tmp_path / "out" / "o.mp4"
    sample = VideoPipeline.__call__

    def sampling(self, *args, state_dir=None, **kwargs):
        if fail == "sampling":
            assert any(state_dir.iterdir())
            raise RuntimeError("boom")
        return sample(self, *args, state_dir=state_dir, **kwargs)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VideoPipeline, "__call__", sampling)
    if fail == "png writer":
        monkeypatch.setattr(job, "FrameFolderWriter", interrupted)
    if fail == "video writer":
        monkeypatch.setattr(job, "VideoWriter", full)
    close = ClipSource.close

    def failing_close(self):
        close(self)
        raise OSError(5, "Input/output error")

    if fail == "closing the input":
        monkeypatch.setattr(ClipSource, "close", failing_close)
    real, made = video_writer.temp_sibling, []

    def recording(path, directory=False):
        folder = real(path, directory)
        if directory:
            made.append(folder)
        return folder

    monkeypatch.setattr(video_writer, "temp_sibling", recording)
    cfg = job_cfg(model, "runtime.files_above=0", f"output.frames_dir={tmp_path / 'out' / 'png'}")
    if fail is None:
        run_clip(cfg, clip, out, log=lambda m: None, progress=False)
    else:
        with pytest.raises((RuntimeError, KeyboardInterrupt, OSError)) as err:
            run_clip(cfg, clip, out, log=lambda m: None, progress=False)
    if fail == "closing the input":  # raised after every output was moved into place
        assert "Input/output error" in str(err.value)
    assert made and made[0].name.startswith(".o.mp4.tmp-")
    assert sorted(p.name for p in out.parent.iterdir()) == (
        ["o.json", "o.mp4", "o.yaml", "png"] if fail in (None, "closing the input") else [])


@pytest.mark.parametrize("fail", ["reference", "model"])
def test_an_error_before_sampling_closes_the_clips(model, tmp_path, monkeypatch, fail):
    """A reference of another length, or a model that fails to load, is found after the input and the reference
    were opened and before the job's try: their decoders were left to the garbage collector (a library caller
    keeping the exception kept them open). Both are closed now, as after a run."""
    from pipelines import job
    from pipelines.clip_source import ClipSource

    clip, ref = tmp_path / "in.mp4", tmp_path / "ref.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 16)), 10)
    write_video(ref, to_uint8(tiny.textured_clip(3 if fail == "model" else 4, 64)), 10)
    opened, closed = [], []
    real_init, real_close = ClipSource.__init__, ClipSource.close

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    def close(self):
        closed.append(self)
        real_close(self)

    def broken(*args, **kwargs):
        raise job.UsageError("model.path: broken")

    monkeypatch.setattr(ClipSource, "__init__", init)
    monkeypatch.setattr(ClipSource, "close", close)
    if fail == "model":
        monkeypatch.setattr(job, "load_model", broken)
    with pytest.raises(job.UsageError, match="frames, output has" if fail == "reference" else "broken"):
        run_clip(job_cfg(model), clip, tmp_path / "o.mp4", reference=ref, log=lambda m: None, progress=False)
    assert len(opened) == 2 and all(any(c is o for c in closed) for o in opened)


def test_windows_decode_the_clip_once(model, tmp_path, monkeypatch):
    """Windows mode re-reads each finished window's input for scoring: from the cache, not by decoding the
    clip again from its first frame (at most 2 x 48 decoded: the scan and the reads)."""
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(48, 16, shift=(0.5, 0.0))), 10)
    decoded = count_decoded_frames(monkeypatch)
    cfg = job_cfg(model, "sampling.num_inference_steps=1", "runtime.mode=windows", "runtime.window=8",
                  "runtime.overlap=2")
    rep = run_clip(cfg, clip, tmp_path / "out.mp4", log=lambda m: None, progress=False)
    assert rep["frames"] == 48 and len(decoded) <= 2 * 48
