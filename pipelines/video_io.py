"""Reading and writing clips: videos, animated GIFs and folders of images.

Frames live in two layouts:

* on disk / in numpy: ``uint8 (F, H, W, 3)`` RGB;
* for the model: ``float32 (F, 3, H, W)`` in ``[-1, 1]`` (``to_tensor`` / ``to_uint8``).

Every problem caused by user input is raised as ``InputError`` with a one-line message that
names the path, so the CLI can print it and exit with code 2. Outputs are written atomically:
to a temporary sibling first, then moved into place with ``os.replace``.
"""
from __future__ import annotations

import functools
import io
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError  # defined there: the command line catches it before importing torch
from .video_writer import DEFAULT_CRF, WriteError, Written, commit, file_mode, seal, temp_sibling, write_h264

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # its own warnings would break one-line errors

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".vob",
              ".3gp", ".flv", ".f4v", ".wmv", ".asf", ".mxf", ".y4m", ".divx")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Clip:
    frames: np.ndarray  # uint8 (F, H, W, 3) RGB
    fps: float | None  # rate of the returned frames; None when the source has none
    source: Path
    warnings: list[str] = field(default_factory=list)  # e.g. fewer frames decoded than the container declares
    pts: list[int] | None = None  # videos: presentation timestamps of the frames, in time_base units
    time_base: object = None  # fractions.Fraction for videos


# ----------------------------------------------------------------------------- reading


def read_clip(path, start: int = 0, end: int | None = None, stride: int = 1,
              max_frames: int | None = None, strict: bool = False) -> Clip:
    """Read frames ``start, start + stride, ... < end`` (at most ``max_frames``) from ``path``.

    ``path`` may be a video (``VIDEO_EXTS``, decoded with PyAV), an animated ``.gif``, a
    single image, or a folder of images (``IMAGE_EXTS``, natural sort order, hidden files
    ignored). Frames are decoded one at a time and unselected ones are dropped at once.

    ``Clip.fps`` is the rate of the *returned* frames: the source rate divided by ``stride``
    (so a strided clip keeps its duration). A GIF's rate is 1000 / mean frame duration (ms);
    images have no rate (``None``).

    A video that decodes fewer frames than its container declares (a damaged file) gives a warning in
    ``Clip.warnings``, or an InputError with ``strict``.
    """
    from .clip_source import ClipSource

    with ClipSource(path, start, end, stride, max_frames, strict=strict) as src:
        frames = src.read(0, len(src))
        return Clip(frames=frames, fps=src.fps, source=Path(path), warnings=src.warnings, pts=src.pts,
                    time_base=src.time_base)


def _check_range(path, start, end, stride, max_frames):
    if stride < 1:
        raise InputError(f"{path}: stride must be >= 1, got {stride}")
    if start < 0:
        raise InputError(f"{path}: start must be >= 0, got {start}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"{path}: max_frames must be >= 1, got {max_frames}")
    if end is not None and end <= start:
        raise InputError(f"{path}: no frames selected: end={end} is not after start={start}")


def _wanted(i: int, start: int, stride: int) -> bool:
    return i >= start and (i - start) % stride == 0


def _finished(i: int, n_taken: int, end, max_frames) -> bool:
    return (end is not None and i >= end) or (max_frames is not None and n_taken >= max_frames)


def _nothing_selected(path, start, n_seen) -> InputError:
    return InputError(f"{path}: no frames selected: start={start} is beyond the last frame "
                      f"(the source has {n_seen} frames)")


def _natural_key(name: str):
    """'frame10.png' -> ['frame', 10, '.png'] so that frame2 sorts before frame10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _decode_image(path: Path) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) sRGB (alpha dropped, gray expanded, 16 bit reduced, EXIF
    orientation applied, an embedded non-sRGB ICC profile converted to sRGB)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise InputError(f"{path}: cannot read file ({e.strerror})") from None
    alpha, icc = _header(data) if data.size else (False, None)
    img = None
    if alpha and path.suffix.lower() in (".tif", ".tiff"):
        img = _tiff_with_alpha(data)  # decoded once: the header said which reader
    if img is None:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise InputError(f"{path}: cannot decode image (corrupt or unsupported format)")
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return _to_srgb(img, icc) if icc else img


def _open_pil(fp):
    """``PIL.Image.open(fp)`` that also opens a PNG whose metadata text is above Pillow's 1 MB limit (an
    ImageMagick "Raw profile" holding a camera's EXIF block runs to megabytes): Pillow raises ValueError
    for it, and the header (ICC profile, EXIF orientation) would be taken as absent."""
    from PIL import Image, PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, 64 << 20)  # MAX_TEXT_MEMORY still bounds it
    return Image.open(fp)


def _header(data: np.ndarray) -> tuple[bool, bytes | None]:
    """Whether the image's header declares an alpha band, and its embedded ICC profile: from the bytes
    already read (nothing decoded, the file not read again)."""
    try:
        with _open_pil(io.BytesIO(data.tobytes())) as im:
            return "A" in im.getbands(), im.info.get("icc_profile") or None
    except (OSError, ValueError, SyntaxError):
        return False, None


@functools.lru_cache(maxsize=8)
def _srgb_transform(icc: bytes):
    """LittleCMS transform from an RGB ``icc`` profile to sRGB (relative colorimetric, as browsers show it);
    None for an sRGB profile (kept bit for bit), a non-RGB one (gray: OpenCV already expanded it) or one
    that does not parse (ignored, as OpenCV did before)."""
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if src.profile.xcolor_space.strip() != "RGB" or "srgb" in (src.profile.profile_description or "").lower():
            return None
        return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                       ImageCms.Intent.RELATIVE_COLORIMETRIC)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _to_srgb(rgb: np.ndarray, icc: bytes) -> np.ndarray:
    """uint8 RGB pixels encoded in the ``icc`` profile's colours (Display P3, Adobe RGB...) -> sRGB, the
    colours every later stage and the written video assume: unconverted, a P3 photo comes out dull."""
    from PIL import Image, ImageCms

    transform = _srgb_transform(bytes(icc))
    if transform is None:
        return rgb
    return np.asarray(ImageCms.applyTransform(Image.fromarray(np.ascontiguousarray(rgb)), transform))


def _tiff_with_alpha(data: np.ndarray) -> np.ndarray | None:
    """A TIFF with alpha as uint8 RGB with its colours as stored: OpenCV's reader multiplies them by alpha
    (measured), so they are divided back out (fully transparent pixels stay black); its reader applies the
    TIFF orientation tag itself here. None when it decodes without 4 channels (read as usual)."""
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 3 or img.shape[2] != 4:
        return None
    peak = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
    bgra = img.astype(np.float32) / peak
    alpha = bgra[..., 3:]
    rgb = np.where(alpha > 0, bgra[..., 2::-1] / np.maximum(alpha, 1e-6), 0.0)
    return np.clip(rgb * 255.0, 0, 255).round().astype(np.uint8)


def _read_gif(path: Path, start, end, stride, max_frames):
    """The selected frames, their mean rate, their start times in ms (per-frame delays kept; a delay of
    10 ms or less shows for 100 ms, as browsers play it) and where the last one's display ends (ms)."""
    from PIL import Image, ImageSequence

    frames, durations, i, chosen = [], [], 0, []
    try:
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                if _finished(i, len(frames), end, max_frames):
                    break
                delay = frame.info.get("duration") or 0
                durations.append(delay if delay > 10 else 100)
                if _wanted(i, start, stride):
                    frames.append(np.asarray(frame.convert("RGB")))
                    chosen.append(i)
                i += 1
    except (OSError, EOFError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot decode GIF ({msg})") from None
    if not frames:
        raise _nothing_selected(path, start, i)
    starts = np.concatenate([[0], np.cumsum(durations)]).astype(int)
    # each chosen frame stands for itself and the stride - 1 frames skipped after it (those read)
    span_ms = sum(sum(durations[k:k + stride]) for k in chosen)
    end_ms = int(starts[min(chosen[-1] + stride, len(durations))])  # the last frame's span, as in span_ms
    return np.stack(frames), 1000.0 * len(chosen) / span_ms, [int(starts[k]) for k in chosen], end_ms


# ----------------------------------------------------------------------------- tensors


def padded_side(side: int, multiple: int, least: int = 1) -> int:
    """``side`` rounded up to a multiple of ``multiple``, and at least ``least``."""
    return max(side + (-side % multiple), least)


def pad_to_multiple(frames: torch.Tensor, multiple: int, least: int = 1) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``(..., C, H, W)`` at the bottom/right so H and W are multiples of ``multiple`` and at least
    ``least`` (:func:`padded_side`).

    Reflect padding, or replicate where a side is too small to reflect (pad >= size).
    Returns ``(padded, (H, W))`` with the original size, for ``crop_to``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = frames.shape[-2:]
    ph, pw = padded_side(h, multiple, least) - h, padded_side(w, multiple, least) - w
    if ph == 0 and pw == 0:
        return frames, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    x = frames.reshape(-1, *frames.shape[-3:])  # F.pad wants (N, C, H, W)
    x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x.reshape(*frames.shape[:-2], h + ph, w + pw), (h, w)


def crop_to(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo ``pad_to_multiple``: keep the top-left ``size = (H, W)`` of ``(..., H', W')``."""
    return frames[..., : size[0], : size[1]]


def to_tensor(frames_uint8: np.ndarray, device=None) -> torch.Tensor:
    """uint8 ``(F, H, W, 3)`` -> float32 ``(F, 3, H, W)`` in [-1, 1]:  x / 127.5 - 1."""
    frames_uint8 = _check_frames(frames_uint8)
    x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(F, 3, H, W)`` in [-1, 1] -> uint8 ``(F, H, W, 3)``:  round((clamp(x) + 1) * 127.5)."""
    x = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _check_frames(frames) -> np.ndarray:
    """``frames`` as a uint8 (F, H, W, 3) numpy array (a uint8 tensor, such as the pipeline's
    ``output_uint8`` frames, is taken as is); ValueError otherwise."""
    if torch.is_tensor(frames) and frames.dtype == torch.uint8:
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 \
            or not len(frames):
        kind = "tensor" if torch.is_tensor(frames) else type(frames).__name__
        hint = " (to_uint8 converts (F, 3, H, W) frames in [-1, 1])" if torch.is_tensor(frames) else ""
        raise ValueError(f"expected uint8 frames (F>0, H, W, 3), got a {kind} of {getattr(frames, 'dtype', '?')} "
                         f"{tuple(getattr(frames, 'shape', ()))}{hint}")
    return frames


# ----------------------------------------------------------------------------- writing


def _temp_sibling(path: Path, directory: bool = False) -> Path:
    """A fresh '.name.tmp-<pid>-<start>-XXXX<ext>' next to ``path`` (see pipelines.video_writer)."""
    return temp_sibling(path, directory)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_video(path, frames: np.ndarray, fps: float, *, crf: int = DEFAULT_CRF, audio_from=None,
                audio_start_s: float = 0.0, replace: bool = True) -> Written:
    """Write uint8 RGB ``(F, H, W, 3)`` frames as H.264 (yuv420p, browser-playable), atomically and
    verified; odd sides are padded by repeating the last row/column (``Written.padded`` says so).
    With ``audio_from``, that clip's audio from ``audio_start_s`` on is copied in, trimmed to the video.
    See :func:`pipelines.video_writer.write_h264`."""
    frames = _check_frames(frames)
    try:
        return write_h264(path, frames, fps, crf=crf, audio_from=audio_from, audio_start_s=audio_start_s,
                          replace=replace)
    except WriteError as e:
        raise InputError(str(e)) from e


class FrameFolderWriter:
    """PNG frames ``folder/frame_00000.png, ...`` appended chunk by chunk into a temporary sibling folder,
    which takes the place of ``folder`` only on :meth:`close` (an old ``folder`` is moved aside first and
    deleted last); :meth:`abort` leaves ``folder`` as it was."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder}: exists and is not a directory")
        self.tmp = _temp_sibling(self.folder, directory=True)
        self.count = 0
        self.done = False
        self.aside: Path | None = None  # see finish()

    def append(self, frames: np.ndarray) -> None:
        frames = _check_frames(frames)
        for frame in frames:
            ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f"{self.folder}: PNG encoding failed for frame {self.count}")
            try:
                (self.tmp / f"frame_{self.count:05d}.png").write_bytes(png.tobytes())
            except OSError as e:
                raise WriteError(f"{self.folder}: writing frame {self.count} failed ({e.strerror or e})") from e
            self.count += 1

    def finish(self) -> None:
        """Everything but the moves: the folder's mode, and the empty folder an existing ``folder`` will be
        moved aside onto (creating it may fail for want of space; the moves cannot)."""
        try:
            os.chmod(self.tmp, file_mode(folder=True))  # a folder as mkdir would make it
            if self.folder.exists() and self.aside is None:
                self.aside = _temp_sibling(self.folder, directory=True)
        except OSError as e:
            self.abort()
            raise WriteError(f"{self.folder}: writing failed ({e.strerror or e})") from e
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Put the frames in place of ``folder`` (:meth:`finish` first)."""
        self.finish()
        folder, old = self.folder, None
        try:
            if folder.exists():  # aside under a temporary name: a run killed right here leaves it to the sweep
                old = self.aside or _temp_sibling(folder, directory=True)
                os.replace(folder, old)  # onto an empty directory: allowed on POSIX
            try:
                os.replace(self.tmp, folder)
            except BaseException:
                if old is not None:
                    os.replace(old, folder)
                    old = None
                raise
        except BaseException:
            self.abort()
            raise
        self.done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if not self.done:
            _remove(self.tmp)
            if self.aside is not None and self.aside.is_dir() and not any(self.aside.iterdir()):
                self.aside.rmdir()  # made by finish() and not used (never one holding the old frames)
        self.done = True


def write_frames(folder, frames: np.ndarray) -> None:
    """Write uint8 RGB ``(F, H, W, 3)`` frames as ``folder/frame_00000.png, ...``, atomically
    (see :class:`FrameFolderWriter`)."""
    frames = _check_frames(frames)
    writer = FrameFolderWriter(folder)
    try:
        writer.append(frames)
    except BaseException:
        writer.abort()
        raise
    writer.close()


class PendingText:
    """``text`` (UTF-8) written now to a temporary sibling of ``path``, moved onto it by :meth:`commit`
    (fsync, then replace or no-replace, with the permissions the umask allows); :meth:`abort` drops it."""

    def __init__(self, path, text: str):
        self.path = Path(path)
        self.tmp = _temp_sibling(self.path)
        try:
            with open(self.tmp, "w", encoding="utf-8") as f:
                f.write(text)
            seal(self.tmp, self.path)
        except OSError as e:
            _remove(self.tmp)
            raise WriteError(f"{self.path}: writing failed ({e.strerror or e})") from e
        except BaseException:
            _remove(self.tmp)
            raise

    def commit(self, replace: bool = True) -> None:
        try:
            commit(self.tmp, self.path, replace)
        except BaseException:
            _remove(self.tmp)
            raise

    def abort(self) -> None:
        _remove(self.tmp)


def atomic_write_text(path, text: str, replace: bool = True) -> None:
    """Write ``text`` (UTF-8) to a temp sibling, fsync, then move it onto ``path`` (no-replace unless
    ``replace``), with the permissions the umask allows."""
    PendingText(path, text).commit(replace)


def side_by_side(left: np.ndarray, right: np.ndarray, mode: str = "nearest") -> np.ndarray:
    """``(F, h, w, 3)`` and ``(F, H, W, 3)`` -> ``(F, H, 2W, 3)``: [left resized | right].

    ``left`` is resized to the right's size with ``mode`` 'nearest' (shows the input pixels
    as they are) or 'bicubic'.
    """
    if len(left) != len(right):
        raise ValueError(f"frame counts differ: {len(left)} vs {len(right)}")
    interp = {"nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC}[mode]
    h, w = right.shape[1:3]
    if left.shape[1:3] != (h, w):
        left = np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in left])
    return np.concatenate([left, right], axis=2)
