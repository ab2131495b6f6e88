"""Temporal consistency vs fidelity of the sampling methods on ground-truth clips.

    python benchmarks/consistency.py                       # assets/example_gt, all methods
    python benchmarks/consistency.py --quick               # smoke run: 4 frames at 64x64, 4 steps
    python benchmarks/consistency.py --clips ../shared/clips/woman-running.mp4 --resize 256 \\
        --max-frames 16 --start 30

Every method sees the same low-res frames (antialiased bicubic downscale of the ground truth), the
same model and the same seeds. Writes ``<out>.md`` (table), ``<out>.json`` (all numbers),
``<out>_plot.png`` (E_warp vs PSNR) and ``<out>_strip.png`` (a crop over 4 consecutive frames per
method), then checks the issue's targets on the numbers of this run.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, run from anywhere
from common import (run_script, DEFAULTS, DEFAULT_MODEL, EWARP_UNIT, EXAMPLE_GT, ROOT, Method, Reference, command_line,  # noqa: E402
                    default_out,
                    evaluate, fmt, fusion, load_clip, load_pipeline, machine_info, machine_line,
                    markdown_table, method_dict, model_info, pick_device, pick_dtype, run_method,
                    run_record, set_threads, write_json)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.video_io import to_uint8  # noqa: E402
from pipelines.video_pipeline import SamplingOptions  # noqa: E402

QUICK = dict(max_frames=4, resize=64, steps=4)
QUICK_METHODS = ("bicubic", "independent", "{default}", "chains-L2")
VAE_ROW = "vae-reconstruction"
VAE_BAR_DB = 33.0  # issue 13: the VAE alone reconstructs the example clip at >= 33 dB
GAIN_BAR_DB = 1.0  # issue 13: the default job at least 1 dB over bicubic (an earlier issue asked 0.5)
TCM_NOTE = "tcm: n/a (the model has no controlnet/ folder)"


def default_method_name(weight: float) -> str:
    return f"bidir-fusion-w{weight:g}"


def build_methods(weight: float, num_frames: int, tcm: bool = False, preview: bool = False,
                  vae: bool = False, tcm_scale: float = 1.0) -> list[Method]:
    """All methods of the comparison; fusion variants use ``weight`` unless the name says otherwise.

    Chains get a batch size of ``num_frames`` so each position along the chains is one model call.
    With a model that has a ControlNet (``tcm``): tcm, tcm + fusion and, with a preview decoder,
    tcm-preview (the issue's table rows: none, fusion, tcm, tcm + fusion, tcm with the preview decoder),
    and tcm-preview on only the first half, the last half, or the last 30 % or 20 % of the steps, and on
    the last half with fusion, all at ControlNet conditioning scale ``tcm_scale``; and two of those rows
    with chains of 4 frames in lockstep (``-L4``). With a latent model (``vae``):
    vae-reconstruction, the VAE decoding its encoding of the ground truth (no sampling).
    """
    methods = [Method("bicubic", bicubic=True)]
    if vae:
        methods.append(Method(VAE_ROW, vae_roundtrip=True))
    methods += [Method("independent"),
               fusion("forward-fusion", weight, direction="forward")]
    methods += [fusion(default_method_name(w), w) for w in sorted({0.3, 0.5, 0.8, weight})]
    if vae:  # latent models: the same fusion on the decoded x0 estimates (alignment.space: decoded)
        methods.append(Method(f"{default_method_name(weight)}-decoded",
                              alignment={"mode": "fusion", "weight": weight, "schedule": "constant", "space": "decoded"}))
    # the same without back-projection (sampling.back_projection; it is on in the rows above when the run's is)
    methods += [Method("independent-no-bp", options={"back_projection": False}),
                fusion(f"{default_method_name(weight)}-no-bp", weight, back_projection=False)]
    methods += [
        fusion(f"{default_method_name(weight)}-linear", weight, "linear"),
        fusion("bidir-fusion-passes2", weight, passes=2),
        fusion("bidir-fusion-strength0.3", weight, strength=0.3),
        fusion("bidir-fusion-strength0.7", weight, strength=0.7),
    ]
    farneback = fusion("bidir-fusion-farneback", weight)
    farneback.flow = {"method": "farneback"}
    methods.append(farneback)
    methods += [fusion(f"chains-L{n}", weight, chain_length=n, batch_size=max(num_frames, 1)) for n in (8, 4, 2)]
    def with_tcm(name: str, **spec) -> Method:
        return Method(name, alignment={"mode": "tcm", "scale": tcm_scale, **spec})

    if tcm:
        methods += [with_tcm("tcm"), with_tcm(f"tcm+fusion-w{weight:g}", fusion=weight)]
        methods.append(Method("tcm-no-bp", options={"back_projection": False},
                              alignment={"mode": "tcm", "scale": tcm_scale}))
        if preview:
            methods.append(with_tcm("tcm-preview", decoder="preview"))
            # which steps can skip the TCM (alignment.tcm_start / tcm_end): only the first or the last half,
            # or only the last 30 % or 20 % (3 or 2 of 10 steps: issue 14's time bar, 1.5x fusion's time per
            # frame-step, leaves room for about 3 TCM steps on this CPU)
            methods += [with_tcm("tcm-preview-first-half", decoder="preview", end=0.5),
                        with_tcm("tcm-preview-last-half", decoder="preview", start=0.5),
                        with_tcm("tcm-preview-last-0.3", decoder="preview", start=0.7),
                        with_tcm("tcm-preview-last-0.2", decoder="preview", start=0.8),
                        # the cheap window combined with training-free fusion of the x0 estimates
                        with_tcm(f"tcm-preview-last-half+fusion-w{weight:g}", decoder="preview", start=0.5,
                                 fusion=weight)]
            # chains of 4 frames in lockstep (schedule.chain_length): one frame of each chain per model
            # call, so a quarter of the TCM's one-frame calls; the lever on its time where those calls are
            # launch-bound (a GPU), at the cost of the sweep's reach
            lockstep = {"chain_length": 4, "batch_size": max(num_frames, 1)}
            exact = {m.name: m for m in methods}
            methods += [replace(exact[n], name=f"{n}-L4", options={**exact[n].options, **lockstep})
                        for n in ("tcm-preview", f"tcm-preview-last-half+fusion-w{weight:g}")]
    return methods


def select(methods: list[Method], names: list[str] | None) -> list[Method]:
    """The methods named in ``names`` (bicubic always included), in the table's order."""
    if not names:
        return methods
    known = {m.name for m in methods}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(known))}")
    wanted = set(names) | {"bicubic", VAE_ROW}
    return [m for m in methods if m.name in wanted]


# ----------------------------------------------------------------------------- figures


def crop_box(arg: str | None, height: int, width: int) -> tuple[int, int, int]:
    """'Y,X,SIZE' (top-left corner and side) or None: a centred square of side min(64, H, W)."""
    if arg is None:
        size = min(64, height, width)
        return (height - size) // 2, (width - size) // 2, size
    try:
        y, x, size = (int(v) for v in arg.split(","))
    except ValueError:
        raise ValueError(f"--crop must be Y,X,SIZE (integers), not {arg!r}") from None
    if size < 1 or y < 0 or x < 0 or y + size > height or x + size > width:
        raise ValueError(f"--crop {arg} does not fit in frames of {height}x{width}")
    return y, x, size


def strip_crops(frames: torch.Tensor, first: int, box: tuple[int, int, int], count: int = 4) -> np.ndarray:
    """(F, 3, H, W) -> uint8 (count, size, size, 3) crops of frames first..first+count-1."""
    y, x, size = box
    return to_uint8(frames[first:first + count, :, y:y + size, x:x + size])


def save_strip(path: Path, rows: list[tuple[str, np.ndarray]], first: int, zoom: int) -> None:
    """Rows = methods, columns = consecutive frames; crops enlarged ``zoom`` x with nearest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(c) for _, c in rows)
    side = rows[0][1].shape[1] * zoom
    dpi = 100
    label = 0.3 + 0.06 * max(len(name) for name, _ in rows)  # inches for the row names (8 pt)
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False,
                             figsize=(ncols * side / dpi + label, len(rows) * (side / dpi + 0.05) + 0.4), dpi=dpi)
    for r, (name, crops) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(crops):
                ax.imshow(np.repeat(np.repeat(crops[c], zoom, 0), zoom, 1), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(f"frame {first + c}", fontsize=8)
    fig.subplots_adjust(left=(label - 0.1) / fig.get_figwidth(), right=0.99, top=1 - 0.3 / fig.get_figheight(),
                        bottom=0.01, wspace=0.03, hspace=0.05)
    fig.savefig(path)
    plt.close(fig)


def save_plot(path: Path, points: list[tuple[str, float, float]], gt_ewarp: float, title: str) -> None:
    """E_warp x 1e3 (x) vs PSNR (y), one labelled point per method, the GT's E_warp as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    for name, ew, p in points:
        if math.isfinite(ew) and math.isfinite(p):
            ax.scatter(ew * EWARP_UNIT, p, s=22, color="black" if name == "bicubic" else "tab:blue", zorder=3)
            ax.annotate(name, (ew * EWARP_UNIT, p), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axvline(gt_ewarp * EWARP_UNIT, color="tab:green", linestyle="--", label="ground truth E_warp")
    ax.set_xlabel("E_warp x 1e3 (GT flows, occlusion-masked; lower = more consistent)")
    ax.set_ylabel("PSNR vs ground truth (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- targets


def check_targets(results: dict[str, dict], default: str) -> list[str]:
    """The issue's acceptance targets on this run's numbers, one line each (MET / NOT MET / n/a)."""
    lines = []
    fused, indep, bic = results.get(default), results.get("independent"), results.get("bicubic")

    def ok(cond: bool) -> str:
        return "MET" if cond else "NOT MET"

    if fused and indep:
        a = fused["ewarp"] <= 0.5 * indep["ewarp"]
        lines.append(f"(a) {ok(a)}: E_warp x1e3 {default} {fused['ewarp'] * EWARP_UNIT:.3f} <= 0.5 x independent "
                     f"{indep['ewarp'] * EWARP_UNIT:.3f} = {0.5 * indep['ewarp'] * EWARP_UNIT:.3f} "
                     f"(ratio {fused['ewarp'] / indep['ewarp']:.2f})")
        b = fused["psnr"] >= indep["psnr"] - 0.2
        lines.append(f"(b) {ok(b)}: PSNR {default} {fused['psnr']:.2f} dB vs independent {indep['psnr']:.2f} dB "
                     f"(diff {fused['psnr'] - indep['psnr']:+.2f} dB, allowed -0.20)")
        c = fused["sharpness_ratio"] >= 0.9 * indep["sharpness_ratio"]
        lines.append(f"(c) {ok(c)}: sharpness ratio {default} {fused['sharpness_ratio']:.3f} >= 0.9 x independent "
                     f"{indep['sharpness_ratio']:.3f} = {0.9 * indep['sharpness_ratio']:.3f}")
    else:
        lines.append(f"(a)-(c) n/a: needs both {default} and independent in --methods")
    if fused and bic:
        gain = fused["psnr"] - bic["psnr"]
        d_sharp, b_sharp = abs(fused["sharpness_ratio"] - 1), abs(bic["sharpness_ratio"] - 1)
        d = gain >= GAIN_BAR_DB and d_sharp < b_sharp
        lines.append(f"(d) {ok(d)}: PSNR {default} - bicubic = {gain:+.2f} dB (>= {GAIN_BAR_DB:g}); |sharpness ratio - 1| "
                     f"{d_sharp:.3f} vs bicubic {b_sharp:.3f} (must be smaller)")
    else:
        lines.append(f"(d) n/a: needs {default} in --methods")
    if VAE_ROW in results:
        e = results[VAE_ROW]["psnr"]
        lines.append(f"(e) {ok(e >= VAE_BAR_DB)}: the VAE alone reconstructs the ground truth at {e:.2f} dB "
                     f"(>= {VAE_BAR_DB:g})")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/consistency.py", description=__doc__.split("\n")[0])
    p.add_argument("--clips", nargs="+", default=[str(EXAMPLE_GT)], help="ground-truth videos or image folders")
    p.add_argument("--start", type=int, default=0, help="first frame read from each clip")
    p.add_argument("--max-frames", type=int, default=None, help="frames per clip (default: all; --quick: 4)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side of the ground truth after resizing (default: as read; --quick: 64)")
    p.add_argument("--scale", type=int, default=None, help="SR factor; must match the model's (default: the model's)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: configs/default.yaml; --quick: 4)")
    p.add_argument("--strength", type=float, default=DEFAULTS["strength"])
    p.add_argument("--weight", type=float, default=DEFAULTS["weight"], help="fusion weight of the default method and variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--back-projection", choices=("on", "off"), default="on" if DEFAULTS["back_projection"] else "off",
                   help="sampling.back_projection of every row but the -no-bp ones (default: configs/default.yaml)")
    p.add_argument("--batch-size", type=int, default=0, help="frames per model call (0: auto, as the job)")
    p.add_argument("--tcm-scale", type=float, default=1.0,
                   help="ControlNet conditioning scale of every tcm row (alignment.tcm_scale)")
    p.add_argument("--methods", default=None, help="comma list of methods to run (bicubic is always run)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 frames at 64x64, 4 steps, 4 methods")
    p.add_argument("--out", default=None, help="output path stem (default: benchmarks/results/consistency; "
                   "runs/benchmarks/consistency with --quick or --methods)")
    p.add_argument("--zoom", type=int, default=3, help="nearest-neighbour enlargement of the strip crops")
    p.add_argument("--crop", default=None, help="strip crop Y,X,SIZE in output pixels (default: centred 64x64)")
    p.add_argument("--strip-frame", type=int, default=None, help="first of the 4 strip frames (default: middle)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.max_frames = args.max_frames if args.max_frames is not None else quick.get("max_frames")
    args.resize = args.resize if args.resize is not None else quick.get("resize")
    args.steps = args.steps if args.steps is not None else quick.get("steps", DEFAULTS["steps"])
    if args.out is None:
        args.out = str(default_out("consistency", full=not args.quick and args.methods is None))
    if args.zoom < 1:
        p.error(f"--zoom must be >= 1, got {args.zoom}")
    if args.max_frames is not None and args.max_frames < 2:
        p.error(f"--max-frames must be >= 2 (warp errors compare neighbouring frames), got {args.max_frames}")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device(args.device)
    pipe = load_pipeline(args.model, device, pick_dtype(args.dtype, device))
    scale = pipe.scale if args.scale is None else args.scale
    if scale != pipe.scale:
        raise ValueError(f"--scale {args.scale} does not match the model's scale {pipe.scale}")
    base = SamplingOptions(num_inference_steps=args.steps, strength=args.strength, seed=args.seed,
                           batch_size=args.batch_size, back_projection=args.back_projection == "on")
    default = default_method_name(args.weight)
    clips = [load_clip(c, scale, start=args.start, max_frames=args.max_frames, stride=args.stride,
                       resize=args.resize) for c in args.clips]
    for clip in clips:
        m = pipe.input_multiple()
        if clip.lr.shape[-1] % m or clip.lr.shape[-2] % m:
            raise ValueError(f"{clip.name}: input {tuple(clip.lr.shape[-2:])} is not a multiple of {m}")
    names = [n.strip() for n in args.methods.split(",")] if args.methods else None
    if args.quick and names is None:
        names = [n.format(default=default) for n in QUICK_METHODS]
    has_tcm = pipe.controlnet is not None
    methods = select(build_methods(args.weight, min(len(c.gt) for c in clips), tcm=has_tcm,
                                   preview=getattr(pipe, "preview", None) is not None,
                                   vae=getattr(pipe, "vae", None) is not None, tcm_scale=args.tcm_scale), names)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_clip, strips = [], []
    for clip in clips:
        ref = Reference.of(clip.gt)
        first = args.strip_frame if args.strip_frame is not None else max(0, len(clip.gt) // 2 - 2)
        first = min(max(first, 0), max(len(clip.gt) - 4, 0))
        box = crop_box(args.crop, *clip.gt.shape[-2:])
        rows = [("ground truth", strip_crops(clip.gt, first, box))]
        records = {}
        for method in methods:
            print(f"[{clip.name}] {method.name} ...", file=sys.stderr, flush=True)
            run = run_method(pipe, method, clip.gt if method.vae_roundtrip else clip.lr, base)
            metrics = evaluate(run.frames, ref) if run.frames is not None else None
            records[method.name] = run_record(run, metrics)
            if run.error:
                print(f"  error: {run.error}", file=sys.stderr)
            else:
                rows.append((method.name, strip_crops(run.frames, first, box)))
                print(f"  {run.seconds:.1f} s, PSNR {metrics['psnr']:.2f}, E_warp x1e3 "
                      f"{metrics['ewarp'] * EWARP_UNIT:.3f}", file=sys.stderr)
        per_clip.append({"clip": str(clip.name), "frames": len(clip.gt), "gt_size": list(clip.gt.shape[-2:]),
                         "gt_ewarp": ref.ewarp, "gt_sharpness": ref.sharpness, "strip_first_frame": first,
                         "strip_crop": list(box), "methods": records})
        strips.append((clip.name, rows, first))

    summary = mean_over_clips(per_clip, [m.name for m in methods])
    gt_ewarp = float(np.mean([c["gt_ewarp"] for c in per_clip]))
    targets = check_targets({k: v for k, v in summary.items() if v.get("psnr") is not None}, default)

    info = machine_info(device)
    cmd = command_line("benchmarks/consistency.py", argv)
    report = {
        "command": cmd, "machine": info, "model": model_info(args.model),
        "options": {"num_inference_steps": args.steps, "strength": args.strength, "fusion_weight": args.weight,
                    "tcm_scale": args.tcm_scale, "back_projection": args.back_projection == "on",
                    "seed": args.seed, "batch_size": args.batch_size, "scale": scale, "dtype": args.dtype},
        "default_method": default, "ewarp_unit_in_tables": EWARP_UNIT,
        "methods_spec": [method_dict(m) for m in methods], "clips": per_clip,
        "mean": summary, "gt_ewarp_mean": gt_ewarp, "targets": targets, "notes": [] if has_tcm else [TCM_NOTE],
    }
    write_json(out.with_suffix(".json"), report)
    md = markdown_report(report, per_clip, summary, methods, gt_ewarp)
    out.with_suffix(".md").write_text(md)
    title = f"{', '.join(c['clip'] for c in per_clip)}: {args.steps} steps, strength {args.strength}, seed {args.seed}"
    points = [(n, r.get("ewarp", math.nan), r.get("psnr", math.nan)) for n, r in summary.items()]
    save_plot(out.parent / f"{out.name}_plot.png", points, gt_ewarp, title)
    for k, (name, rows, first) in enumerate(strips):
        suffix = "_strip.png" if k == 0 else f"_strip_{name}.png"
        save_strip(out.parent / f"{out.name}{suffix}", rows, first, args.zoom)

    print(md)
    print("\nTargets (this run):")
    for line in targets:
        print("  " + line)
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.name}_plot.png, {out.name}_strip.png")
    return report


METRICS = ("psnr", "ssim", "ewarp", "tof", "sharpness", "sharpness_ratio", "seconds_per_frame")


def mean_over_clips(per_clip: list[dict], names: list[str]) -> dict[str, dict]:
    """Per method, the mean of each metric over the clips where it ran (errors kept as text)."""
    summary = {}
    for name in names:
        recs = [c["methods"][name] for c in per_clip if not c["methods"][name]["error"]]
        errors = [c["methods"][name]["error"] for c in per_clip if c["methods"][name]["error"]]
        row = {k: float(np.mean([r[k] for r in recs])) for k in METRICS} if recs else {}
        if errors:
            row["error"] = errors[0]
        summary[name] = row
    return summary


def markdown_report(report: dict, per_clip: list[dict], summary: dict, methods: list[Method], gt_ewarp: float) -> str:
    o, model = report["options"], report["model"]
    snapshot = f" (snapshot after {model['train_steps']} training steps)" if "train_steps" in model else ""
    lines = [
        "# Temporal consistency benchmark", "",
        f"- command: `{report['command']}`",
        f"- machine: {machine_line(report['machine'])}",
        f"- model: `{model['path']}`{snapshot}, x{o['scale']}",
        f"- clips: " + "; ".join(f"{c['clip']} ({c['frames']} frames, GT {c['gt_size'][1]}x{c['gt_size'][0]})"
                                 for c in per_clip),
        f"- base options: {o['num_inference_steps']} steps, strength {o['strength']}, fusion weight "
        f"{o['fusion_weight']}, seed {o['seed']}, {o['dtype']}, back-projection "
        f"{'on' if o.get('back_projection') else 'off'} (not in the -no-bp rows); default method "
        f"`{report['default_method']}`",
        "- E_warp (Lai et al. 2018) on [-1, 1] values, with DIS flows and forward-backward occlusion masks computed "
        "on the ground truth, shown **x 1000**; tOF in pixels (DIS flows of the output vs the GT's); sharpness "
        "ratio = mean luma gradient of the output / of the GT; s/frame = wall time of the pipeline call / frames.",
        "",
    ]
    headers = ["method", "PSNR (dB)", "SSIM", "E_warp x1e3", "tOF (px)", "sharpness ratio", "s/frame"]

    def table(rows: dict, gt: float) -> str:
        body = [["ground truth (reference)", "inf", "1.0000", fmt(gt * EWARP_UNIT, 3), "0.000", "1.000", "-"]]
        for m in methods:
            r = rows[m.name]
            if "psnr" not in r:
                body.append([m.name, f"error: {r.get('error', '?')}", "", "", "", "", ""])
                continue
            body.append([m.name, fmt(r["psnr"]), fmt(r["ssim"], 4), fmt(r["ewarp"] * EWARP_UNIT, 3),
                         fmt(r["tof"], 3), fmt(r["sharpness_ratio"], 3), fmt(r["seconds_per_frame"], 2)])
        if TCM_NOTE in report["notes"]:  # not when the model has a TCM that --methods left out
            body.append(["tcm", "n/a (the model has no controlnet/)", "", "", "", "", ""])
        return markdown_table(headers, body)

    if len(per_clip) > 1:
        lines += [f"## Mean over {len(per_clip)} clips", "", table(summary, gt_ewarp), ""]
    for c in per_clip:
        rows = {}
        for n, r in c["methods"].items():
            rows[n] = r if not r["error"] else {"error": r["error"]}
        lines += [f"## {c['clip']}", "", table(rows, c["gt_ewarp"]), ""]
    lines += ["## Per-stage seconds", ""]
    stages = sorted({s for c in per_clip for r in c["methods"].values() for s in r["timings"]})
    body = []
    for m in methods:
        secs = [sum(c["methods"][m.name]["timings"].get(s, 0.0) for c in per_clip) for s in stages]
        total = sum(c["methods"][m.name]["seconds"] for c in per_clip)
        body.append([m.name, *(fmt(x, 2) for x in secs), fmt(total, 2)])
    lines += [markdown_table(["method", *stages, "wall"], body), ""]
    lines += ["## Targets (computed in this run)", ""] + [f"- {t}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
