"""Cut the shipped example clip from ../shared/clips/woman-running.mp4 (run once, by a developer).

Writes the ground truth losslessly, as PNG frames in assets/example_gt/ (16 frames, 256x256: the clip
downscaled x2), so fidelity figures measure the model and not a codec, and assets/example.mp4 (64x64:
the ground truth downscaled x4, bicubic antialiased: the input), also lossless (H.264 RGB, libx264rgb
at crf 0, through PyAV). woman-running.mp4 is the evaluation clip: no training script reads it.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize, downscale  # noqa: E402
from pipelines.video_io import read_clip, to_tensor, to_uint8, write_frames  # noqa: E402

START, FRAMES, FPS = 30, 16, 20


def encode_lossless(frames, path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264rgb", rate=FPS, options={"crf": "0", "preset": "veryslow"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def main() -> None:
    src = ROOT.parent / "shared" / "clips" / "woman-running.mp4"
    clip = read_clip(src, start=START, max_frames=FRAMES)
    gt = to_uint8(bicubic_resize(to_tensor(clip.frames), (256, 256)).clamp(-1, 1))
    write_frames(ROOT / "assets" / "example_gt", gt)
    lr = to_uint8(downscale(to_tensor(gt), 4).clamp(-1, 1))
    encode_lossless(lr, ROOT / "assets" / "example.mp4")
    back = read_clip(ROOT / "assets" / "example.mp4").frames
    assert (back == lr).all(), "the input clip must decode to exactly the frames written"
    print(f"wrote {len(gt)} ground-truth PNG frames and the lossless 64x64 input")


if __name__ == "__main__":
    main()
