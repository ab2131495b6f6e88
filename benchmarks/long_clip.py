"""Long clips: peak host memory against clip length, in one pass and in windows.

Each measurement runs in a fresh subprocess (so peaks do not contaminate each other) on a
synthetic translating clip with a tiny random model built from config (memory does not depend on
the weights). It reports the peak RSS, its growth per frame over the shortest clip, and that
growth in units of one latent (one sample tensor per frame: C x H x W float32).

    python benchmarks/long_clip.py                 # 30, 100, 300 frames, 64x64 input, x2
    python benchmarks/long_clip.py --frames 30 300 --size 64
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(frames: int, size: int, mode: str, model_dir: str, steps: int = 2) -> dict:
    """Runs inside the subprocess: sample the clip, return peak memory figures."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch

    import tiny
    from pipelines.align import Fusion
    from pipelines.flow import FlowConfig
    from pipelines.video_pipeline import SamplingOptions, VideoPipeline
    from pipelines.windows import sample_windowed

    torch.set_num_threads(1)
    pipe = VideoPipeline.from_pretrained(model_dir)
    clip = tiny.textured_clip(frames, size, shift=(0.7, 0.3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opts = SamplingOptions(num_inference_steps=steps, strength=1.0, seed=0)
    flow = FlowConfig(scale=0.5)
    if mode == "windows":
        out = sample_windowed(pipe, clip, window=16, overlap=4, anchor_weight=0.8, make_alignment=lambda: Fusion(),
                              options=opts, flow=flow)
    else:
        out = pipe(clip, options=opts, alignment=Fusion(), flow=flow, output_uint8=True).frames
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    h, w = out.shape[1:3]
    return dict(frames=frames, mode=mode, out_size=[h, w], latent_mb=3 * h * w * 4 / 2**20,
                rss_before_mb=base / 1024, rss_peak_mb=peak / 1024)


def measure(frames: int, size: int, mode: str, model_dir: str, steps: int = 2) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import long_clip; "
            f"print(json.dumps(long_clip.child({frames}, {size}, {mode!r}, {model_dir!r}, {steps})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def growth(rows: list[dict]) -> list[dict]:
    """Per-frame growth of the peak over the shortest clip, in MB and in latents."""
    first = rows[0]
    for r in rows[1:]:
        per_frame = (r["rss_peak_mb"] - first["rss_peak_mb"]) / (r["frames"] - first["frames"])
        r["growth_mb_per_frame"] = per_frame
        r["growth_latents_per_frame"] = per_frame / r["latent_mb"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[30, 100, 300])
    p.add_argument("--size", type=int, default=64, help="input side (the tiny model upscales x2)")
    p.add_argument("--modes", nargs="+", default=["one-pass", "windows"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_clip.json")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny.save_residual_sr(Path(tmp) / "model", scale=2))
        for mode in a.modes:
            rows = growth([measure(n, a.size, mode, model) for n in sorted(a.frames)])
            results[mode] = rows
            print(f"\n{mode}: input {a.size}x{a.size}, output {rows[0]['out_size']}, "
                  f"one latent = {rows[0]['latent_mb']:.3f} MB per frame")
            print("frames | peak RSS MB | growth MB/frame | growth in latents/frame")
            for r in rows:
                print(f"{r['frames']:6d} | {r['rss_peak_mb']:11.1f} | {r.get('growth_mb_per_frame', 0):15.3f} | "
                      f"{r.get('growth_latents_per_frame', 0):.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(machine=platform.platform(), results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
