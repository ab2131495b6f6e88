"""Pack the training data small enough to travel to a lent GPU machine (see ``training/gpu_run.sh``).

The training scripts read ../shared/clips/train (clips and photos/) and ../shared/clips/wolf.mp4, and shrink
every frame to a long side of 720 px (clips) or 720 px (photos) themselves. This copies them, already
shrunk to that size, into ``--out`` with the same layout: clips re-encoded with libx264 (crf 17, every
frame kept, so frame pairs stay neighbours), photos as JPEG quality 95. woman-running.mp4 is never read.

    python training/pack_gpu_data.py --out .gpudata   # ~20 MB instead of ~50 MB
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import av
import cv2

# ../shared beside the checkout, or another copy of it (BISWEEP_SHARED, as the training scripts read it)
SRC = Path(os.environ.get("BISWEEP_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "clips"
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--src", type=Path, default=SRC, help="the clips folder to pack (default: %(default)s)")
    args = p.parse_args(argv)
    src = args.src
    missing = [q for q in (src / "wolf.mp4", src / "train") if not q.exists()]
    if missing:
        print(f"error: --src {src}: no {missing[0].name} there (a ../shared/clips copy; or set BISWEEP_SHARED)",
              file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file; give a new folder", file=sys.stderr)
        return 2
    if args.out.resolve() == src.resolve().parent:
        print(f"error: --out {args.out} is the folder being packed (--src {src})", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "clips").is_dir():
        print(f"error: --out {args.out} holds other files; use a new folder", file=sys.stderr)
        return 2
    train = args.out / "clips" / "train"
    (train / "photos").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "wolf.mp4", args.out / "clips" / "wolf.mp4")
    for clip in sorted((src / "train").glob("*.mp4")):
        if "woman-running" in clip.name:
            continue
        print(clip.name, reencode(clip, train / clip.name), "frames", flush=True)
    for photo in sorted((src / "train" / "photos").glob("*")):
        img = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if img is not None:
            cv2.imwrite(str(train / "photos" / (photo.stem + ".jpg")), shrink(img), [cv2.IMWRITE_JPEG_QUALITY, 95])
    print("total", sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6, "MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
