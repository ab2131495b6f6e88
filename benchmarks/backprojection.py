"""What back-projection does to each model's output, and why its correction is averaged along the flow.

    python benchmarks/backprojection.py                                    # both shipped models, example clip
    python benchmarks/backprojection.py --clips ../shared/clips/train/rollercoaster.mp4 --start 1 \\
        --max-frames 16 --resize 256

For every model and clip, independent sampling and the default fusion are run once *without*
back-projection (10 steps, seed 0, as configs/default.yaml), and then corrected three ways on the same
output frames: not at all, per frame (``x + U(y - D(x))``) and with the correction averaged along the
flow (``pipelines.backproject``, what ``sampling.back_projection`` does with fusion). Flows and masks
are the pipeline's own (DIS on the bicubic upscale); the metrics are consistency.py's (E_warp with the
ground truth's flows). Writes ``<out>.md`` and ``<out>.json``; nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (EWARP_UNIT, EXAMPLE_GT, ROOT, DEFAULTS, Method, Reference, command_line, evaluate, fmt,  # noqa: E402
                    fusion, load_clip, load_pipeline, machine_info, machine_line, markdown_table, run_method,
                    run_script, set_threads, write_json)

import torch  # noqa: E402

from pipelines.backproject import back_project  # noqa: E402
from pipelines.flow import FlowConfig, compute_clip_flows  # noqa: E402
from pipelines.video_pipeline import SamplingOptions  # noqa: E402

MODELS = ("weights/vsr-x4", "weights/latent-x4")
CORRECTIONS = ("none", "per frame", "flow-averaged")


def corrected(frames: torch.Tensor, lr: torch.Tensor, scale: int, how: str, flows) -> torch.Tensor:
    if how == "none":
        return frames
    return next(back_project([(0, frames, lr)], scale, flows if how == "flow-averaged" else None))[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks/backprojection.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=[str(ROOT / m) for m in MODELS])
    p.add_argument("--clips", nargs="+", default=[str(EXAMPLE_GT)])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--max-frames", type=int, default=16)
    p.add_argument("--resize", type=int, default=None)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--weight", type=float, default=DEFAULTS["weight"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "backprojection"))
    args = p.parse_args(argv)
    set_threads(args.threads)
    base = SamplingOptions(num_inference_steps=args.steps, seed=args.seed, back_projection=False)
    methods = [Method("independent"), fusion(f"bidir-fusion-w{args.weight:g}", args.weight)]
    rows, records = [], []
    for model in args.models:
        pipe = load_pipeline(model)
        for path in args.clips:
            clip = load_clip(path, pipe.scale, start=args.start, max_frames=args.max_frames, resize=args.resize)
            ref = Reference.of(clip.gt)
            bicubic = pipe.conditioning_frames(clip.lr)  # what the pipeline computes its flows on
            flows = compute_clip_flows(bicubic, FlowConfig())
            bic = evaluate(bicubic, ref)
            rows.append([Path(model).name, clip.name, "bicubic", "-", fmt(bic["psnr"]),
                         fmt(bic["ewarp"] * EWARP_UNIT, 3), fmt(bic["sharpness_ratio"], 3)])
            records.append({"model": model, "clip": clip.name, "method": "bicubic", "correction": None, **bic})
            for m in methods:
                run = run_method(pipe, m, clip.lr, base)
                if run.frames is None:  # the method failed (bad flags for it): its error, not a crash later
                    raise ValueError(f"{m.name} on {clip.name}: {run.error}")
                for how in CORRECTIONS:
                    if how == "flow-averaged" and m.alignment["mode"] == "none":
                        continue  # without alignment the job has no flow: per frame is what it does
                    e = evaluate(corrected(run.frames, clip.lr, pipe.scale, how, flows), ref)
                    print(f"{Path(model).name} {clip.name} {m.name} {how}: PSNR {e['psnr']:.2f} dB, "
                          f"E_warp x1e3 {e['ewarp'] * EWARP_UNIT:.3f}, sharpness {e['sharpness_ratio']:.3f}", flush=True)
                    rows.append([Path(model).name, clip.name, m.name, how, fmt(e["psnr"]),
                                 fmt(e["ewarp"] * EWARP_UNIT, 3), fmt(e["sharpness_ratio"], 3)])
                    records.append({"model": model, "clip": clip.name, "method": m.name, "correction": how, **e})
    cmd = command_line("benchmarks/backprojection.py", argv if argv is not None else sys.argv[1:])
    table = markdown_table(["model", "clip", "method", "back-projection", "PSNR (dB)", "E_warp x1e3",
                            "sharpness ratio"], rows)
    info = machine_info("cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"# Back-projection\n\n- command: `{cmd}`\n- machine: {machine_line(info)}\n"
                                      f"- {args.steps} steps, seed {args.seed}, frames from {args.start}, "
                                      f"{args.max_frames} per clip\n\n{table}\n")
    report = {"command": cmd, "machine": info, "rows": records}
    write_json(out.with_suffix(".json"), report)
    print(f"\n{table}\n\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    run_script(main)
