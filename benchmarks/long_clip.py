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
LIB_MODES = ("one-pass", "windows")  # the library measurement (a tiny model, no command line)
CLI_ONLY_MODES = ("default", "one-pass-memory", "one-pass-files")  # --cli: run_video.py's configs (cli_measure)


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
        out = sample_windowed(pipe, clip, window=16, overlap=4, anchor_weight=0.0, make_alignment=lambda: Fusion(),
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


def make_clip(path: Path, frames: int, size: int) -> Path:
    """A translating-texture H.264 clip of ``frames`` frames, ``size`` x ``size``, made with PyAV."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import tiny
    from pipelines.video_io import to_uint8
    from pipelines.video_writer import VideoWriter

    with VideoWriter(path, 20.0, crf=18) as w:
        for a in range(0, frames, 50):  # never the whole clip in memory
            n = min(50, frames - a)
            big = tiny.textured_clip(a + n, size, shift=(0.7, 0.3))[a:]
            w.append(to_uint8(big))
        w.close()
    return path


def cli_measure(frames: int, size: int, mode: str, model: str | None = None, steps: int = 1,
                tmp: Path | None = None, extra: tuple = ()) -> dict:
    """Run ``run_video.py`` (a fresh process) on a ``frames``-frame clip; its report's peak RSS.

    ``mode``: ``default`` (the default config: auto = windows beyond runtime.one_pass_max), ``windows``,
    ``one-pass`` (state in files beyond runtime.files_above), ``one-pass-memory``, ``one-pass-files``."""
    import tempfile as _tf

    from common import run_cli  # (here, not at the top: the memory children must not import torch early)

    tmp = Path(tmp or _tf.mkdtemp())
    clip = tmp / f"clip{frames}_{size}.mp4"
    if not clip.exists():
        make_clip(clip, frames, size)
    out = tmp / f"out_{mode}_{frames}.mp4"
    args = ["--input", str(clip), "--overwrite", f"sampling.num_inference_steps={steps}", "runtime.threads=1", *extra]
    if model:
        args.append(f"model.path={model}")
    args += {"default": [], "windows": ["runtime.mode=windows"],
             "one-pass": ["runtime.mode=one_pass"],
             "one-pass-memory": ["runtime.mode=one_pass", "runtime.files_above=1000000"],
             "one-pass-files": ["runtime.mode=one_pass", "runtime.files_above=0"]}[mode]
    _, rep = run_cli(args, out)
    return dict(frames=frames, mode=mode, run_mode=rep["mode"], out_size=rep["output_size"],
                rss_peak_mb=rep["peak_memory"]["host_max_rss_mb"], seconds=rep["timings"]["total"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[30, 100, 300])
    p.add_argument("--size", type=int, default=64, help="input side (the tiny model upscales x2)")
    p.add_argument("--modes", nargs="+", default=["one-pass", "windows"], choices=[*LIB_MODES, *CLI_ONLY_MODES],
                   help="one-pass, windows; with --cli also default, one-pass-memory, one-pass-files")
    p.add_argument("--cli", action="store_true",
                   help="measure through run_video.py with the shipped model (default config, 1 step)")
    p.add_argument("--model", default=None, help="--cli: model.path (default: configs/default.yaml's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_clip.json")
    a = p.parse_args(argv)
    if len(set(a.frames)) < 2 or min(a.frames) < 2:
        p.error(f"--frames needs two or more different clip lengths >= 2 (memory is fitted against length), "
                f"got {' '.join(map(str, a.frames))}")
    if not a.cli and set(a.modes) & set(CLI_ONLY_MODES):
        p.error(f"--modes {' '.join(m for m in a.modes if m in CLI_ONLY_MODES)} needs --cli "
                f"(without it: {', '.join(LIB_MODES)})")
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    if a.cli:
        return cli_main(a)
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


def cli_main(a) -> int:
    """Peak RSS of run_video.py against clip length, per mode, with a plot (benchmarks/results/long_clip_cli.*)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            rows = [cli_measure(n, a.size, mode, a.model, tmp=Path(tmp)) for n in sorted(a.frames)]
            for r in rows:
                r["ratio_to_shortest"] = r["rss_peak_mb"] / rows[0]["rss_peak_mb"]
            results[mode] = rows
            print(f"\n{mode}: input {a.size}x{a.size}, output {rows[0]['out_size']}")
            print("frames | run mode | peak RSS MB | x shortest | seconds")
            for r in rows:
                print(f"{r['frames']:6d} | {r['run_mode']:8s} | {r['rss_peak_mb']:11.1f} | {r['ratio_to_shortest']:10.3f} | "
                      f"{r['seconds']:.1f}")
    out = a.out.with_name("long_clip_cli.json") if a.out.name == "long_clip.json" else a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    from pipelines.config import load_config

    model = a.model or load_config(ROOT / "configs" / "default.yaml").model.path
    out.write_text(json.dumps(dict(machine=platform.platform(), input_size=a.size, model=f"{model} (x4)",
                                   steps=1, results=results), indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, rows in results.items():
        ax.plot([r["frames"] for r in rows], [r["rss_peak_mb"] for r in rows], "o-", label=mode)
    ax.set(xlabel="frames", ylabel="peak RSS (MB)", xscale="log", ylim=(0, None),
           title=f"run_video.py peak memory, {a.size}x{a.size} input x4")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
