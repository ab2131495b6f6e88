"""Pack the training data small enough to travel to a lent GPU machine (see ``training/gpu_run.sh``).

The training scripts read ../shared/clips/train (clips and photos/) and ../shared/clips/wolf.mp4, and shrink
every frame to a long side of 720 px (clips) or 720 px (photos) themselves. This copies them, already
shrunk to that size, into ``--out`` with the same layout: clips re-encoded with libx264 (crf 17, every
frame kept, so frame pairs stay neighbours), photos as JPEG quality 95. woman-running.mp4 is never read.

    python training/pack_gpu_data.py --out .gpudata   # ~20 MB instead of ~50 MB
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import av
import cv2

SRC = Path(__file__).resolve().parents[2] / "shared" / "clips"
MAX_SIDE = 720


def shrink(img, max_side: int = MAX_SIDE):
    s = max_side / max(img.shape[:2])
    if s >= 1:
        return img
    h, w = (round(img.shape[0] * s / 2) * 2, round(img.shape[1] * s / 2) * 2)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def reencode(src: Path, dst: Path) -> int:
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = None
        n = 0
        for frame in inp.decode(video=0):
            img = shrink(frame.to_ndarray(format="rgb24"))
            if stream is None:
                stream = out.add_stream("libx264", rate=25, options={"crf": "17", "preset": "medium"})
                stream.width, stream.height, stream.pix_fmt = img.shape[1], img.shape[0], "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
            n += 1
        for packet in stream.encode():
            out.mux(packet)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    train = args.out / "clips" / "train"
    (train / "photos").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SRC / "wolf.mp4", args.out / "clips" / "wolf.mp4")
    for clip in sorted((SRC / "train").glob("*.mp4")):
        if "woman-running" in clip.name:
            continue
        print(clip.name, reencode(clip, train / clip.name), "frames", flush=True)
    for photo in sorted((SRC / "train" / "photos").glob("*")):
        img = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if img is not None:
            cv2.imwrite(str(train / "photos" / (photo.stem + ".jpg")), shrink(img), [cv2.IMWRITE_JPEG_QUALITY, 95])
    print("total", sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6, "MB")


if __name__ == "__main__":
    main()
