"""Writing videos you can trust: H.264 through PyAV (FFmpeg's libraries, no external binary), the
input's audio copied in the same pass, verified before it replaces anything.

A video is encoded to a temporary sibling ``.<stem>.tmp-<pid>-<start>-XXXX<ext>``, closed, re-opened and
checked (the container parses and holds every frame written), fsynced, given the permissions the
umask allows, and only then committed: ``os.replace`` when replacing is allowed, otherwise a
no-replace link (fails if the target appeared meanwhile). On any failure the temporary file is
removed and an existing output is left as it was. Temporary files of dead processes (the pid and its
start time in their name: a pid alone is reused) are removed by :func:`remove_stale_temps`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import OutputAppeared, WriteError  # defined there: the command line catches them before importing torch

DEFAULT_CRF = 12
VIDEO_CODEC = "libx264"
PIX_FMT = "yuv420p"
# the stream's colour description (FFmpeg's enum values): the BT.601 matrix (smpte170m) at limited range,
# which append converts with, and BT.709 primaries and transfer (sRGB's primaries: the RGB frames')
COLOR_MATRIX, COLOR_RANGE, SRGB_PRIMARIES_TRC = 6, 1, 1
PROC_STATUS = "/proc/self/status"  # Linux 4.7 on: a "Umask:" line


@dataclass
class Written:
    path: Path
    frames: int
    size: tuple[int, int]  # (h, w) as encoded (even sides)
    padded: bool  # an odd side was padded by repeating the last row/column
    audio: str | None  # None: the input's audio was copied; else why there is none


def _umask() -> int:
    """The process umask, read from :data:`PROC_STATUS` where it is there: the only other way, setting it and
    setting it back, leaves a moment in which a file another thread (the writer, the prefetch) creates gets
    umask 0."""
    try:
        with open(PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode(folder: bool = False) -> int:
    """0o666 (a folder: 0o777) less the process umask: what an ordinary ``open(..., 'w')`` (``mkdir``)
    would create."""
    return (0o777 if folder else 0o666) & ~_umask()


def ordinary_mode(path: Path) -> None:
    """Give the file ``path``, or each file in the folder ``path`` (links aside), :func:`file_mode`, what an
    ordinary ``open(..., 'w')`` would, before it is moved into place: ``tempfile.mkstemp`` and safetensors (so
    also ``save_pretrained``) make files 0600. Folders are left as ``mkdir`` made them."""
    path = Path(path)
    mode = file_mode()
    if not path.is_dir():
        os.chmod(path, mode)
        return
    for root, _, names in os.walk(path):
        for name in names:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, mode)


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot: /proc/<pid>/stat's field 22), or None when there is
    no such process or it is a zombie (dead, only not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def _owner_tag() -> str:
    """``<pid>-<start time>`` of this process: a pid alone is reused (every container's first process is 1)."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid) or 0}"


def temp_sibling(path: Path, directory: bool = False) -> Path:
    """A fresh ``.<name>.tmp-<pid>-<start>-XXXX<ext>`` next to ``path`` (created, so the name is ours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.stem if not directory else path.name}.tmp-{_owner_tag()}-"
    if directory:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove this tool's temporary siblings of ``path`` whose writing process no longer runs."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for prefix, p in [(x, p) for x in {f".{path.stem}.tmp-", f".{path.name}.tmp-"}  # files; folders (temp_sibling)
                      for p in path.parent.glob(x + "*")]:
        parts = p.name[len(prefix):].split("-")  # pid, start time, random (earlier versions: pid, random)
        try:
            pid = int(parts[0])
        except ValueError:
            continue
        start = parts[1] if len(parts) >= 3 and parts[1].isdigit() else None
        if _alive(pid, start):
            continue
        try:
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether the process that wrote a temporary file runs: ``pid`` exists, is no zombie and, where its name
    recorded one, started at ``start`` (else the pid now belongs to another process)."""
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        return now is not None and (start is None or start == "0" or now == start)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def seal(tmp: Path, label: Path | None = None) -> None:
    """Give a finished ``tmp`` ordinary permissions and fsync it: the part of a commit that can fail for
    want of space, done before any output moves (``label``: the output named in the error)."""
    try:
        ordinary_mode(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"{label or tmp}: writing failed ({e.strerror or e})") from e


def commit(tmp: Path, path: Path, replace: bool) -> None:
    """Move a finished, :func:`seal`-ed ``tmp`` onto ``path``, replace or no-replace (the move keeps the
    file's inode, time and size)."""
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # fails if path exists, even if it appeared during the run
        except FileExistsError:
            raise OutputAppeared(f"{path} appeared while this run was writing it; kept that file (use --overwrite "
                             "to replace it)") from None
        os.unlink(tmp)
    try:  # the move itself is durable once its folder is
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # the file is in place; a folder that cannot be synced (some network mounts) loses nothing here


def _even(frames: np.ndarray) -> tuple[np.ndarray, bool]:
    odd = frames.shape[1] % 2, frames.shape[2] % 2
    if not any(odd):
        return frames, False
    return np.pad(frames, ((0, 0), (0, odd[0]), (0, odd[1]), (0, 0)), mode="edge"), True


class _AudioCopy:
    """Packets of the input's first audio stream within [start_s, start_s + duration_s), re-timed to 0, with
    the packet before the first one kept as the decoder's pre-roll (at a negative time): AAC and MP3 decode a
    frame from the previous one too (an mp4's first AAC packet, at -1024 samples, is that priming), so without
    it the output's first 20-60 ms of sound came out garbled; an Opus packet straddling the start is kept whole."""

    def __init__(self, src: Path, out, start_s: float, duration_s: float):
        import av

        self.reason = None
        self.container = None
        try:
            self.container = av.open(str(src))
        except (av.error.FFmpegError, OSError):
            self.reason = "input has no readable container"
            return
        streams = self.container.streams.audio
        if not streams:
            self.reason = "input has no audio"
            self.container.close()
            self.container = None
            return
        self.inp = streams[0]
        self.tb = self.inp.time_base
        try:
            self.out = out.add_stream_from_template(self.inp)
        except (av.error.FFmpegError, ValueError) as e:
            self.reason = f"the output container cannot hold the input's {self.inp.codec_context.name} audio ({e})"
            self.container.close()
            self.container = None
            return
        self.start = int(round(start_s / self.tb))
        self.end = None if duration_s is None else int(round((start_s + duration_s) / self.tb))
        self.packets = self.container.demux(self.inp)
        self.pending = None
        self.preroll = None  # the last packet wholly before the start, muxed ahead of the first kept one

    @classmethod
    def refused(cls, reason: str) -> "_AudioCopy":
        """No audio, for ``reason``."""
        copy = cls.__new__(cls)
        copy.reason, copy.container = reason, None
        return copy

    def mux_until(self, out, until_s: float | None) -> None:
        """Mux the copied packets that start before ``until_s`` (None: all that remain)."""
        if self.container is None:
            return
        while True:
            packet, self.pending = self.pending, None
            if packet is None:
                packet = next(self.packets, None)
                if packet is None:
                    return
            if packet.pts is None:
                continue
            if until_s is not None and (packet.pts - self.start) * self.tb > until_s:
                self.pending = packet
                return
            if self.end is not None and packet.pts >= self.end:
                continue
            if packet.pts + (packet.duration or 0) <= self.start:  # ends by the start: only a pre-roll candidate
                self.preroll = packet
                continue
            if self.preroll is not None:
                self._mux(out, self.preroll)
                self.preroll = None
            self._mux(out, packet)

    def _mux(self, out, packet) -> None:
        packet.pts -= self.start
        packet.dts = None if packet.dts is None else packet.dts - self.start
        packet.stream = self.out
        out.mux(packet)

    def end_at(self, duration_s: float) -> None:
        """Trim the copy to ``duration_s`` seconds (the video's duration, known when it closes)."""
        if self.container is not None:
            self.end = self.start + int(round(duration_s / self.tb))

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None


class VideoWriter:
    """A streaming H.264 writer: :meth:`append` frames as they are finished, :meth:`close` to verify and
    commit (see the module docstring). Used as a context manager, an exception aborts: the temporary
    file is removed and ``path`` is left as it was.

    ``pts`` (optional, per appended frame, in ``time_base`` units) keeps the input's timestamps, so a
    variable-frame-rate input stays variable; otherwise frame k is shown at k / fps. ``end_pts`` (with ``pts``)
    is where the last frame's display ends, as the input has it: the last packet gets that duration (without it,
    or without pts, the last frame lasts one frame at ``fps``). The audio of
    ``audio_from`` from ``audio_start_s`` on is interleaved as the video advances and trimmed to the
    video's duration when it closes.
    """

    def __init__(self, path, fps: float, *, crf: int = DEFAULT_CRF, audio_from=None, audio_start_s: float = 0.0,
                 replace: bool = True, time_base: Fraction | None = None, sample_aspect: Fraction | None = None,
                 end_pts: int | None = None):
        if not fps or fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.path, self.crf, self.replace = Path(path), crf, replace
        # at least the smallest rate this denominator holds: a tiny rate (input.stride 10**8: 1.2e-7 fps) must not
        # round to 0
        self.rate = max(Fraction(fps).limit_denominator(1001000), Fraction(1, 1001000))
        self.time_base, self.sample_aspect = time_base, sample_aspect  # sample_aspect: non-square pixels
        self.audio_from, self.audio_start_s = audio_from, audio_start_s
        self.tmp = temp_sibling(self.path)
        self.out = self.stream = self.audio = None
        self.count, self.size, self.padded = 0, None, False
        self.first_pts = self.last_s = self.last_pts = None
        self.end_pts = end_pts
        self.closed = self.finished = False

    def _start(self, h: int, w: int, with_audio: bool = True) -> None:
        import av

        try:
            self.out = av.open(str(self.tmp), mode="w")
            self.stream = self.out.add_stream(VIDEO_CODEC, rate=self.rate,
                                              options={"crf": str(self.crf), "preset": "medium"})
        except (av.error.FFmpegError, ValueError) as e:
            raise WriteError(f"{self.path}: cannot open an output container ({e})") from e
        self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, PIX_FMT
        cc = self.stream.codec_context  # what append's conversion does, said in the stream: players that guess
        cc.colorspace, cc.color_range = COLOR_MATRIX, COLOR_RANGE  # would take an HD-sized output for BT.709
        cc.color_primaries = cc.color_trc = SRGB_PRIMARIES_TRC
        if self.sample_aspect is not None:
            cc.sample_aspect_ratio = self.sample_aspect
        if self.time_base is not None:
            self.stream.codec_context.time_base = self.time_base
            self.stream.time_base = self.time_base
        if self.audio_from is None or not with_audio:
            return
        self.audio = _AudioCopy(Path(self.audio_from), self.out, self.audio_start_s, None)
        if self.audio.container is None:
            return
        try:  # some muxers refuse a copied codec only when the header is written (FLAC in .mov)
            self.out.start_encoding()
        except (av.error.FFmpegError, ValueError) as e:
            codec = self.audio.inp.codec_context.name
            self.audio.close()
            try:
                self.out.close()
            except (av.error.FFmpegError, OSError):
                pass
            self._start(h, w, with_audio=False)  # the same temporary file, reopened without the audio
            self.audio = _AudioCopy.refused(f"the output container cannot hold the input's {codec} audio ({e})")

    def append(self, frames: np.ndarray, pts: list[int] | None = None) -> None:
        """Encode uint8 RGB ``(n, H, W, 3)`` frames (odd sides padded by repeating the last row/column)."""
        import av

        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"expected uint8 frames (n>0, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        if pts is not None and (self.time_base is None or len(pts) != len(frames)):
            raise ValueError("pts need a time_base and one value per frame")
        frames, padded = _even(frames)
        if self.out is None:
            self.size, self.padded = frames.shape[1:3], padded
            self._start(*self.size)
        elif frames.shape[1:3] != self.size:
            raise ValueError(f"frame size {frames.shape[1:3]} differs from the first frames' {self.size}")
        try:
            for k, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
                    format=PIX_FMT, dst_colorspace="ITU601", dst_color_range="MPEG")  # BT.601, limited range
                if pts is not None:
                    self.first_pts = pts[k] if self.first_pts is None else self.first_pts
                    frame.pts = self.last_pts = pts[k] - self.first_pts
                    self.last_s = float(frame.pts * self.time_base)
                else:
                    frame.pts = self.count if self.time_base is None else int(self.count / self.rate / self.time_base)
                    self.last_s = self.count / float(self.rate)
                for packet in self.stream.encode(frame):
                    self.out.mux(packet)
                self.count += 1
                if self.audio is not None:
                    self.audio.mux_until(self.out, self.last_s)
        except (av.error.FFmpegError, OSError) as e:
            raise WriteError(f"{self.path}: writing the video failed ({e})") from e

    def _last_duration(self) -> int | None:
        """How long the last frame written is shown (time_base units) when ``end_pts`` says so and it is not one
        frame at the rate (what the muxers give it anyway: a constant-rate clip's file stays as it was)."""
        if self.end_pts is None or self.last_pts is None:
            return None
        last = self.end_pts - self.first_pts - self.last_pts
        return last if last > 0 and last != round(1 / (self.rate * self.time_base)) else None

    def duration_s(self) -> float:
        """Seconds of video written: the last frame's start plus its duration (``end_pts``) or one nominal frame."""
        last = self._last_duration()
        return (self.last_s or 0.0) + (1 / float(self.rate) if last is None else float(last * self.time_base))

    def close(self) -> Written:
        """:meth:`finish` and :meth:`commit`; returns what was written."""
        written = self.finish()
        self.commit()
        return written

    def finish(self) -> Written:
        """Flush, close, verify and seal (fsync) the temporary file; ``path`` is not touched yet (see :meth:`commit`:
        a job prepares every output first, so that a full disk cannot leave a mixed set)."""
        import av

        if self.out is None:
            raise WriteError(f"{self.path}: no frames were written")
        try:
            try:
                # x264 holds frames back, so the last frame's packet comes out here; its duration ends the
                # stream (mp4/mov: the last sample's, when it is last in decode order too; mkv: its block's)
                last = self._last_duration()
                for packet in self.stream.encode():
                    if last is not None and packet.pts == self.last_pts:
                        packet.duration = last
                    self.out.mux(packet)
                if self.audio is not None:
                    self.audio.end_at(self.duration_s())
                    self.audio.mux_until(self.out, None)
            except (av.error.FFmpegError, OSError) as e:
                raise WriteError(f"{self.path}: writing the video failed ({e})") from e
            finally:
                if self.audio is not None:
                    self.audio.close()
                try:
                    self.out.close()
                except (av.error.FFmpegError, OSError) as e:
                    raise WriteError(f"{self.path}: closing the video failed ({e})") from e
            verify(self.tmp, self.count, label=str(self.path))
            seal(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.finished = True
        reason = "no audio source given" if self.audio is None else self.audio.reason
        return Written(self.path, self.count, tuple(self.size), self.padded, reason)

    def commit(self) -> None:
        """Move the finished file onto ``path`` (see :func:`commit`)."""
        if not self.finished:
            raise RuntimeError(f"{self.path}: commit() before finish()")
        try:
            commit(self.tmp, self.path, self.replace)
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def abort(self) -> None:
        """Drop everything written so far (the temporary file); ``path`` is untouched."""
        if self.out is not None and not self.closed and not self.finished:
            try:
                self.out.close()
            except Exception:  # noqa: BLE001  (closing a broken container: nothing left to save)
                pass
        self.closed = True
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def write_h264(path, frames: np.ndarray, fps: float, *, crf: int = DEFAULT_CRF, audio_from=None,
               audio_start_s: float = 0.0, replace: bool = True, pts: list[int] | None = None,
               time_base: Fraction | None = None) -> Written:
    """Encode uint8 RGB ``(F, H, W, 3)`` frames as H.264 (yuv420p, constant rate factor ``crf``) at
    ``fps`` into ``path`` (.mp4/.mov/.mkv/.avi), with the audio of ``audio_from`` from ``audio_start_s``
    on, trimmed to the video's duration: one :class:`VideoWriter` call."""
    with VideoWriter(path, fps, crf=crf, audio_from=audio_from, audio_start_s=audio_start_s, replace=replace,
                     time_base=time_base) as w:
        w.append(frames, pts)
        return w.close()


def verify(path: Path, frames: int, label: str | None = None) -> None:
    """Raise WriteError unless ``path`` parses as a container with one video stream of ``frames`` packets."""
    import av

    label = label or str(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise WriteError(f"{label}: the written file holds no video stream")
            n = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    except (av.error.FFmpegError, OSError) as e:
        raise WriteError(f"{label}: the written file does not parse ({type(e).__name__}: {e})") from e
    if n != frames:
        raise WriteError(f"{label}: the written file holds {n} frames, {frames} were written")
