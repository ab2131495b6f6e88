"""Where the time and memory of a run go, and what the cheaper variants cost in consistency.

    python benchmarks/speed.py                               # all sections, full size
    python benchmarks/speed.py --quick                       # smoke run: 64x64 output, few frames, few steps
    python benchmarks/speed.py --sections limit,chains --device cuda --dtype float16

Sections (``--sections``):

* ``limit``: the physical limit of frame-wise sampling is frames x steps run x one model evaluation;
  the pipeline's wall time is reported as a ratio to the summed model time of the same run (the
  StageTimer's ``model`` stage), with the per-stage split (model, flow, align, scheduler,
  decode/vae, io = reading the clip and writing an mp4 with ``pipelines.video_io``);
* ``scaling``: time and peak memory for 8, 16, 32 and 64 frames, each in a fresh subprocess
  (host RSS high-water mark, CUDA max_memory_allocated), next to the size of the samples tensor;
* ``schedulers``: DDPM vs DDIM and DPM-Solver++ at fewer steps (same strength): E_warp, PSNR, time;
* ``chains``: chain lengths N, 16, 8, 4, 2 at 32 frames (issue 8): throughput, E_warp, PSNR, sharpness.
* ``models``: the default job as a user runs it (``python run_video.py`` on the example clip, each model
  in turn with ``model.path=M``, ``--compare-models``): the wall time of the command (imports and
  loading included) and the report's sampling time (its timed stages without loading, I/O and
  metrics), with PSNR against the ground truth and the ratio of each model's sampling time to the first's.
* ``batches``: seconds per frame of one UNet call and one VAE decoder call at batch sizes 1 to 16, per
  ``--compare-models`` model, next to the batch size ``auto`` picks (what ``auto_batch`` is based on).

Figures and ratios are printed and written to ``<out>.md`` / ``<out>.json``; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, run from anywhere
from common import (run_script, DEFAULTS, DEFAULT_MODEL, EWARP_UNIT, EXAMPLE_GT, ROOT, SHARED_CLIPS, Method, Reference,  # noqa: E402
                    default_out, resolve_model,
                    run_cli, command_line, evaluate, fmt, fusion, load_clip, load_pipeline, machine_info, machine_line,
                    markdown_table, model_info, pick_device, pick_dtype, run_method, run_record, set_threads,
                    steps_run, sync, write_json)

import torch  # noqa: E402

from pipelines.loading import make_scheduler  # noqa: E402
from pipelines.sampler import img2img_timesteps  # noqa: E402
from pipelines.video_io import read_clip, to_tensor, to_uint8, write_video  # noqa: E402
from pipelines.video_pipeline import SamplingOptions  # noqa: E402

SECTIONS = ("limit", "scaling", "schedulers", "chains", "models", "batches")
NOT_SAMPLING = ("total", "io", "load", "import", "metrics")  # a report's timings that are not sampling
STAGES = ("model", "flow", "align", "scheduler", "decode", "vae")
CHAIN_CLIP = SHARED_CLIPS / "woman-running.mp4"
CHAIN_START = 30  # where assets/example_gt was cut from woman-running
SCHEDULERS = "ddpm:20,ddpm:10,ddim:10,ddim:6,dpm++:10,dpm++:6"
SAME_EWARP = 0.10  # "same consistency": E_warp within 10 % of DDPM's ...
SAME_PSNR = 0.1  # ... and PSNR at most 0.1 dB below DDPM's
QUICK = dict(resize=64, steps=4, limit_frames=4, scaling_frames="4,8", chain_frames=8,
             schedulers="ddpm:4,ddim:2,dpm++:2")


# ----------------------------------------------------------------------------- helpers


def max_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def sample_shape(pipe, lr: torch.Tensor) -> tuple[int, ...]:
    """(F, C, h, w) of the samples the sampler iterates on, for a low-res clip ``lr``."""
    F, _, h, w = lr.shape
    H, W = pipe.output_size(lr)
    if pipe.kind == "upscale":
        return F, pipe.vae.config.latent_channels, h, w
    if pipe.kind == "img2img":
        down = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return F, pipe.vae.config.latent_channels, H // down, W // down
    return F, pipe.unet.config.out_channels, H, W


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def base_options(args) -> SamplingOptions:
    return SamplingOptions(num_inference_steps=args.steps, strength=args.strength, seed=args.seed,
                           batch_size=args.batch_size)


def default_method(args) -> Method:
    return fusion(f"bidir-fusion-w{args.weight:g}", args.weight)


def warm_up(pipe, lr: torch.Tensor, args) -> None:
    """One short run so one-time costs (allocator, kernels, flow setup) are not timed."""
    opts = SamplingOptions(num_inference_steps=2, strength=0.5, seed=args.seed)
    run_method(pipe, default_method(args), lr[:2], opts)


def stage_split(run, extra: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per stage of one run, plus 'other' (wall minus the timed stages) and ``extra``."""
    split = {s: run.timings.get(s, 0.0) for s in STAGES if s in run.timings}
    split["other"] = max(run.seconds - sum(run.timings.values()), 0.0)
    split.update(extra or {})
    return split


# ----------------------------------------------------------------------------- sections


def section_limit(pipe, args) -> dict:
    source = Path(args.clip or EXAMPLE_GT)
    start = time.perf_counter()
    read_clip(source, max_frames=args.limit_frames)  # the io stage: decode the clip ...
    io_read = time.perf_counter() - start
    clip = load_clip(source, pipe.scale, max_frames=args.limit_frames, resize=args.resize)
    warm_up(pipe, clip.lr, args)
    result = {"clip": str(source), "frames": len(clip.gt), "gt_size": list(clip.gt.shape[-2:]), "runs": {}}
    for method in (default_method(args), Method("independent")):
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)
        run = run_method(pipe, method, clip.lr, base_options(args))
        if run.error:
            raise ValueError(f"limit: {method.name}: {run.error}")
        with tempfile.TemporaryDirectory() as tmp:  # ... and write the output as an mp4
            start = time.perf_counter()
            write_video(Path(tmp) / "out.mp4", to_uint8(run.frames), clip.fps)
            io_write = time.perf_counter() - start
        model = run.timings.get("model", math.nan)
        evals = run.calls.get("model", 0)
        frame_evals = len(clip.gt) * run.steps
        rec = run_record(run, None)
        rec.update({
            "model_seconds": model, "model_calls": evals, "frame_evaluations": frame_evals,
            "seconds_per_model_call": model / max(evals, 1),
            "seconds_per_frame_evaluation": model / max(frame_evals, 1),
            "ratio_wall_to_model": run.seconds / model,
            "ratio_wall_plus_io_to_model": (run.seconds + io_read + io_write) / model,
            "io_read_seconds": io_read, "io_write_seconds": io_write,
            "split": stage_split(run, {"io": io_read + io_write}),
            "cuda_peak_mib": mib(torch.cuda.max_memory_allocated(pipe.device)) if pipe.device.type == "cuda" else None,
        })
        result["runs"][method.name] = rec
    return result


def scaling_child(args) -> dict:
    """Runs in a fresh process: one clip of ``args.child_scaling`` frames, its time and peak memory."""
    device = pick_device(args.device)
    pipe = load_pipeline(args.model, device, pick_dtype(args.dtype, device))
    clip = load_clip(args.clip or EXAMPLE_GT, pipe.scale, resize=args.resize, num_frames=args.child_scaling)
    clip.gt, clip.lr = clip.gt[:args.child_scaling], clip.lr[:args.child_scaling]
    warm_up(pipe, clip.lr, args)
    rss_before = max_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = run_method(pipe, default_method(args), clip.lr, base_options(args))
    shape = sample_shape(pipe, clip.lr)
    return {
        "frames": len(clip.lr), "error": run.error, "seconds": run.seconds, "steps_run": run.steps,
        "seconds_per_frame": run.seconds_per_frame, "model_seconds": run.timings.get("model"),
        "rss_before_run_mib": rss_before, "rss_peak_mib": max_rss_mib(),
        "cuda_peak_mib": mib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "sample_shape": list(shape), "samples_mib": mib(math.prod(shape) * 4),
    }


def section_scaling(args, argv_common: list[str]) -> dict:
    rows = []
    for n in [int(v) for v in args.scaling_frames.split(",")]:
        print(f"[scaling] {n} frames (subprocess) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv_common, "--child-scaling", str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"frames": n, "error": f"subprocess failed (rc {proc.returncode}): {tail}"})
            continue
        rows.append(json.loads(line[len("RESULT "):]))
    source = args.clip or EXAMPLE_GT
    resized = f", resized to {args.resize}" if args.resize else ""
    return {"clip": f"{source}, ping-pong looped to each length{resized}",
            "rows": rows}


def parse_schedulers(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        kind, _, steps = item.strip().partition(":")
        if not steps.isdigit():
            raise ValueError(f"--schedulers entries must be KIND:STEPS (e.g. ddim:10), not {item!r}")
        out.append((kind, int(steps)))
    return out


def section_schedulers(pipe, args) -> dict:
    clip = load_clip(args.clip or EXAMPLE_GT, pipe.scale, max_frames=args.limit_frames, resize=args.resize)
    ref = Reference.of(clip.gt)
    warm_up(pipe, clip.lr, args)
    d = default_method(args)
    rows = {}
    for kind, steps in parse_schedulers(args.schedulers):
        name = f"{kind}-{steps}"
        print(f"[schedulers] {name} ...", file=sys.stderr, flush=True)
        method = Method(name, options={"num_inference_steps": steps}, alignment=d.alignment, scheduler=kind)
        run = run_method(pipe, method, clip.lr, base_options(args))
        rows[name] = run_record(run, evaluate(run.frames, ref) if run.frames is not None else None)
        rows[name]["t_start"] = first_timestep(pipe, kind, steps, args.strength)
    first = next(iter(rows))
    return {"frames": len(clip.gt), "gt_size": list(clip.gt.shape[-2:]), "gt_ewarp": ref.ewarp,
            "reference": first, "rows": rows, "verdict": scheduler_verdict(rows, first)}


def first_timestep(pipe, kind: str, steps: int, strength: float) -> int | None:
    """The timestep the img2img convention starts from (it depends on the step count, not only on strength)."""
    try:
        return int(img2img_timesteps(make_scheduler(pipe.scheduler.config, kind), steps, strength)[0])
    except ValueError:
        return None


def scheduler_verdict(rows: dict[str, dict], reference: str) -> str:
    """The cheapest scheduler whose E_warp and PSNR match the reference's (within SAME_EWARP, SAME_PSNR)."""
    ref = rows[reference]
    if ref.get("psnr") is None:
        return f"n/a: the reference {reference} failed ({ref['error']})"
    # a run whose only step is t = 0 adds no noise and returns about the bicubic frame: not a candidate
    same = [n for n, r in rows.items() if r.get("psnr") is not None and (n == reference or r.get("t_start"))
            and r["ewarp"] <= ref["ewarp"] * (1 + SAME_EWARP) and r["psnr"] >= ref["psnr"] - SAME_PSNR]
    if not same:
        return "n/a: no run has a finite E_warp and PSNR to compare (too few frames?)"
    best = min(same, key=lambda n: rows[n]["seconds"])
    r = rows[best]
    if best == reference:
        return (f"none of the cheaper schedulers matches {reference} (E_warp within {SAME_EWARP:.0%}, PSNR within "
                f"{SAME_PSNR} dB, first t > 0): {reference} is the cheapest with its consistency")
    rule = (f"E_warp <= {1 + SAME_EWARP:.2f} x {reference}'s, PSNR >= {reference}'s - {SAME_PSNR} dB, "
            "first t > 0")
    return (f"{best} gives the same consistency at the lowest cost ({rule}): {r['seconds']:.2f} s vs "
            f"{ref['seconds']:.2f} s ({ref['seconds'] / r['seconds']:.2f}x faster), E_warp x1e3 "
            f"{r['ewarp'] * EWARP_UNIT:.3f} vs {ref['ewarp'] * EWARP_UNIT:.3f}, PSNR {r['psnr']:.2f} vs "
            f"{ref['psnr']:.2f} dB, first t {r['t_start']} vs {ref['t_start']}")


def chain_clip(pipe, args):
    """32 frames of woman-running from frame 30 (the example's source) if present, else the example looped."""
    if args.clip is None and CHAIN_CLIP.exists():
        resize = args.resize or 256
        clip = load_clip(CHAIN_CLIP, pipe.scale, start=CHAIN_START, max_frames=args.chain_frames, resize=resize,
                         num_frames=args.chain_frames)
        return clip, f"{CHAIN_CLIP.name} frames {CHAIN_START}..{CHAIN_START + len(clip.gt) - 1}, resized to {resize}"
    source = args.clip or EXAMPLE_GT
    clip = load_clip(source, pipe.scale, resize=args.resize, num_frames=args.chain_frames)
    return clip, f"{source}, ping-pong looped to {args.chain_frames} frames"


def section_chains(pipe, args) -> dict:
    clip, label = chain_clip(pipe, args)
    ref = Reference.of(clip.gt)
    n = len(clip.gt)
    warm_up(pipe, clip.lr, args)
    lengths = [n] + [L for L in (16, 8, 4, 2) if L < n]
    methods = [fusion(f"L={L}" + (" (exact)" if L == n else ""), args.weight, chain_length=L, batch_size=n)
               for L in lengths]
    methods.append(Method("independent", options={"batch_size": n}))
    rows = {}
    for method in methods:
        print(f"[chains] {method.name} ...", file=sys.stderr, flush=True)
        run = run_method(pipe, method, clip.lr, base_options(args))
        rec = run_record(run, evaluate(run.frames, ref) if run.frames is not None else None)
        rec["chain_length"] = method.options.get("chain_length")
        rec["frame_steps_per_second"] = n * run.steps / run.seconds if not run.error else None
        rows[method.name] = rec
    exact = rows[methods[0].name]
    for rec in rows.values():
        rec["speedup_vs_exact"] = exact["seconds"] / rec["seconds"] if rec.get("seconds") else None
    return {"clip": label, "frames": n, "gt_size": list(clip.gt.shape[-2:]), "gt_ewarp": ref.ewarp,
            "batch_size": n, "rows": rows}


# ----------------------------------------------------------------------------- report


def section_models(args) -> dict:
    """The default job through the CLI, one subprocess per model (same clip, config, seed and machine)."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, model in enumerate(args.compare_models.split(",")):
            cli = ["--reference", str(EXAMPLE_GT), f"model.path={model}", f"model.device={args.device}",
                   f"model.dtype={args.dtype}", f"sampling.num_inference_steps={args.steps}"]  # --quick's too
            if args.threads:
                cli.append(f"runtime.threads={args.threads}")
            try:
                wall, rep = run_cli(cli, Path(tmp) / f"out{k}.mp4")
            except RuntimeError as err:
                rows[model] = {"error": str(err)}
                continue
            t = rep["timings"]
            rows[model] = {"wall_s": round(wall, 2), "sampling_s": round(sum(v for n, v in t.items()
                                                                              if n not in NOT_SAMPLING), 3),
                           "load_s": t.get("load"), "io_s": t.get("io"), "metrics_s": t.get("metrics"),
                           "stages": {n: v for n, v in t.items() if n not in NOT_SAMPLING},
                           "psnr": rep.get("psnr"), "frames": rep["frames"], "steps_run": rep["steps_run"],
                           "model_kind": rep["model_kind"]}
    first = next((r for r in rows.values() if "sampling_s" in r), None)
    for r in rows.values():
        if first and "sampling_s" in r:
            r["sampling_ratio_vs_first"] = round(r["sampling_s"] / first["sampling_s"], 3)
            r["wall_ratio_vs_first"] = round(r["wall_s"] / first["wall_s"], 3)
    return {"command": f"python run_video.py --reference assets/example_gt model.path=M model.dtype={args.dtype}",
            "rows": rows}


BATCHES = (1, 2, 4, 8, 16)


def time_per_frame(fn, batch: int, repeats: int = 3) -> float:
    """Seconds per frame of ``fn(batch)`` (one untimed warm-up call, then the mean of ``repeats``)."""
    fn(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    return (time.perf_counter() - start) / repeats / batch


def section_batches(args) -> dict:
    """Seconds per frame of one model (and VAE decoder) call at batch sizes 1 to 16, per model, on
    the example clip's sizes, next to the batch size ``auto`` picks (pipelines.video_pipeline.auto_batch)."""
    from pipelines.denoiser import Denoiser
    from pipelines.video_pipeline import auto_batch

    device = pick_device(args.device)
    rows = {}
    for model in args.compare_models.split(","):
        pipe = load_pipeline(model, device, pick_dtype(args.dtype, device))
        lr = load_clip(EXAMPLE_GT, pipe.scale, max_frames=1, resize=args.resize).lr
        shape = sample_shape(pipe, lr)[1:]
        size = pipe.output_size(lr)
        cond = pipe.conditioning_frames(lr) if pipe.kind == "residual_sr" else lr
        prompt = pipe.encode_prompt("") if pipe.text_encoder is not None else None
        den = Denoiser(pipe.unet, pipe.scheduler, prompt_embeds=prompt)
        t = pipe.scheduler.config.num_train_timesteps // 2
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((max(BATCHES), *shape), generator=gen).to(device, pipe.unet.dtype)
        c = cond.expand(max(BATCHES), *cond.shape[1:]).to(device)

        def unet(b):
            with torch.no_grad():
                den(x[:b], t, concat=c[:b] if pipe.kind in ("residual_sr", "upscale") else None)
            sync(device)

        row = {"model_kind": pipe.kind, "input": list(shape),
               "unet_s_per_frame": {b: time_per_frame(unet, b) for b in BATCHES},
               "auto_model_batch": auto_batch(device, shape[-2] * shape[-1])}
        if pipe.vae is not None:
            z = x[:, :pipe.vae.config.latent_channels].to(pipe.vae.dtype)

            def decode(b):
                with torch.no_grad():
                    pipe.vae.decode(z[:b])
                sync(device)

            row["decode_s_per_frame"] = {b: time_per_frame(decode, b, 2) for b in BATCHES}
            row["auto_decode_batch"] = auto_batch(device, size[0] * size[1])
        rows[model] = row
        print(f"[batches] {model}: " + ", ".join(f"{b}: {v * 1e3:.1f} ms" for b, v in row["unet_s_per_frame"].items()),
              file=sys.stderr, flush=True)
    return {"rows": rows}


def markdown_report(report: dict) -> str:
    o, model = report["options"], report["model"]
    snapshot = f" (snapshot after {model['train_steps']} training steps)" if "train_steps" in model else ""
    lines = ["# Speed benchmark", "",
             f"- command: `{report['command']}`",
             f"- machine: {machine_line(report['machine'])}",
             f"- model: `{model['path']}`{snapshot}; {o['dtype']}",
             f"- options: {o['num_inference_steps']} steps, strength {o['strength']} "
             f"({o['steps_run']} steps run), fusion weight {o['fusion_weight']}, seed {o['seed']}",
             "- E_warp on [-1, 1] values with ground-truth DIS flows and occlusion masks, shown **x 1000**.", ""]
    s = report["sections"]
    if "limit" in s:
        lim = s["limit"]
        lines += ["## Physical limit: wall time / summed model time", "",
                  f"Clip `{lim['clip']}`, {lim['frames']} frames, GT {lim['gt_size'][1]}x{lim['gt_size'][0]}. "
                  "The lower bound of frame-wise sampling is frames x steps run x one model evaluation, i.e. "
                  "the `model` stage; the ratio says how far the pipeline is from it.", ""]
        body = []
        for name, r in lim["runs"].items():
            body.append([name, fmt(r["seconds"], 2), fmt(r["model_seconds"], 2), r["model_calls"],
                         r["frame_evaluations"], fmt(r["seconds_per_model_call"], 3),
                         f"**{r['ratio_wall_to_model']:.3f}**", fmt(r["ratio_wall_plus_io_to_model"], 3),
                         fmt(r["cuda_peak_mib"], 0)])
        lines += [markdown_table(["method", "wall s", "model s", "model calls", "frame evals", "s / call",
                                  "wall / model", "(wall + io) / model", "CUDA peak MiB"], body), ""]
        stages = sorted({k for r in lim["runs"].values() for k in r["split"]}, key=lambda k: (k == "other", k))
        body = []
        for name, r in lim["runs"].items():
            tot = sum(r["split"].values())
            body.append([name, *(f"{r['split'].get(k, 0.0):.3f} ({100 * r['split'].get(k, 0.0) / tot:.1f} %)"
                                 for k in stages)])
        lines += ["Per-stage seconds (share of wall + io); align = warping and fusion (and x0 maths), "
                  "io = reading the clip + writing an mp4, other = wall minus timed stages:", "",
                  markdown_table(["method", *stages], body), ""]
    if "scaling" in s:
        sc = s["scaling"]
        lines += ["## Scaling with clip length (fusion, one fresh process per length)", "",
                  f"Clip: {sc['clip']}. RSS = host resident-set high-water mark (`ru_maxrss`) of the child; "
                  "'before' is after loading the model, building the clip and a warm-up run.", ""]
        body = []
        for r in sc["rows"]:
            if r.get("error"):
                body.append([r["frames"], f"error: {r['error']}", "", "", "", "", "", ""])
                continue
            body.append([r["frames"], fmt(r["seconds"], 2), fmt(r["seconds_per_frame"], 3),
                         fmt(r["rss_before_run_mib"], 0), fmt(r["rss_peak_mib"], 0),
                         fmt(r["rss_peak_mib"] - r["rss_before_run_mib"], 0), fmt(r["cuda_peak_mib"], 0),
                         f"{fmt(r['samples_mib'], 1)} ({'x'.join(map(str, r['sample_shape']))})"])
        lines += [markdown_table(["frames", "wall s", "s/frame", "RSS before MiB", "RSS peak MiB", "RSS growth MiB",
                                  "CUDA peak MiB", "samples tensor MiB (F x C x H x W x 4 B)"], body), ""]
    if "schedulers" in s:
        sc = s["schedulers"]
        lines += ["## Schedulers (same strength, fusion)", "",
                  f"{sc['frames']} frames, GT {sc['gt_size'][1]}x{sc['gt_size'][0]}; GT E_warp x1e3 "
                  f"{sc['gt_ewarp'] * EWARP_UNIT:.3f}. 'first t' is the timestep sampling starts from: with "
                  "diffusers' img2img convention (run the last int(steps x strength) steps) it depends on the "
                  "step count too, so fewer steps also start from a slightly lower noise level.", ""]
        body = []
        for name, r in sc["rows"].items():
            if r["error"]:
                body.append([name, f"error: {r['error']}", "", "", "", "", "", ""])
                continue
            body.append([name, r["steps_run"], r["t_start"], fmt(r["ewarp"] * EWARP_UNIT, 3), fmt(r["psnr"]),
                         fmt(r["sharpness_ratio"], 3), fmt(r["seconds"], 2), fmt(r["seconds_per_frame"], 3)])
        lines += [markdown_table(["scheduler-steps", "steps run", "first t", "E_warp x1e3", "PSNR (dB)",
                                  "sharpness ratio",
                                  "wall s", "s/frame"], body), "", f"**{sc['verdict']}**", ""]
    if "models" in s:
        lines += ["## models: the default job through the CLI, per model", "",
                  f"`{s['models']['command']}`; sampling = the report's timed stages without load, io and metrics", ""]
        body = []
        for m, r in s["models"]["rows"].items():
            if "error" in r:
                body.append([m, f"error: {r['error']}", "", "", "", ""])
                continue
            body.append([f"`{m}` ({r['model_kind']})", f"{r['sampling_s']:.2f}", f"{r['sampling_ratio_vs_first']:.3f}",
                         f"{r['wall_s']:.2f}", f"{r['wall_ratio_vs_first']:.3f}",
                         "-" if r["psnr"] is None else f"{r['psnr']:.2f}"])
        lines += [markdown_table(["model", "sampling s", "ratio", "wall s (CLI)", "ratio", "PSNR (dB)"], body), ""]
    if "batches" in s:
        lines += ["## batches: seconds per frame of one call, by batch size", "",
                  "The UNet (with its conditioning) on the example clip's input, and the VAE decoder; **bold**: "
                  "the batch size `sampling.batch_size: 0` (auto) picks on this device.", ""]
        body = []
        for m, r in s["batches"]["rows"].items():
            for part, key, auto in (("UNet", "unet_s_per_frame", "auto_model_batch"),
                                    ("VAE decoder", "decode_s_per_frame", "auto_decode_batch")):
                if key in r:
                    cells = [(f"**{v * 1e3:.1f}**" if int(b) == r[auto] else f"{v * 1e3:.1f}")
                             for b, v in r[key].items()]
                    body.append([f"`{m}` {part}", *cells])
        lines += [markdown_table(["ms per frame at batch", *map(str, BATCHES)], body), ""]
    if "chains" in s:
        ch = s["chains"]
        lines += ["## Chains (issue 8)", "",
                  f"Clip: {ch['clip']} ({ch['frames']} frames, GT {ch['gt_size'][1]}x{ch['gt_size'][0]}); batch "
                  f"size {ch['batch_size']} so each position along the chains is one model call; GT E_warp x1e3 "
                  f"{ch['gt_ewarp'] * EWARP_UNIT:.3f}.", ""]
        body = []
        for name, r in ch["rows"].items():
            if r["error"]:
                body.append([name, f"error: {r['error']}", "", "", "", "", "", ""])
                continue
            body.append([name, r["calls"].get("model", 0), fmt(r["frame_steps_per_second"], 3),
                         f"{r['speedup_vs_exact']:.2f}x",
                         fmt(r["ewarp"] * EWARP_UNIT, 3), fmt(r["psnr"]), fmt(r["sharpness_ratio"], 3),
                         fmt(r["seconds"], 2)])
        lines += [markdown_table(["chain length", "model calls", "frames x steps / s", "speedup vs exact",
                                  "E_warp x1e3",
                                  "PSNR (dB)", "sharpness ratio", "wall s"], body), ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/speed.py", description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="half precision needs CUDA")
    p.add_argument("--clip", default=None, help="ground-truth clip (default: assets/example_gt; chains: "
                   "woman-running from ../shared/clips when present)")
    p.add_argument("--resize", type=int, default=None, help="shorter side of the ground truth (--quick: 64)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: configs/default.yaml; --quick: 4)")
    p.add_argument("--strength", type=float, default=DEFAULTS["strength"])
    p.add_argument("--weight", type=float, default=DEFAULTS["weight"], help="fusion weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, help="frames per model call (0: auto, as the job)")
    p.add_argument("--limit-frames", type=int, default=None, help="frames for limit/schedulers (default 16)")
    p.add_argument("--scaling-frames", default=None, help="comma list of clip lengths (default 8,16,32,64)")
    p.add_argument("--chain-frames", type=int, default=None, help="frames for the chains section (default 32)")
    p.add_argument("--schedulers", default=None, help=f"KIND:STEPS list (default {SCHEDULERS})")
    p.add_argument("--compare-models", default="weights/vsr-x4,weights/latent-x4",
                   help="models section: comma list of model paths (ratios are to the first)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64x64 output, 4-8 frames, 4 steps")
    p.add_argument("--out", default=None, help="output path stem (default: benchmarks/results/speed for a full "
                   "run; runs/benchmarks/speed with --quick or some --sections)")
    p.add_argument("--child-scaling", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    defaults = dict(resize=None, steps=DEFAULTS["steps"], limit_frames=16, scaling_frames="8,16,32,64", chain_frames=32,
                    schedulers=SCHEDULERS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, value))
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; expected some of {', '.join(SECTIONS)}")
    if args.out is None:  # a smoke or partial run must not replace the committed full report
        args.out = str(default_out("speed", full=not args.quick and set(args.sections) == set(SECTIONS)))
    if {"models", "batches"} & set(args.sections):
        args.compare_models = ",".join(resolve_model(m.strip()) for m in args.compare_models.split(","))
    if args.limit_frames < 2:
        p.error(f"--limit-frames must be >= 2, got {args.limit_frames}")
    return args


def child_argv(args) -> list[str]:
    """The flags a scaling subprocess needs to run the same configuration."""
    argv = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
            "--strength", str(args.strength), "--weight", str(args.weight), "--seed", str(args.seed),
            "--batch-size", str(args.batch_size)]
    if args.resize:
        argv += ["--resize", str(args.resize)]
    if args.clip:
        argv += ["--clip", args.clip]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    set_threads(args.threads)
    if args.child_scaling is not None:
        result = scaling_child(args)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, device, dtype) if set(args.sections) - {"scaling", "models", "batches"} else None
    out = Path(args.out)
    report = {
        "command": command_line("benchmarks/speed.py", argv), "machine": machine_info(device),
        "model": model_info(args.model),
        "options": {"num_inference_steps": args.steps, "strength": args.strength,
                    "steps_run": steps_run(base_options(args)), "fusion_weight": args.weight, "seed": args.seed,
                    "dtype": args.dtype, "batch_size": args.batch_size},
        "sections": {},
    }
    for name in args.sections:
        print(f"== {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if name == "limit":
            report["sections"]["limit"] = section_limit(pipe, args)
        elif name == "scaling":
            report["sections"]["scaling"] = section_scaling(args, child_argv(args))
        elif name == "schedulers":
            report["sections"]["schedulers"] = section_schedulers(pipe, args)
        elif name == "chains":
            report["sections"]["chains"] = section_chains(pipe, args)
        elif name == "models":
            report["sections"]["models"] = section_models(args)
        elif name == "batches":
            report["sections"]["batches"] = section_batches(args)
        sync(device)
        print(f"   {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        write_json(out.with_suffix(".json"), report)  # partial results survive a long run's interruption
        out.with_suffix(".md").write_text(markdown_report(report))
    md = markdown_report(report)
    print(md)
    if "chains" in report["sections"]:
        ch = report["sections"]["chains"]["rows"]
        print("Chains speedup vs exact sweep: " + ", ".join(
            f"{k} {r['speedup_vs_exact']:.2f}x" for k, r in ch.items() if r.get("speedup_vs_exact")))
    if "schedulers" in report["sections"]:
        print("Schedulers: " + report["sections"]["schedulers"]["verdict"])
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    run_script(main)
