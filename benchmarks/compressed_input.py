"""Compressed input: how much of the default job's gain over bicubic survives an H.264-compressed low-res clip.

The shipped models were trained on one degradation only (the antialiased bicubic x4 downscale); the clips
users have are usually compressed. This re-encodes the lossless low-res input at each ``--crf`` with the
project's own H.264 writer (yuv420p, as a phone or a browser clip), runs ``python run_video.py`` on each
copy in a fresh process with ``--reference`` (the lossless ground truth), and tabulates the output's PSNR,
SSIM, sharpness ratio and E_warp against those of bicubic on the *same* compressed input. The first row is
the lossless input itself.

    python benchmarks/compressed_input.py                          # the example clip, crf 18 23 28
    python benchmarks/compressed_input.py --crf 23 -- sampling.back_projection=false
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import (EXAMPLE_GT, command_line, fmt, machine_info, machine_line, markdown_table,  # noqa: E402
                    run_cli, run_script, write_json)
from pipelines.metrics import psnr  # noqa: E402
from pipelines.video_io import read_clip, to_tensor, write_video  # noqa: E402

EXAMPLE_INPUT = ROOT / "assets" / "example.mp4"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=EXAMPLE_INPUT, help="the lossless low-res clip")
    p.add_argument("--reference", type=Path, default=EXAMPLE_GT, help="its ground truth")
    p.add_argument("--crf", type=int, nargs="+", default=[18, 23, 28], help="H.264 CRFs (0-51) to re-encode at")
    p.add_argument("--config", default=None, help="job config passed to run_video.py")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compressed_input")
    p.add_argument("overrides", nargs="*", help="key=value config overrides passed to run_video.py")
    args = p.parse_args(argv)
    if any(not 0 <= c <= 51 for c in args.crf):
        raise ValueError(f"--crf takes values in 0..51, not {args.crf}")
    clean = read_clip(args.input, strict=True)
    if clean.frames.shape[1] % 2 or clean.frames.shape[2] % 2:
        raise ValueError(f"{args.input}: H.264 yuv420p needs even sides, not {clean.frames.shape[2]}x{clean.frames.shape[1]}")
    job = (["--config", args.config] if args.config else []) + ["--reference", str(args.reference), *args.overrides]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bisweep-crf-") as tmp:
        for crf in [None, *args.crf]:
            name = "lossless" if crf is None else f"crf{crf}"
            clip = args.input
            if crf is not None:
                clip = Path(tmp) / f"input_{name}.mp4"
                write_video(clip, clean.frames, clean.fps or 20.0, crf=crf)
            decoded = read_clip(clip, strict=True).frames
            print(f"[compressed_input] {name} ...", file=sys.stderr, flush=True)
            wall, rep = run_cli(["--input", str(clip), *job], Path(tmp) / f"out_{name}.mp4")
            rows.append({"input": name, "crf": crf, "input_psnr_db": psnr(to_tensor(decoded), to_tensor(clean.frames)),
                         "psnr": rep["psnr"], "psnr_bicubic": rep["psnr_bicubic"], "ssim": rep["ssim"],
                         "ssim_bicubic": rep["ssim_bicubic"], "sharpness_ratio": rep["sharpness_ratio"],
                         "ewarp": rep["warp_error_ref"], "ewarp_gt": rep["warp_error_ref_gt"], "wall_s": wall,
                         "model_path": rep["model_path"]})

    headers = ["input", "input PSNR vs lossless (dB)", "output PSNR (dB)", "bicubic PSNR (dB)", "gain (dB)",
               "SSIM (bicubic)", "sharpness ratio", "E_warp x1e3"]
    body = [[r["input"], fmt(r["input_psnr_db"]), fmt(r["psnr"]), fmt(r["psnr_bicubic"]),
             f"{r['psnr'] - r['psnr_bicubic']:+.2f}", f"{r['ssim']:.3f} ({r['ssim_bicubic']:.3f})",
             fmt(r["sharpness_ratio"], 3), fmt(r["ewarp"] * 1e3, 3)] for r in rows]
    info = machine_info("cpu")
    report = {"command": command_line("benchmarks/compressed_input.py", sys.argv[1:] if argv is None else argv),
              "machine": info, "rows": rows}
    md = "\n".join([
        "# Compressed input", "",
        f"- command: `{report['command']}`",
        f"- machine: {machine_line(info)} (the runs themselves: `python run_video.py`, fresh processes)",
        f"- model: `{rows[0]['model_path']}`; input `{args.input}`, reference `{args.reference}`",
        "- each compressed copy is the lossless input re-encoded by `pipelines.video_io.write_video` (H.264, "
        "yuv420p); bicubic is the x4 bicubic upscale of that same copy; E_warp against the ground truth's "
        f"{rows[0]['ewarp_gt'] * 1e3:.3f}", "",
        markdown_table(headers, body), ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    write_json(args.out.with_suffix(".json"), report)
    print(md)
    return report


if __name__ == "__main__":
    run_script(main)
