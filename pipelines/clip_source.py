"""Lazy clip reading: the selected frames of a video, image folder, GIF or image, decoded on demand.

A :class:`ClipSource` knows how many frames the selection (``start``, ``end``, ``stride``,
``max_frames``) holds, their rate and, for videos, their presentation timestamps, without keeping
any frame: :meth:`ClipSource.read` decodes the frames ``[a, b)`` of the selection when asked, so a
job working window by window holds one window of input. Videos are decoded with PyAV (FFmpeg's
libraries; the containers of video_io.VIDEO_EXTS); a first pass decodes the stream once without keeping
frames, to count the frames that really decode (a damaged file declares more than that) and to
record their timestamps (variable frame rate is kept, not assumed). Reading forwards is
sequential; the last frames read are cached so overlapping windows do not decode twice.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from .video_io import (IMAGE_EXTS, VIDEO_EXTS, InputError, _check_range, _decode_image, _natural_key, _open_pil,
                       _nothing_selected, _read_gif)


class ClipSource:
    """Selected frames of ``path``; uint8 ``(n, H, W, 3)`` RGB from :meth:`read`."""

    def __init__(self, path, start: int = 0, end: int | None = None, stride: int = 1,
                 max_frames: int | None = None, strict: bool = False, cache: int = 16):
        self.path = Path(path)
        _check_range(self.path, start, end, stride, max_frames)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or directory")
        self.warnings: list[str] = []
        self.time_base: Fraction | None = None
        self.pts: list[int] | None = None  # presentation timestamps of the selected frames (videos)
        self.sample_aspect: Fraction | None = None  # pixel aspect ratio when not square (videos)
        self.start_pts: int | None = None
        # where the last selected frame's display ends (with pts, in time_base units): the next frame's start
        # for a selection that stops before the clip's end, else the last frame's own duration as the input says
        self.end_pts: int | None = None
        self.rotation = 0  # degrees counterclockwise applied to decoded video frames (display matrix)
        self.mirrored = False  # the display matrix also mirrors them (applied first, left-right)
        self._cache: dict[int, np.ndarray] = {}
        self._cache_size = cache
        self._decoder = None
        sel = (start, end, stride, max_frames)
        if self.path.is_dir():
            self._files = self._folder_files()
            self._index = self._select(len(self._files), *sel)
            self.fps = None
            self._kind = "images"
        else:
            ext = self.path.suffix.lower()
            if ext in VIDEO_EXTS:
                self._kind = "video"
                self._scan_video(*sel)
            elif ext == ".gif":
                self._kind = "memory"
                frames, self.fps, pts, end_ms = _read_gif(self.path, start, end, stride, max_frames)
                self._frames, self.time_base = frames, Fraction(1, 1000)
                self.pts = pts if len(set(np.diff(pts))) > 1 else None  # uneven delays: kept as timestamps
                self.end_pts = end_ms if self.pts is not None else None
                self._index = list(range(len(frames)))
            elif ext in IMAGE_EXTS:
                self._kind, self._files = "images", [self.path]
                self._index = self._select(1, *sel)
                self.fps = None
            else:
                raise InputError(
                    f"{self.path}: unsupported file type '{self.path.suffix}' (expected a video "
                    f"{'/'.join(VIDEO_EXTS)}, a .gif, an image, or a folder of images)")
        if self._kind == "images":
            self._check_image_sizes()
        if strict and self.warnings:
            raise InputError(f"{self.warnings[0]} (input.strict is set)")
        first = self.read(0, 1)[0]
        self.size = first.shape[:2]

    def __len__(self) -> int:
        return len(self._index)

    @property
    def is_video(self) -> bool:
        """A video container (which may hold audio), not images or a GIF."""
        return self._kind == "video"

    # ------------------------------------------------------------------ selection
    def _select(self, n: int, start, end, stride, max_frames) -> list[int]:
        chosen = list(range(n))[start:end:stride][:max_frames]
        if not chosen:
            raise _nothing_selected(self.path, start, n)
        return chosen

    def _folder_files(self) -> list[Path]:
        files = [p for p in self.path.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise InputError(f"{self.path}: no frames selected: the folder holds no images ({', '.join(IMAGE_EXTS)})")
        return sorted(files, key=lambda p: _natural_key(p.name))

    def _check_image_sizes(self) -> None:
        """All selected images the size of the first as displayed (EXIF orientation applied, as decoding
        does), and none animated (only its first frame would be read), from their headers, up front."""
        first = None
        for i in self._index:
            try:
                with _open_pil(self._files[i]) as im:
                    size, frames = im.size, getattr(im, "n_frames", 1)
                    # a quarter turn: decoding shows it sideways (Pillow's TIFF size already is the turned one)
                    if im.format != "TIFF" and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                        size = size[::-1]
            except (OSError, ValueError, SyntaxError):
                continue  # undecodable: reported with its name when read
            if frames > 1:
                raise InputError(f"{self._files[i]}: an animated or multi-page image ({frames} frames) is not read; "
                                 "convert it to a video or a folder of frames")
            if first is None:
                first = (size, self._files[i])
            elif size != first[0]:
                raise InputError(f"{self._files[i]}: image size {size[0]}x{size[1]} differs from "
                                 f"{first[0][0]}x{first[0][1]} of {first[1].name} (all frames must be the same size)")

    # ------------------------------------------------------------------ videos
    def _open(self):
        import av

        try:
            container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise InputError(f"{self.path}: cannot open video (corrupt or unsupported format)") from e
        moving = _moving_pictures(container)
        if not moving:
            cover = " (only a cover picture)" if container.streams.video else ""
            container.close()
            raise InputError(f"{self.path}: cannot open video: no video stream{cover}")
        stream = moving[0]
        stream.thread_type = "AUTO"
        return container, stream

    def _frames_of(self, container, stream):
        """Decoded frames in presentation order. A packet the decoder refuses is skipped, as players do (a clip
        whose first group of pictures is damaged still shows the rest; stopping there read no frame at all);
        data the container itself cannot read ends the frames quietly."""
        import av

        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets, None)
            except (av.error.FFmpegError, OSError):
                return
            if packet is None:
                return
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, OSError):
                continue
            yield from frames

    def _scan_video(self, start, end, stride, max_frames) -> None:
        container, stream = self._open()
        try:
            declared = stream.frames or 0
            self.time_base = stream.time_base
            if len(streams := _moving_pictures(container)) > 1:
                self.warnings.append(f"{self.path.name} holds {len(streams)} video streams; the first "
                                     f"({stream.codec_context.width}x{stream.codec_context.height}) is read")
            sar = stream.codec_context.sample_aspect_ratio  # non-square pixels: kept by the output
            hdr = {16: "PQ (HDR10)", 18: "HLG"}.get(int(stream.codec_context.color_trc or 0))
            if hdr:  # FFmpeg's transfer enum: SMPTE ST 2084, ARIB STD-B67
                self.warnings.append(f"{self.path.name} is HDR ({hdr}); it is read as SDR without tone mapping, "
                                     "so the output will look washed out")
            self.sample_aspect = sar if sar and sar != 1 else None
            rate = stream.average_rate or stream.guessed_rate
            # decode no further than the last frame the selection can take, and the next one it would take or
            # where its range ends (that frame's start ends the last one's display)
            stop = end if max_frames is None else start + (max_frames - 1) * stride + 1
            stop = stop if end is None else min(stop, end)
            limit = None if stop is None else stop + stride if end is None else min(stop + stride, end + 1)
            pts, last, clip_end = [], None, None
            for last in self._frames_of(container, stream):
                pts.append(last.pts)
                if limit is not None and len(pts) >= limit:
                    break
            else:  # the clip ended: its last frame ends where the input says
                clip_end = None if last is None else _end_of(last, stream, container)
            n = len(pts) if stop is None else min(len(pts), stop)
        finally:
            container.close()
        if n == 0:
            raise InputError(f"{self.path}: cannot decode any frame (corrupt or unsupported video)")
        if declared > n and (stop is None or stop > n):
            self.warnings.append(f"{self.path}: the container declares {declared} frames but only {n} decode "
                                 "(damaged file?)")
        self._index = self._select(n, start, end, stride, max_frames)
        known = all(p is not None for p in pts)
        self.start_pts = pts[0] if known else None  # the stream's first frame
        # timestamps are kept only when they increase: AVI with B-frames yields decode-order values
        self.pts = [pts[i] for i in self._index] if known and all(a < b for a, b in zip(pts, pts[1:])) else None
        if self.pts is not None:  # the last frame stands for itself and the stride - 1 after it, as all do
            after = self._index[-1] + stride if end is None else min(self._index[-1] + stride, end)
            self.end_pts = pts[after] if after < len(pts) else clip_end
        self.fps = float(Fraction(rate) / stride) if rate else None  # exact: float(rate) / 10**400 overflows

    def _decode_to(self, source_index: int) -> np.ndarray:
        """The frame at ``source_index`` (in decode order of presentation), decoding forwards."""
        if self._decoder is None or self._decoder[2] > source_index:
            if self._decoder is not None:
                self._decoder[0].close()
            container, stream = self._open()
            self._decoder = [container, self._frames_of(container, stream), 0]
        container, frames, position = self._decoder
        for frame in frames:
            self._decoder[2] = position = position + 1
            if position - 1 == source_index:
                # upright as players show it: the display matrix (a phone's portrait flag) turns the
                # picture counterclockwise by frame.rotation degrees, and may mirror it
                img = frame.to_ndarray(format="rgb24")
                matrix = _display_matrix(frame)
                if matrix is not None:
                    img, self.rotation, self.mirrored = _displayed(img, *matrix)
                    return np.ascontiguousarray(img)
                self.rotation = int(round(getattr(frame, "rotation", 0) / 90)) * 90 % 360
                return np.ascontiguousarray(np.rot90(img, self.rotation // 90)) if self.rotation else img
        raise InputError(f"{self.path}: frame {source_index} no longer decodes (file changed while reading?)")

    # ------------------------------------------------------------------ reading
    def read(self, a: int, b: int) -> np.ndarray:
        """Frames ``[a, b)`` of the selection as uint8 ``(b - a, H, W, 3)``."""
        if not 0 <= a < b <= len(self):
            raise IndexError(f"frames [{a}, {b}) are outside the selection of {len(self)}")
        if self._kind == "memory":
            return self._frames[a:b]
        out = []
        for k in range(a, b):
            if k not in self._cache:
                i = self._index[k]
                img = self._decode_to(i) if self._kind == "video" else _decode_image(self._files[i])
                size = getattr(self, "size", img.shape[:2])
                if img.shape[:2] != size:
                    name = self._files[i] if self._kind == "images" else f"{self.path} frame {i}"
                    raise InputError(f"{name}: image size {img.shape[1]}x{img.shape[0]} differs from "
                                     f"{size[1]}x{size[0]} of the first frame (all frames must be the same size)")
                self._cache[k] = img
                for old in [j for j in self._cache if j < k - self._cache_size]:
                    del self._cache[old]
            out.append(self._cache[k])
        return np.stack(out)

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder[0].close()
            self._decoder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _end_of(frame, stream, container) -> int | None:
    """Where the clip's last ``frame`` stops being shown (stream time base): its own duration, else the stream's
    end, else the container's (Matroska without durations: FFmpeg takes its segment's); None when none says."""
    if frame.duration:
        return frame.pts + frame.duration
    ends = []
    if stream.duration:
        ends.append((stream.start_time or 0) + stream.duration)
    if container.duration:
        seconds = Fraction(container.duration + (container.start_time or 0), 1_000_000)
        ends.append(int(round(seconds / stream.time_base)))
    return next((e for e in ends if e > frame.pts), None)


def _display_matrix(frame) -> tuple[int, int, int, int] | None:
    """The (a, b, c, d) part of a frame's display matrix when it maps the picture's axes onto the screen's
    (quarter turns and mirrors); None without one, or for another angle (frame.rotation, rounded, then)."""
    import av

    try:
        data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if data is None or len(bytes(data)) != 36:
        return None
    a, b, _, c, d = np.frombuffer(bytes(data), dtype="<i4")[:5].tolist()
    return (a, b, c, d) if (a == d == 0) != (b == c == 0) else None


def _displayed(img: np.ndarray, a: int, b: int, c: int, d: int) -> tuple[np.ndarray, int, bool]:
    """``img`` as the display matrix (a b; c d) shows it (FFmpeg's convention: a stored pixel (x, y) goes to
    (a x + c y, b x + d y), translated into view), with the counterclockwise turn and whether it mirrors.
    A mirror is a flip, not a half turn: frame.rotation alone reads a left-right mirror as 180 degrees."""
    if a == d == 0:  # a quarter turn: rows and columns swap
        img = img.transpose(1, 0, 2)  # now indexed (x, y)
        img = img[::-1] if b < 0 else img
        img = img[:, ::-1] if c < 0 else img
    else:
        img = img[::-1] if d < 0 else img
        img = img[:, ::-1] if a < 0 else img
    mirrored = a * d - b * c < 0
    if mirrored:  # mirrored left-right first (x -> -x), then turned
        a, c = -a, -c
    turn = int(round(-np.degrees(np.arctan2(b, a)) / 90)) * 90 % 360  # av_display_rotation_get's sign
    return img, turn, mirrored


def _moving_pictures(container) -> list:
    """The container's video streams but attached pictures (an audio file's cover art is a one-picture
    "video" stream marked as such)."""
    import av

    return [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
