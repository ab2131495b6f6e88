"""Cut the shipped example clip from ../shared/clips/woman-running.mp4 (run once, by a developer).

Writes assets/example_gt.mp4 (16 frames, 256x256: the clip downscaled x2, the ground truth) and
assets/example.mp4 (64x64: the ground truth downscaled x4, bicubic antialiased: the input). Both
are H.264 at near-lossless quality (ffmpeg from the imageio-ffmpeg wheel, a developer-only tool),
and the low-res clip is made from the *decoded* ground truth so the pair is consistent.
"""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize, downscale  # noqa: E402
from pipelines.video_io import read_clip, to_tensor, to_uint8  # noqa: E402

START, FRAMES, FPS = 30, 16, 20


def encode(frames: np.ndarray, path: Path) -> None:
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(FPS), "-i", "-", "-c:v", "libx264", "-crf", "6", "-pix_fmt", "yuv444p",
           str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True)


def main() -> None:
    src = ROOT.parent / "shared" / "clips" / "woman-running.mp4"
    clip = read_clip(src, start=START, max_frames=FRAMES)
    gt = bicubic_resize(to_tensor(clip.frames), (256, 256)).clamp(-1, 1)
    encode(to_uint8(gt), ROOT / "assets" / "example_gt.mp4")
    decoded = to_tensor(read_clip(ROOT / "assets" / "example_gt.mp4").frames)
    encode(to_uint8(downscale(decoded, 4).clamp(-1, 1)), ROOT / "assets" / "example.mp4")


if __name__ == "__main__":
    main()
