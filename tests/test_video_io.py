import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import video_io
from pipelines.video_io import (InputError, crop_to, pad_to_multiple, read_clip,
                                side_by_side, to_tensor, to_uint8, write_frames, write_video,
                                atomic_write_text)


def moving_clip(n=6, h=40, w=48):
    """A bright square moving right by 4 px per frame over a smooth gradient."""
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 80)], -1).astype(np.uint8)
    frames = np.repeat(base[None], n, axis=0)
    for t in range(n):
        frames[t, 10:26, 4 + 4 * t : 20 + 4 * t] = (250, 250, 30)
    return frames


def save_png(path, rgb):
    Image.fromarray(rgb).save(path)


def solid(value, h=8, w=10):
    return np.full((h, w, 3), value, np.uint8)


# ----------------------------------------------------------------------------- video


def test_mp4_roundtrip(tmp_path):
    frames = moving_clip()
    out = tmp_path / "clip.mp4"
    write_video(out, frames, fps=12)
    clip = read_clip(out)
    assert clip.frames.shape == frames.shape and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(12, rel=1e-3)
    assert clip.source == out
    diff = np.abs(clip.frames.astype(int) - frames.astype(int)).mean()
    assert diff < 4  # 2.7 measured; a BT.601/709 or full/limited range mix-up alone gives 8-9
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left


def test_mp4_odd_size_is_padded_not_cropped(tmp_path):
    frames = moving_clip(n=2, h=37, w=45)
    write_video(tmp_path / "odd.mp4", frames, fps=5)
    back = read_clip(tmp_path / "odd.mp4").frames
    assert back.shape == (2, 38, 46, 3)
    assert np.abs(back[:, :37, :45].astype(int) - frames).mean() < 4  # 2.9 measured


def test_video_range_stride_max_frames(tmp_path):
    frames = moving_clip(n=10)
    out = tmp_path / "clip.mp4"
    write_video(out, frames, fps=10)

    def ids(clip):  # the square's left edge tells the frame index
        return [round((int(np.argmax(f[18, :, 1] > 200)) - 4) / 4) for f in clip.frames]

    assert ids(read_clip(out)) == list(range(10))
    sub = read_clip(out, start=2, end=9, stride=3)
    assert ids(sub) == [2, 5, 8]
    assert sub.fps == pytest.approx(10 / 3, rel=1e-3)  # rate of the returned frames
    assert ids(read_clip(out, start=1, max_frames=2)) == [1, 2]
    with pytest.raises(InputError, match="no frames selected"):
        read_clip(out, start=10)


# ----------------------------------------------------------------------------- folders / GIF


def test_folder_natural_order_and_selection(tmp_path):
    for name, value in [("f10.png", 10), ("f2.png", 2), ("f1.png", 1), ("f3.jpg", 3)]:
        save_png(tmp_path / name, solid(value * 20))
    (tmp_path / "notes.txt").write_text("ignored")
    clip = read_clip(tmp_path)
    assert clip.fps is None
    assert [int(f[0, 0, 0]) // 20 for f in clip.frames] == [1, 2, 3, 10]
    sub = read_clip(tmp_path, start=1, end=4, stride=2)
    assert [int(f[0, 0, 0]) // 20 for f in sub.frames] == [2, 10]
    assert len(read_clip(tmp_path, max_frames=3).frames) == 3


def test_gif_frames_and_fps(tmp_path):
    path = tmp_path / "anim.gif"
    imgs = [Image.fromarray(solid(40 * (i + 1), 12, 16)) for i in range(5)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=50, loop=0)
    clip = read_clip(path)
    assert clip.frames.shape == (5, 12, 16, 3)
    assert clip.fps == pytest.approx(20)
    assert [int(f[0, 0, 0]) for f in clip.frames] == [40, 80, 120, 160, 200]
    sub = read_clip(path, start=1, stride=2)
    assert [int(f[0, 0, 0]) for f in sub.frames] == [80, 160]
    assert sub.fps == pytest.approx(10)


# ----------------------------------------------------------------------------- input errors


def one_line_error(call, *fragments):
    with pytest.raises(InputError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert str(fragment) in msg
    return msg


def test_input_errors(tmp_path):
    missing = tmp_path / "nope.mp4"
    one_line_error(lambda: read_clip(missing), missing, "no such file")

    corrupt = tmp_path / "bad.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    one_line_error(lambda: read_clip(corrupt), corrupt)

    weird = tmp_path / "clip.xyz"
    weird.write_bytes(b"x")
    one_line_error(lambda: read_clip(weird), weird, "unsupported")

    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: read_clip(empty), empty, "no frames selected")

    frames = tmp_path / "frames"
    frames.mkdir()
    save_png(frames / "a1.png", solid(0, 8, 10))
    save_png(frames / "a2.png", solid(0, 8, 10))
    one_line_error(lambda: read_clip(frames, start=5), "no frames selected")
    save_png(frames / "a3.png", solid(0, 9, 10))
    one_line_error(lambda: read_clip(frames), "a3.png", "10x9", "10x8")
    (frames / "a3.png").write_bytes(b"not a png")
    one_line_error(lambda: read_clip(frames), "a3.png", "decode")

    ok = frames / "a1.png"
    one_line_error(lambda: read_clip(ok, stride=0), "stride")
    one_line_error(lambda: read_clip(ok, start=-1), "start")
    one_line_error(lambda: read_clip(ok, max_frames=0), "max_frames")
    one_line_error(lambda: read_clip(ok, start=3, end=3), "no frames selected")
    assert isinstance(InputError("x"), ValueError)


# ----------------------------------------------------------------------------- tensors


def test_pad_crop_roundtrip():
    x = torch.rand(2, 3, 37, 50)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 40, 56) and size == (37, 50)
    assert torch.equal(crop_to(padded, size), x)
    assert torch.equal(padded[..., 37, :50], x[..., 35, :])  # reflect: row 37 mirrors row 35
    tiny, size = pad_to_multiple(torch.rand(1, 3, 2, 5), 8)  # too small to reflect
    assert tiny.shape == (1, 3, 8, 8) and torch.equal(tiny[..., 7, 7], tiny[..., 1, 4])
    same, _ = pad_to_multiple(x[..., :32, :48], 8)
    assert same.shape == (2, 3, 32, 48)


def test_tensor_conversion_roundtrip():
    frames = moving_clip(n=2)
    x = to_tensor(frames)
    assert x.shape == (2, 3, 40, 48) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), frames)
    assert to_uint8(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clamped


# ----------------------------------------------------------------------------- atomic writes


def test_write_frames_replaces_folder(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    frames = moving_clip(n=3)
    write_frames(folder, frames)
    assert sorted(os.listdir(folder)) == [f"frame_{i:05d}.png" for i in range(3)]
    assert np.array_equal(read_clip(folder).frames, frames)  # PNG is lossless
    assert os.listdir(tmp_path) == ["frames"]

    real_encode, calls = cv2.imencode, []

    def failing_encode(ext, img):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("encode failed")
        return real_encode(ext, img)

    monkeypatch.setattr(video_io.cv2, "imencode", failing_encode)
    with pytest.raises(RuntimeError, match="encode failed"):
        write_frames(folder, moving_clip(n=2))
    assert len(os.listdir(folder)) == 3  # the previous output is intact
    assert os.listdir(tmp_path) == ["frames"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "{}\n")
    atomic_write_text(path, "über\n")
    assert path.read_text(encoding="utf-8") == "über\n"
    assert os.listdir(path.parent) == ["report.json"]


def test_side_by_side_shapes():
    left = np.zeros((3, 10, 12, 3), np.uint8)
    right = np.full((3, 40, 48, 3), 255, np.uint8)
    for mode in ("nearest", "bicubic"):
        out = side_by_side(left, right, mode=mode)
        assert out.shape == (3, 40, 96, 3) and out.dtype == np.uint8
        assert out[:, :, :48].max() == 0 and out[:, :, 48:].min() == 255
    assert side_by_side(right, right).shape == (3, 40, 96, 3)
    # the modes differ: nearest repeats each input pixel 4x4 (the pixels as they are), bicubic interpolates
    textured = np.random.default_rng(0).integers(0, 256, (3, 10, 12, 3), dtype=np.uint8)
    near = side_by_side(textured, right, mode="nearest")[:, :, :48]
    assert np.array_equal(near, np.repeat(np.repeat(textured, 4, axis=1), 4, axis=2))
    assert not np.array_equal(side_by_side(textured, right, mode="bicubic")[:, :, :48], near)


# ----------------------------------------------------------------------------- the H.264 writer


def make_av_clip(path, frames=48, fps=24, audio_s=2.0, size=64):
    """A clip with an H.264 video stream and (audio_s > 0) a 440 Hz AAC track, made with PyAV."""
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        a = out.add_stream("aac", rate=48000) if audio_s else None
        for i in range(frames):
            img = np.full((size, size, 3), (i * 5) % 256, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        if a is not None:
            n = int(48000 * audio_s)
            sig = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000)).astype(np.float32)[None]
            for k in range(0, n, 1024):
                f = av.AudioFrame.from_ndarray(sig[:, k:k + 1024], format="fltp", layout="mono")
                f.sample_rate, f.pts = 48000, k
                for p in a.encode(f):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)
        for p in v.encode():
            out.mux(p)
    return path


def streams(path):
    import av

    with av.open(str(path)) as c:
        return {s.type: (s.codec_context.name, float(s.duration * s.time_base) if s.duration else None,
                         getattr(s.codec_context, "pix_fmt", None)) for s in c.streams}


def audio_packet_at(path, t):
    """The bytes of the first audio packet at or after ``t`` seconds: the audio is copied packet by packet,
    so the output's first packet is the input's packet at the start offset."""
    import av

    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        start = round(t / a.time_base)
        return next(bytes(p) for p in c.demux(a) if p.pts is not None and p.pts >= start and p.size)


def mux_tone(container, stream, samples: np.ndarray, fmt: str, rate: int = 16000) -> None:
    """Encode mono float ``samples`` into the audio ``stream`` in frames of 1024, then flush."""
    import av

    for k in range(0, len(samples), 1024):
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, k:k + 1024]), format=fmt, layout="mono")
        f.sample_rate, f.pts = rate, k
        for packet in stream.encode(f):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def clip_with_tone(path, codec: str, samples: np.ndarray, fmt: str, *, fps: int, n: int) -> None:
    """A clip of ``n`` moving 32x32 frames (H.264 at ``fps``) with ``samples`` as its ``codec`` audio at 16 kHz."""
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        a = out.add_stream(codec, rate=16000)
        for img in moving_clip(n=n, h=32, w=32):
            for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
        mux_tone(out, a, samples, fmt)


def test_audio_the_output_container_refuses_is_dropped_with_its_reason(tmp_path):
    """FLAC audio in .mkv copied into a .mov: the muxer refuses it only when the header is written; the
    video is still written, without audio, and the reason says why (was an error after sampling)."""
    src = tmp_path / "in.mkv"
    clip_with_tone(src, "flac", (0.3 * np.sin(np.arange(8192) / 5)).astype(np.float32), "flt", fps=12, n=6)
    w = write_video(tmp_path / "out.mov", moving_clip(n=6, h=32, w=32), 12, audio_from=src)
    got = streams(tmp_path / "out.mov")
    assert "audio" not in got and got["video"][0] == "h264" and len(read_clip(tmp_path / "out.mov").frames) == 6
    assert "cannot hold the input's flac audio" in w.audio
    write_video(tmp_path / "out.mkv", moving_clip(n=6, h=32, w=32), 12, audio_from=src)  # Matroska takes it
    assert streams(tmp_path / "out.mkv")["audio"][0] == "flac"


def test_h264_output_with_trimmed_audio(tmp_path):
    src = make_av_clip(tmp_path / "in.mp4")
    frames = moving_clip(n=12, h=64, w=64)
    w = write_video(tmp_path / "out.mp4", frames, 24, audio_from=src, audio_start_s=0.5)
    got = streams(tmp_path / "out.mp4")
    assert got["video"][0] == "h264" and got["video"][2] == "yuv420p"
    assert w.audio is None and got["audio"][0] == "aac"
    assert abs(got["audio"][1] - 12 / 24) <= 1 / 24 + 0.025  # same duration as the frames (+-1 frame, 1 AAC packet)
    # from the start offset: the output's audio begins with the input's packet at 0.5 s (a steady tone, so
    # only the packet bytes tell 0.5 s from 0 s)
    assert audio_packet_at(tmp_path / "out.mp4", 0.0) == audio_packet_at(src, 0.5) != audio_packet_at(src, 0.0)
    # codec round trip: the decoded frames are the written pixels within the codec's loss
    back = read_clip(tmp_path / "out.mp4").frames.astype(float)
    mse = ((back - frames) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / mse) > 35


def test_h264_without_input_audio_and_odd_sizes(tmp_path):
    src = make_av_clip(tmp_path / "silent.mp4", audio_s=0)
    w = write_video(tmp_path / "o.mp4", moving_clip(n=3, h=37, w=45), 10, audio_from=src)
    assert w.audio == "input has no audio" and "audio" not in streams(tmp_path / "o.mp4")
    assert w.padded and w.size == (38, 46)


def test_writer_follows_the_umask_and_refuses_a_target_that_appeared(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o.mp4"
        write_video(out, moving_clip(n=2), 10)
        assert oct(out.stat().st_mode & 0o777) == oct(0o644)
        atomic_write_text(tmp_path / "r.json", "{}")
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
        out.write_bytes(b"someone else's")  # appeared while a run without --overwrite was writing
        with pytest.raises(InputError, match="appeared while this run was writing"):
            write_video(out, moving_clip(n=2), 10, replace=False)
        assert out.read_bytes() == b"someone else's"
        assert sorted(os.listdir(tmp_path)) == ["o.mp4", "r.json"]  # no temp file left
    finally:
        os.umask(old)


def test_file_mode_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    """file_mode set the umask to 0 and back to read it: for that moment a file another thread (the writer,
    the prefetch) created got umask 0. It reads /proc/self/status now, and sets it only where that is missing."""
    from pipelines import video_writer

    set_umask = os.umask
    old = set_umask(0o027)
    try:
        status = Path("/proc/self/status")
        if not status.exists() or "Umask:" not in status.read_text():
            pytest.skip("no Umask line in /proc/self/status here")

        def refuse(mask):
            raise AssertionError("os.umask was called")

        monkeypatch.setattr(os, "umask", refuse)
        assert (video_writer.file_mode(), video_writer.file_mode(folder=True)) == (0o640, 0o750)
        monkeypatch.setattr(os, "umask", set_umask)
        monkeypatch.setattr(video_writer, "PROC_STATUS", str(tmp_path / "missing"))
        assert (video_writer.file_mode(), video_writer.file_mode(folder=True)) == (0o640, 0o750)
        assert set_umask(0o027) == 0o027  # set back
    finally:
        set_umask(old)


def test_failed_write_keeps_the_old_video(tmp_path, monkeypatch):
    """A write that fails verification (as on a full disk) leaves the earlier output and no temp file."""
    from pipelines import video_writer

    out = tmp_path / "out.mp4"
    write_video(out, moving_clip(n=3), 10)
    good = out.read_bytes()

    def short_file(path, frames, label=None):  # the container came out short
        raise video_writer.WriteError(f"{label}: the written file holds 1 frames, {frames} were written")

    monkeypatch.setattr(video_writer, "verify", short_file)
    with pytest.raises(InputError, match="holds 1 frames"):
        write_video(out, moving_clip(n=3), 10)
    assert out.read_bytes() == good and os.listdir(tmp_path) == ["out.mp4"]


def test_verify_catches_a_truncated_file(tmp_path):
    from pipelines.video_writer import WriteError, verify

    out = tmp_path / "o.mp4"
    write_video(out, moving_clip(n=6), 10)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(WriteError):
        verify(out, 6)


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path):
    import subprocess
    import sys

    from pipelines.video_writer import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".o.tmp-{dead}-abcd.mp4"
    stale.write_bytes(b"half a video")
    mine = tmp_path / f".o.tmp-{os.getpid()}-efgh.mp4"
    mine.write_bytes(b"being written")
    assert remove_stale_temps(tmp_path / "o.mp4") == [stale]
    assert not stale.exists() and mine.exists()
    # the state folder of a killed file-backed run (temp_sibling(directory=True) names it after o.mp4)
    folder = tmp_path / f".o.mp4.tmp-{dead}-ijkl"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"samples")
    assert remove_stale_temps(tmp_path / "o.mp4") == [folder] and not folder.exists() and mine.exists()


def _rotated_copy(src, dst):
    """``src`` (an mp4 the project wrote) with its track header's display matrix set to a quarter turn
    clockwise, as a phone stores a portrait clip (ISO/IEC 14496-12 tkhd matrix a=0, b=1, c=-1, d=0)."""
    import struct

    data = bytearray(Path(src).read_bytes())
    at = data.index(b"tkhd")
    assert data[at + 4] == 0  # version 0 header
    m = at + 4 + 4 + 4 * 5 + 8 + 8  # version/flags, times, track id, reserved, duration, reserved, layer...
    data[m:m + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    Path(dst).write_bytes(bytes(data))


def test_rotated_video_is_read_upright(tmp_path):
    """A clip whose container says "show me turned a quarter clockwise" is read as players show it: the
    stored frames turned clockwise (reference kind: FFmpeg's display-matrix convention, read by PyAV)."""
    import av

    frames = moving_clip(n=3, h=64, w=48)
    write_video(tmp_path / "plain.mp4", frames, 12)
    _rotated_copy(tmp_path / "plain.mp4", tmp_path / "rot.mp4")
    with av.open(str(tmp_path / "rot.mp4")) as c:
        assert next(c.decode(video=0)).rotation == -90  # PyAV: the matrix turns it 90 degrees clockwise
    plain, rot = read_clip(tmp_path / "plain.mp4").frames, read_clip(tmp_path / "rot.mp4").frames
    assert rot.shape == (3, 48, 64, 3)
    assert np.array_equal(rot, np.rot90(plain, -1, axes=(1, 2)))  # the same bitstream, turned clockwise


def count_decoded_frames(monkeypatch) -> list:
    """A list that grows by one entry per frame any ClipSource decodes (for the rest of the test)."""
    from pipelines.clip_source import ClipSource

    decoded, real = [], ClipSource._frames_of

    def counting(self, container, stream):
        for frame in real(self, container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(ClipSource, "_frames_of", counting)
    return decoded


def test_a_short_selection_stops_decoding_early_and_unordered_timestamps_are_dropped(tmp_path, monkeypatch):
    from pipelines.clip_source import ClipSource

    write_video(tmp_path / "long.mp4", moving_clip(n=40, h=16, w=16), 20)
    decoded = count_decoded_frames(monkeypatch)
    src = ClipSource(tmp_path / "long.mp4", start=3, stride=2, max_frames=2)
    # the scan stops at frame 8 (was all 40): the selection's frames 3 and 5 and frame 7, the next one it would
    # take, whose start ends the last one's display; then the reads
    assert len(src) == 2 and len(decoded) <= 8 + 4
    monkeypatch.undo()
    # AVI keeps no presentation times: with B-frames the decoded values come out of order (1, 3, 2, ...),
    # so they are dropped for the constant frame rate
    write_video(tmp_path / "b.avi", moving_clip(n=12, h=16, w=16), 20)
    avi = ClipSource(tmp_path / "b.avi")
    assert avi.pts is None and avi.fps == pytest.approx(20) and len(avi) == 12


def test_damaged_input_warns_or_fails_when_strict(tmp_path):
    frames = (np.random.default_rng(0).uniform(0, 255, (24, 64, 64, 3))).astype(np.uint8)  # incompressible
    src = tmp_path / "in.mp4"
    write_video(src, frames, 24)
    data = bytearray(src.read_bytes())
    at = data.index(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    lo, hi = at + size // 3, at + size - 16  # zero most of the media data, keep the index (moov) intact
    data[lo:hi] = bytes(hi - lo)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    clip = read_clip(bad)
    assert len(clip.frames) < 24 and clip.warnings and "declares 24 frames" in clip.warnings[0]
    with pytest.raises(InputError, match="input.strict"):
        read_clip(bad, strict=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and a kernel that allows it; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_keeps_the_earlier_video(tiny_disk):
    """A real full disk: replacing a good video with one that does not fit fails with one line and leaves
    the good video and no temporary file."""
    out = tiny_disk / "o.mp4"
    write_video(out, moving_clip(n=4), 10)
    good = out.read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, (40, 128, 128, 3), dtype=np.uint8)  # incompressible
    with pytest.raises(InputError, match="No space left on device") as info:
        write_video(out, noise, 10, crf=0)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == good and os.listdir(tiny_disk) == ["o.mp4"]


# ----------------------------------------------------------------------------- unusual media (a hunt on real
# inputs: each case was silently wrong, or a late or noisy error, before)


def test_written_video_says_its_colours_and_they_are_bt601_limited(tmp_path):
    """The H.264 stream is labelled (BT.601 matrix, limited range, BT.709 primaries and transfer): an
    unlabelled one is shown as BT.709 by browsers once it is HD-sized, shifting every colour. Reference
    kind: closed-form maths, the BT.601 luma Y = 16 + 219 (0.299 R + 0.587 G + 0.114 B) of pure primaries."""
    import av

    frames = np.zeros((2, 64, 96, 3), np.uint8)
    frames[:, :, :32], frames[:, :, 32:64], frames[:, :, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    write_video(tmp_path / "c.mp4", frames, fps=12)
    with av.open(str(tmp_path / "c.mp4")) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc) == (6, 1, 1, 1)
        y = next(c.decode(video=0)).to_ndarray(format="yuv420p")[:64]
    for col, weight in ((16, 0.299), (48, 0.587), (80, 0.114)):
        assert abs(int(y[32, col]) - (16 + 219 * weight)) <= 1.0  # BT.709 would give 63, 173, 32


def test_animated_or_multi_page_images_are_refused_not_cut_to_one_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    for name in ("a.webp", "m.tif"):
        with pytest.raises(InputError, match=r"an animated or multi-page image \(3 frames\) is not read"):
            read_clip(tmp_path / name)
    folder = tmp_path / "frames"
    folder.mkdir()
    frames[0].save(folder / "000.png")
    shutil.copy(tmp_path / "a.webp", folder / "001.webp")
    with pytest.raises(InputError, match="001.webp: an animated"):
        read_clip(folder)


def test_gif_frame_delays_are_kept(tmp_path):
    """Delays 1000, 40, 40, 40 ms: the frames start at 0, 1000, 1040, 1080 ms (before: one mean rate, the
    first frame shown 280 ms, the others 7x too slow); from the second frame on the rate is 25 fps."""
    from pipelines.clip_source import ClipSource

    frames = [Image.new("RGB", (16, 16), (60 * i, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=[1000, 40, 40, 40])
    src = ClipSource(tmp_path / "v.gif")
    assert src.pts == [0, 1000, 1040, 1080] and float(src.time_base) == 1e-3
    later = ClipSource(tmp_path / "v.gif", start=1)
    assert later.fps == pytest.approx(25.0) and later.pts is None  # even delays: a plain rate


def test_cover_art_of_an_audio_file_is_no_video(tmp_path):
    """An m4a-style file (AAC + an attached MJPEG picture) was upscaled as a 1-frame video at 90000 fps."""
    import av

    path = tmp_path / "song.mp4"
    with av.open(str(path), "w") as out:
        audio = out.add_stream("aac", rate=44100)
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        pic = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), "rgb24").reformat(format="yuvj420p")
        pic.pts = 0
        for p in [*cover.encode(pic), *cover.encode()]:
            out.mux(p)
        for i in range(20):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 44100, i * 1024
            for p in audio.encode(fr):
                out.mux(p)
        for p in audio.encode():
            out.mux(p)
    with pytest.raises(InputError, match=r"no video stream \(only a cover picture\)"):
        read_clip(path)


def test_a_second_video_stream_is_named_in_a_warning(tmp_path):
    import av

    from pipelines.clip_source import ClipSource

    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as out:
        streams = [out.add_stream("libx264", rate=10) for _ in range(2)]
        for s, (w, h) in zip(streams, ((32, 24), (64, 48))):
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(3):
            for s in streams:
                f = av.VideoFrame.from_ndarray(np.zeros((s.height, s.width, 3), np.uint8), "rgb24")
                f.pts = i
                for p in s.encode(f):
                    out.mux(p)
        for s in streams:
            for p in s.encode():
                out.mux(p)
    src = ClipSource(path)
    assert src.size == (24, 32)
    assert any("holds 2 video streams; the first (32x24) is read" in w for w in src.warnings)


def test_phone_photos_turned_by_exif_have_their_displayed_size(tmp_path):
    """A folder of portrait photos, one stored landscape with EXIF orientation 6 (a quarter turn), the
    others stored upright: all display 6 wide x 8 high, as decoding shows them (was refused by the size
    check, which read the stored size)."""
    turned = Image.new("RGB", (8, 6), (200, 0, 0))
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(tmp_path / "a.jpg", exif=exif)
    for name in ("b.jpg", "c.jpg"):
        Image.new("RGB", (6, 8), (0, 200, 0)).save(tmp_path / name)
    assert read_clip(tmp_path).frames.shape == (3, 8, 6, 3)


def test_rgba_tiff_keeps_its_colours_and_opencv_stays_quiet(tmp_path, capfd):
    """OpenCV's TIFF reader multiplies RGB by alpha ((200, 100, 50) at alpha 128 read as (100, 50, 25));
    PNG keeps the stored colours, and so does TIFF now (1 level of rounding). A float TIFF it cannot read
    is one InputError, without OpenCV's own warning on stderr."""
    rgba = np.zeros((8, 6, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 50), 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.tif")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    tif, png = read_clip(tmp_path / "x.tif").frames[0], read_clip(tmp_path / "x.png").frames[0]
    assert np.abs(tif.astype(int) - png.astype(int)).max() <= 1 and tuple(png[0, 0]) == (200, 100, 50)
    cv2.imwrite(str(tmp_path / "f.tif"), np.random.default_rng(0).random((8, 8, 3)).astype(np.float32))
    capfd.readouterr()
    with pytest.raises(InputError, match="cannot decode image"):
        read_clip(tmp_path / "f.tif")
    assert capfd.readouterr().err == ""


def test_hdr_clips_are_named_in_a_warning(tmp_path):
    """A clip tagged PQ (HDR10) or HLG was read as SDR without a word (a phone's HDR clip comes out washed
    out); the run now says so. The clips are written with PyAV, their transfer tag set directly."""
    import av

    from pipelines.clip_source import ClipSource

    for trc, name in ((16, "PQ (HDR10)"), (18, "HLG"), (1, None)):
        path = tmp_path / f"t{trc}.mp4"
        with av.open(str(path), "w") as out:
            s = out.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            s.codec_context.color_trc = trc
            for i in range(2):
                f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "rgb24")
                f.pts = i
                for p in s.encode(f):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
        warned = [w for w in ClipSource(path).warnings if "HDR" in w or "HLG" in w]
        assert warned == ([] if name is None else [f"t{trc}.mp4 is HDR ({name}); it is read as SDR without tone "
                                                   "mapping, so the output will look washed out"])


@pytest.mark.parametrize("ext, fmt, codec", [(".ts", "mpegts", "libx264"), (".mts", "mpegts", "libx264"),
                                              (".mpg", "mpeg", "mpeg2video"), (".3gp", "3gp", "mpeg4"),
                                              (".m4v", "mp4", "libx264"), (".flv", "flv", "flv")])
def test_camera_and_broadcast_containers_are_read(tmp_path, ext, fmt, codec):
    """Containers FFmpeg reads but the extension list refused (exit 2, "unsupported file type"): camcorder
    AVCHD (.mts), broadcast transport streams (.ts, whose timeline starts after 0), DVD-style MPEG-2
    program streams, phone .3gp, iTunes .m4v, Flash video. Written with PyAV directly; read back frame
    for frame, at their rate, and a .ts's AAC audio copied into the written mp4."""
    import av

    src, frames = tmp_path / f"in{ext}", moving_clip(n=6, h=32, w=32)
    with av.open(str(src), "w", format=fmt) as out:
        v = out.add_stream(codec, rate=25)
        v.width = v.height = 32
        v.pix_fmt, v.bit_rate = "yuv420p", 4_000_000  # the default rate blurs 32 px frames under 25 dB
        a = out.add_stream("aac", rate=16000) if fmt == "mpegts" else None
        for img in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        if a is not None:
            mux_tone(out, a, (0.3 * np.sin(np.arange(8192) / 5)).astype(np.float32), "fltp")
    clip = read_clip(src)
    assert clip.frames.shape == (6, 32, 32, 3) and clip.fps == pytest.approx(25)
    mse = ((clip.frames.astype(float) - frames) ** 2).mean(axis=(1, 2, 3))
    assert (10 * np.log10(255 ** 2 / mse) > 25).all()  # each frame is its own (the square moves 4 px a frame)
    if fmt == "mpegts":
        w = write_video(tmp_path / "out.mp4", clip.frames, 25, audio_from=src)
        assert w.audio is None and streams(tmp_path / "out.mp4")["audio"][0] == "aac"


def _display_p3_icc(gamma=2.2) -> tuple[bytes, np.ndarray]:
    """An ICC v2 matrix/TRC monitor profile with Display P3's primaries (D65 white, Bradford-adapted to the
    D50 connection space) and a pure-power tone curve, built from the ICC spec's layout (Pillow can make
    only sRGB/LAB/XYZ profiles and none ship on this machine); also its linear RGB -> XYZ (D65) matrix."""
    import struct

    def xyz(x, y):
        return np.array([x / y, 1.0, (1 - x - y) / y])

    prim = np.stack([xyz(0.680, 0.320), xyz(0.265, 0.690), xyz(0.150, 0.060)], 1)
    d65, d50 = xyz(0.3127, 0.3290), np.array([0.9642, 1.0, 0.8249])
    to_xyz = prim * np.linalg.solve(prim, d65)  # columns scaled so that RGB = 1 is the white
    brad = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    adapt = np.linalg.inv(brad) @ np.diag((brad @ d50) / (brad @ d65)) @ brad
    cols = adapt @ to_xyz

    def s15(v):
        return struct.pack(">3i", *(int(round(c * 65536)) for c in v))

    text = b"Display P3 (test)"
    desc = (b"desc" + bytes(4) + struct.pack(">I", len(text) + 1) + text + b"\0" + bytes(8) + bytes(3) + bytes(67))
    curv = b"curv" + bytes(4) + struct.pack(">IH", 1, int(round(gamma * 256))) + bytes(2)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + s15(d50)), (b"cprt", b"text" + bytes(4) + b"none\0\0\0\0")]
    tags += [(name, b"XYZ " + bytes(4) + s15(cols[:, i])) for i, name in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))]
    tags += [(name, curv) for name in (b"rTRC", b"gTRC", b"bTRC")]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for name, data in tags:
        data += bytes(-len(data) % 4)
        table += name + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
              + bytes(24) + struct.pack(">I", 0) + s15(d50) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body, to_xyz


def test_an_embedded_display_p3_profile_is_converted_to_srgb(tmp_path):
    """A phone photo stored in Display P3 was read as if its numbers were sRGB (dull colours in the output,
    which players show as sRGB/BT.709). Colours now match the closed form P3 -> XYZ -> sRGB within 2 levels
    (LittleCMS does the conversion; the profile is built here from the ICC layout); an sRGB-profiled image
    is kept bit for bit."""
    from PIL import ImageCms

    icc, p3_to_xyz = _display_p3_icc()
    colours = np.array([[200, 100, 50], [60, 160, 90], [128, 128, 128], [90, 40, 160]], np.uint8)
    img = np.repeat(colours[:, None], 8, axis=1)  # 4 x 8 pixels, one colour per row
    Image.fromarray(img).save(tmp_path / "p3.png", icc_profile=icc)
    Image.fromarray(img).save(tmp_path / "p3.jpg", icc_profile=icc, quality=100, subsampling=0)
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(img).save(tmp_path / "srgb.png", icc_profile=srgb_icc)

    srgb_to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    lin = np.linalg.solve(srgb_to_xyz, p3_to_xyz @ ((colours / 255.0) ** 2.2).T).T.clip(0, 1)
    want = 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    assert np.abs(want - colours).max() > 20  # the conversion matters: P3's numbers are not sRGB's
    got = read_clip(tmp_path / "p3.png").frames[0][:, 0].astype(float)
    assert np.abs(got - want).max() <= 2, (got, want)
    got_jpg = read_clip(tmp_path / "p3.jpg").frames[0][:, 0].astype(float)
    assert np.abs(got_jpg - want).max() <= 4  # JPEG's own loss on top
    assert np.array_equal(read_clip(tmp_path / "srgb.png").frames[0], img)


def test_a_display_p3_png_with_megabytes_of_metadata_text_is_converted(tmp_path):
    """A PNG whose metadata text is above Pillow's 1 MB limit (ImageMagick's "Raw profile type app1" holds
    a camera's whole EXIF block, megabytes with a preview) failed Pillow's open with a ValueError, which the
    header read took for "no profile": its Display P3 colours were read as sRGB, silently. The profile is
    now read and converted as for the same image without the text."""
    from PIL import PngImagePlugin

    icc, _ = _display_p3_icc()
    colours = np.array([[200, 100, 50], [60, 160, 90], [90, 40, 160]], np.uint8)
    img = np.repeat(colours[:, None], 8, axis=1)
    Image.fromarray(img).save(tmp_path / "plain.png", icc_profile=icc)
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type app1", os.urandom(1 << 20).hex(), zip=True)  # 2 MB of text
    Image.fromarray(img).save(tmp_path / "text.png", icc_profile=icc, pnginfo=info)

    want = read_clip(tmp_path / "plain.png").frames[0]
    assert np.abs(want.astype(int) - img).max() > 20  # converted
    assert np.array_equal(read_clip(tmp_path / "text.png").frames[0], want)


def test_temps_of_a_reused_pid_or_a_zombie_are_stale(tmp_path):
    """A run in a container is pid 1 every time, so a killed run's temporaries (pid 1 in their name) were
    taken for the new run's own and kept forever; a killed process not yet reaped (a zombie, for about a
    second under `timeout`) counted as running. Names now carry the process's start time too."""
    import subprocess
    import sys
    import time

    from pipelines.video_writer import _start_time, remove_stale_temps, temp_sibling

    mine = temp_sibling(tmp_path / "o.mp4")  # this process's own, with its start time
    same_pid_other_run = tmp_path / f".o.tmp-{os.getpid()}-{int(_start_time(os.getpid())) + 1}-abcdefgh.mp4"
    same_pid_other_run.write_bytes(b"a killed run's, in the previous container")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while _start_time(child.pid) is not None and Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
        time.sleep(0.05)  # until it has exited, unreaped
    zombie = tmp_path / f".o.tmp-{child.pid}-abcdefgh.mp4"
    zombie.write_bytes(b"written by the zombie")
    try:
        assert sorted(remove_stale_temps(tmp_path / "o.mp4")) == sorted([same_pid_other_run, zombie])
        assert mine.exists()
    finally:
        child.wait()


def test_a_png_folder_gets_the_mode_mkdir_gives(tmp_path):
    """Under umask 033 the folder came out 755 (its mode was derived from a file's), where mkdir gives 744."""
    import os

    from pipelines.video_io import write_frames

    old = os.umask(0o033)
    try:
        write_frames(tmp_path / "png", np.zeros((1, 4, 4, 3), np.uint8))
        (tmp_path / "made").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "png").stat().st_mode & 0o777 == (tmp_path / "made").stat().st_mode & 0o777 == 0o744


def test_a_full_disk_under_file_backed_state_says_so(tmp_path, monkeypatch):
    """A short write was reported as "short write of row 1" (exit 1, internal), never naming the full disk:
    it is retried, and the disk's own error comes through with the file's name."""
    import errno
    import os

    from pipelines import filestore
    from pipelines.video_writer import WriteError

    f = filestore.FileTensor(tmp_path / "x.bin", (2, 8))
    real, calls = os.pwrite, []

    def nearly_full(fd, data, offset):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, data[:4], offset)  # part of the row fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filestore.os, "pwrite", nearly_full)
    with pytest.raises(WriteError, match=r"x\.bin: writing row 0 failed \(No space left on device\)"):
        f[0] = torch.ones(8)
    assert calls == [32, 28]


def decoded_audio(path) -> tuple[float, np.ndarray]:
    """The first audio stream decoded by PyAV: its first sample's time and its first channel's samples."""
    import av

    with av.open(str(path)) as c:
        frames = list(c.decode(c.streams.audio[0]))
    return float(frames[0].time), np.concatenate([f.to_ndarray()[0] for f in frames])


def test_copied_audio_keeps_the_packet_before_its_start_as_pre_roll(tmp_path):
    """AAC decodes each frame with the previous one: an mp4's first AAC packet (at -1024 samples, the encoder's
    priming) and, for a later start, the packet just before it were dropped, so the output's first 48 ms of
    sound were garbled (measured: up to 1.1x the tone's amplitude off). The reference is PyAV's decoding of
    the input: the output's audio now decodes to the input's samples exactly, from its start and from 0.5 s."""
    import av

    src = tmp_path / "in.mp4"
    t = np.arange(16000) / 16000
    clip_with_tone(src, "aac", (0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t)).astype(np.float32), "fltp", fps=10, n=10)
    with av.open(str(src)) as c:
        assert next(p.pts for p in c.demux(c.streams.audio[0])) == -1024  # the priming packet
    t0, want = decoded_audio(src)
    assert t0 == 0.0
    for start in (0.0, 0.5):
        out = tmp_path / f"out{start}.mp4"
        write_video(out, moving_clip(n=4, h=32, w=32), 10, audio_from=src, audio_start_s=start)
        t1, got = decoded_audio(out)
        first = round(start * 16000)
        assert t1 == 0.0 and len(got) >= 4 * 1600
        assert np.abs(got[:4096] - want[first:first + 4096]).max() < 1e-6, start


def test_a_clip_whose_first_frames_are_damaged_is_read_from_its_first_good_keyframe(tmp_path):
    """The first keyframe's data zeroed (a recording whose start was damaged): PyAV's decoder refuses those
    packets and decodes the next group of pictures; the reader stopped at the first refusal, so the clip read
    no frame at all (exit 2, "cannot decode any frame"). Now the damaged packets are skipped, as players do:
    frames 4..23 are read, with their timestamps, and the container's 24 are named in a warning."""
    import av

    from pipelines.clip_source import ClipSource

    frames = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    good = tmp_path / "good.mp4"
    with av.open(str(good), "w") as out:
        v = out.add_stream("libx264", rate=10, options={"g": "4", "keyint_min": "4", "sc_threshold": "0", "bf": "0"})
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        for img in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
    data = bytearray(good.read_bytes())
    at = data.index(b"mdat") + 4
    data[at:at + 3000] = bytes(3000)  # the first keyframe (about 3.3 kB of noise) and its P-frames' start
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with av.open(str(bad)) as c:  # the reference: PyAV, packet by packet, past the packets it refuses
        times = []
        for packet in c.demux(c.streams.video[0]):
            try:
                times += [round(float(f.time), 3) for f in packet.decode()]
            except av.error.InvalidDataError:
                pass
    assert times == [round(0.1 * i, 3) for i in range(4, 24)]
    src = ClipSource(bad)
    assert len(src) == 20 and [round(float(p * src.time_base), 3) for p in src.pts] == times
    assert any("declares 24 frames but only 20 decode" in w for w in src.warnings)
    assert np.array_equal(src.read(0, 20), read_clip(good).frames[4:])


def test_a_mirroring_display_matrix_mirrors_rather_than_turns(tmp_path):
    """A display matrix that mirrors the picture left-right (a = -1, d = 1: a selfie camera's, or an editor's
    flip) was read as a half turn (PyAV's frame.rotation says -180 for it), so the output came out upside
    down. Reference: the matrix itself (ISO/IEC 14496-12; FFmpeg maps a stored (x, y) to (a x + c y, b x + d y)),
    which FFmpeg's own autorotation follows (hflip for m[0] < 0, vflip for m[4] < 0, a transpose for a quarter
    turn with a flip); the quarter and half turns read as before."""
    import struct

    import av

    from pipelines.clip_source import ClipSource

    frames = moving_clip(n=2, h=32, w=48)
    write_video(tmp_path / "plain.mp4", frames, 12)
    plain = read_clip(tmp_path / "plain.mp4").frames
    cases = {"hflip": ((-1, 0, 0, 1), plain[:, :, ::-1], 0, True),
             "vflip": ((1, 0, 0, -1), plain[:, ::-1], 180, True),
             "transpose": ((0, 1, 1, 0), plain.transpose(0, 2, 1, 3), 270, True),
             "clockwise": ((0, 1, -1, 0), np.rot90(plain, -1, axes=(1, 2)), 270, False),
             "half": ((-1, 0, 0, -1), plain[:, ::-1, ::-1], 180, False)}
    for name, ((a, b, c, d), want, turn, mirrored) in cases.items():
        data = bytearray((tmp_path / "plain.mp4").read_bytes())
        m = data.index(b"tkhd") + 4 + 4 + 4 * 5 + 8 + 8
        data[m:m + 36] = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
        (tmp_path / f"{name}.mp4").write_bytes(bytes(data))
        if name == "hflip":
            with av.open(str(tmp_path / "hflip.mp4")) as container:
                assert next(container.decode(video=0)).rotation == -180  # what the old code turned by
        src = ClipSource(tmp_path / f"{name}.mp4")
        assert np.array_equal(src.read(0, 2), want), name
        assert (src.rotation, src.mirrored) == (turn, mirrored), name


def encode_timed(path, codec, pix_fmt, starts, durations, audio_s=0.0):
    """A video whose frames start at ``starts`` and last ``durations`` (in 1/1000 s; a GIF's in 1/100 s) as the
    file says them (each packet's duration), with ``audio_s`` seconds of AAC (mp4), made with PyAV."""
    import av
    from fractions import Fraction

    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=10)
        v.width = v.height = 32
        v.pix_fmt = pix_fmt
        v.codec_context.time_base = v.time_base = Fraction(1, 100 if codec == "gif" else 1000)
        a = out.add_stream("aac", rate=16000) if audio_s else None
        packets = []
        for img, start in zip(moving_clip(n=len(starts), h=32, w=32), starts):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = start
            packets += v.encode(frame)
        for packet in packets + list(v.encode()):
            packet.duration = durations[starts.index(packet.pts)]
            out.mux(packet)
        if a is not None:
            mux_tone(out, a, (0.3 * np.sin(np.arange(int(16000 * audio_s)) / 5)).astype(np.float32), "fltp")
    return path


def rewrite(src, out, chunk=2, **select):
    """What a job does with the selected frames: read, then written in chunks with the input's timestamps (and
    its audio)."""
    from pipelines.clip_source import ClipSource
    from pipelines.video_writer import VideoWriter

    with ClipSource(src, **select) as clip:
        w = VideoWriter(out, clip.fps, time_base=clip.time_base, end_pts=clip.end_pts,
                        audio_from=src if clip.is_video else None, audio_start_s=float(clip.pts[0] * clip.time_base))
        for a in range(0, len(clip), chunk):
            w.append(clip.read(a, min(a + chunk, len(clip))), clip.pts[a:a + chunk])
        return w.close()


def timing(path):
    """PyAV's reading of a video: its frames' start times, the last one's duration and the container's duration
    (s), and the audio's end (s, None without audio)."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = list(c.decode(v))
        starts = [round(float(f.pts * v.time_base), 4) for f in frames]
        last, duration = round(float(frames[-1].duration * v.time_base), 4), c.duration / 1e6
    with av.open(str(path)) as c:
        audio = c.streams.audio[0] if c.streams.audio else None
        ends = [] if audio is None else [p.pts + p.duration for p in c.demux(audio) if p.pts is not None]
        return starts, last, duration, float(max(ends) * audio.time_base) if ends else None


def test_a_gifs_last_frame_keeps_its_own_delay(tmp_path):
    """Delays 500/100/50/300 ms: the output ended 0.8875 s in, its last frame shown for one frame at the clip's
    mean rate (237.5 ms) instead of its own 300 ms. Reference: PyAV's reading of the GIF; a selection that stops
    before the end lasts until the next frame's start."""
    src = encode_timed(tmp_path / "in.gif", "gif", "rgb8", [0, 50, 60, 65], [50, 10, 5, 30])
    want = timing(src)
    assert want[1:3] == (0.3, 0.95)
    for ext in ("mp4", "mkv"):
        rewrite(src, tmp_path / f"out.{ext}")
        starts, last, duration, _ = timing(tmp_path / f"out.{ext}")
        if ext == "mp4":  # x264 decodes the last frame before the two B-frames shown ahead of it, so its sample's
            assert duration == pytest.approx(0.95, abs=1e-3)  # duration is a decode-order gap: the file's end tells
        else:
            assert (starts, last, duration) == (want[0], 0.3, pytest.approx(0.95, abs=1e-3))
    rewrite(src, tmp_path / "first3.mkv", end=3)
    starts, last, _, _ = timing(tmp_path / "first3.mkv")
    assert (starts[-1], last) == (0.6, 0.05)  # frame 2 until frame 3's start


def test_a_variable_rate_videos_last_frame_keeps_its_duration(tmp_path):
    """Frames at 0, 40, 80, 200, 240, 400 ms, the last one shown for 100 ms: the output's lasted 63 ms (one frame
    at the mean rate). Reference: PyAV's reading of the input (the last packet's duration); the copied audio is
    trimmed to the video's new end; a trimmed selection's last frame lasts until the next frame's start."""
    starts = [0, 40, 80, 200, 240, 400]
    src = encode_timed(tmp_path / "in.mp4", "libx264", "yuv420p", starts, [40, 40, 120, 40, 160, 100], audio_s=1.0)
    want = timing(src)
    assert want[0] == [s / 1000 for s in starts] and want[1] == 0.1
    for ext in ("mp4", "mov"):
        w = rewrite(src, tmp_path / f"out.{ext}", chunk=4)
        got = timing(tmp_path / f"out.{ext}")
        assert got[:2] == want[:2] and w.audio is None, ext
        assert 0.5 <= got[3] < 0.5 + 0.064 + 1e-3  # AAC in packets of 64 ms: the last one kept starts before 0.5 s
    rewrite(src, tmp_path / "first4.mp4", end=4)
    starts, last, _, _ = timing(tmp_path / "first4.mp4")
    assert starts[-1] + last == pytest.approx(0.24)
