#!/usr/bin/env python
"""Sample a video with a diffusion model, frame-wise and bidirectionally, and report on the result.

    python run_video.py --config configs/<name>.yaml --input IN --output OUT.mp4 [--reference GT]
                        [--overwrite] [--debug] [key=value ...]

``key=value`` entries override the config (OmegaConf dotlist, e.g. ``sampling.strength=0.6``).
Beside OUT.mp4 go OUT.yaml (the merged config) and OUT.json (sizes, timings, memory, temporal
consistency, and with ``--reference`` PSNR/SSIM against the ground truth).

Exit codes: 0 success; 2 bad input or config (one line on stderr, nothing written); 1 internal
error (one line; ``--debug`` re-raises with the traceback).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

try:  # Ctrl-C while the libraries load: one line and exit 130, not a traceback
    import torch
    from omegaconf import DictConfig
    from tqdm import tqdm

    from pipelines import metrics
    from pipelines.checkpoint import WorkdirMismatch
    from pipelines.config import (ConfigError, build_alignment, flow_config, load_config, pipeline_kwargs,
                                  sampling_options, to_dict, to_yaml)
    from pipelines.degradation import bicubic_resize
    from pipelines.flow import ClipFlows, check_flow_size, compute_clip_flows
    from pipelines.timing import StageTimer
    from pipelines.video_io import (Clip, InputError, atomic_write_text, crop_to, pad_to_multiple,
                                    read_clip, side_by_side, to_tensor, to_uint8, write_frames, write_video)
except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)

if TYPE_CHECKING:  # diffusers is imported once the cheap checks have passed, so bad input fails fast
    from pipelines.video_pipeline import VideoPipeline

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = Path("configs/default.yaml")
DEFAULT_INPUT = Path("assets/example.mp4")
DEFAULT_FPS = 20.0
OUTPUT_EXTS = (".mp4", ".mov", ".mkv", ".avi")  # containers that take the H.264 stream
FRAME_FILE = re.compile(r"frame_\d{5}\.png")  # what write_frames puts in output.frames_dir
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so every writer removes its temporary file; exit code 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


class UsageError(ValueError):
    """A bad command line or path: printed as ``error: <message>``, exit code 2."""


def log(message: str) -> None:
    """Progress lines go to stdout, after the merged config; stderr holds the progress bar and errors."""
    print(message, flush=True)


def fail(message: str) -> None:
    """One line on stderr, however many lines the message has, with one ``error:`` prefix."""
    text = " ".join(str(message).split())
    text = re.sub(r"^(?:(internal|config): )?(?:error: )+", lambda m: f"{m.group(1)}: " if m.group(1) else "", text)
    print("error: " + text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="run_video.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="job config (default: configs/default.yaml; relative paths fall back to the repo root)")
    p.add_argument("--input", default=None, help="video, GIF, image or folder of images (default: assets/example.mp4)")
    p.add_argument("--output", default=None, help="output video (default: outputs/<input stem>_<config stem>.mp4)")
    p.add_argument("--reference", default=None, help="ground-truth clip: adds PSNR, SSIM, warp error to the report")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--debug", action="store_true", help="re-raise internal errors with the traceback")
    p.add_argument("--workdir", default=None,
                   help="checkpoint folder: a killed run restarted with the same command resumes from it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.strength=0.6")
    args = p.parse_intermixed_args(argv)
    for flag in ("config", "input", "output", "reference", "workdir"):
        value = getattr(args, flag)
        if value is not None and not value.strip():  # an unset shell variable must not mean "the default"
            raise UsageError(f"--{flag} is empty; give a path or leave the option out")
    return args


def _from_root(path: Path) -> Path:
    """``path`` as given, or under the repo root when it is relative and missing from the cwd."""
    path = path.expanduser()
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return ROOT / path
    return path


# ----------------------------------------------------------------------------- paths


@dataclass
class Paths:
    config: Path
    input: Path
    output: Path
    report: Path  # <stem>.json
    merged_config: Path  # <stem>.yaml
    reference: Path | None
    frames_dir: Path | None
    side_by_side: Path | None

    def files(self) -> list[tuple[str, Path]]:
        """(label, path) of every file this run writes."""
        out = [("--output", self.output), ("report", self.report), ("config copy", self.merged_config)]
        if self.side_by_side is not None:
            out.append(("output.side_by_side", self.side_by_side))
        return out


def plan_paths(args: argparse.Namespace, cfg: DictConfig, config: Path) -> Paths:
    inp = Path(args.input).expanduser() if args.input else _from_root(DEFAULT_INPUT)
    out = Path(args.output).expanduser() if args.output else Path("outputs") / f"{inp.stem}_{config.stem}.mp4"
    o = cfg.output
    return Paths(config=config, input=inp, output=out, report=out.with_suffix(".json"),
                 merged_config=out.with_suffix(".yaml"),
                 reference=Path(args.reference).expanduser() if args.reference else None,
                 frames_dir=Path(o.frames_dir).expanduser() if o.frames_dir else None,
                 side_by_side=Path(o.side_by_side).expanduser() if o.side_by_side else None)


def _creatable_parent(label: str, path: Path) -> None:
    """Raise UsageError unless ``path``'s folder exists or can be created, and is writable."""
    folder = path.absolute().parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{label} {path}: cannot create folder {folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{label} {path}: folder {existing} is not writable")
    try:  # a real probe: some folders pass the access check but take no files (/proc, read-only mounts)
        import tempfile

        with tempfile.NamedTemporaryFile(dir=existing, prefix=".run_video-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{label} {path}: cannot write files in {existing} ({e.strerror or e})") from e


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(paths: Paths, overwrite: bool) -> None:
    """Refuse outputs that would clobber an input, each other, or an existing file (without
    ``--overwrite``), and outputs whose folder cannot be created. Writes nothing."""
    protected = {"--input": paths.input.resolve(), "--config": paths.config.resolve()}
    if paths.reference is not None:
        protected["--reference"] = paths.reference.resolve()
    for label, path in (("--output", paths.output), ("output.side_by_side", paths.side_by_side)):
        if path is not None and path.suffix.lower() not in OUTPUT_EXTS:
            raise UsageError(f"{label} {path}: unsupported video type '{path.suffix}' "
                             f"(expected {'/'.join(OUTPUT_EXTS)})")
    targets = paths.files() + ([("output.frames_dir", paths.frames_dir)] if paths.frames_dir else [])
    seen: dict[Path, str] = {}
    for label, path in targets:
        real = path.resolve()
        for what, other in protected.items():
            if real == other:
                raise UsageError(f"{label} {path} is the same file as {what}; choose another output path")
        if real in seen:
            raise UsageError(f"{label} {path} is also {seen[real]}; choose another path")
        seen[real] = label
        _creatable_parent(label, path)
    for label, path in paths.files():
        if path.is_dir():
            raise UsageError(f"{label} {path} is a directory")
        if path.exists() and not overwrite:
            raise UsageError(f"{label} {path} exists (use --overwrite to replace it)")
    if paths.frames_dir is not None:
        _check_frames_dir(paths.frames_dir, overwrite, [*protected.values(), *seen])


def _check_frames_dir(folder: Path, overwrite: bool, others: list[Path]) -> None:
    """output.frames_dir is replaced as a whole: only ever a folder of our own frames."""
    real = folder.resolve()
    for other in others:
        if other != real and _inside(other, real):
            raise UsageError(f"output.frames_dir {folder} contains {other}, which would be deleted")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UsageError(f"output.frames_dir {folder} exists and is not a directory")
    entries = [p.name for p in folder.iterdir()]
    strangers = [n for n in entries if not FRAME_FILE.fullmatch(n)]
    if strangers:
        raise UsageError(f"output.frames_dir {folder} holds other files ({strangers[0]}, ...); "
                         "refusing to replace it: choose an empty or new folder")
    if entries and not overwrite:
        raise UsageError(f"output.frames_dir {folder} exists (use --overwrite to replace it)")


# ----------------------------------------------------------------------------- model and device


def resolve_device(cfg: DictConfig) -> torch.device:
    name, dtype = cfg.model.device, cfg.model.dtype
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={name} but CUDA is not available here; use model.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dtype != "float32":
        raise ConfigError(f"model.dtype={dtype} needs a CUDA device (model.device is {name}); use model.dtype=float32")
    return device


def resolve_model_path(cfg: DictConfig) -> str:
    """The model folder (relative paths fall back to the repo root) or hub id; local folders are
    checked for the components the config needs. Raises ConfigError."""
    m = cfg.model
    path = str(_from_root(Path(m.path)))
    # pipelines.loading's rule: what is not on disk and looks like "owner/name" is a hub id, unless its
    # first part is a local folder ("weights/nope" is a missing local model, not a hub repository)
    owner = path.split("/")[0]
    local_owner = Path(owner).is_dir() or (ROOT / owner).is_dir()
    if not Path(path).exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1 \
            and not local_owner:
        return path  # checked when loading
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model.path={m.path}: no such folder (nor under the repo root {ROOT})")
    if not (folder / m.unet_subfolder).is_dir():
        raise ConfigError(f"model.path={m.path}: no {m.unet_subfolder}/ subfolder (diffusers layout expected)")
    if cfg.alignment.mode == "tcm" and not (folder / m.controlnet_subfolder).is_dir():
        raise ConfigError(f"alignment.mode=tcm needs a model with a {m.controlnet_subfolder}/ folder "
                          f"(model.controlnet_subfolder); {m.path} has none")
    return path


def load_model(cfg: DictConfig, path: str, device: torch.device, timer: StageTimer) -> VideoPipeline:
    """The pipeline, timed under "load" (not counting the first import of diffusers)."""
    from diffusers.utils import logging as diffusers_logging

    from pipelines.loading import ModelLoadError
    from pipelines.video_pipeline import VideoPipeline

    diffusers_logging.set_verbosity_error()  # library chatter would break the one-line-error contract
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        with timer("load"):
            pipe = VideoPipeline.from_pretrained(path, device=device, dtype=DTYPES[cfg.model.dtype],
                                                 **pipeline_kwargs(cfg))
    except ModelLoadError as e:
        raise UsageError(str(e)) from e
    pipe.convention = cfg.model.convention
    if pipe.vae is not None:
        if cfg.model.vae_tiling:
            pipe.vae.enable_tiling()
        if cfg.model.vae_slicing:
            pipe.vae.enable_slicing()
    train_steps = pipe.scheduler.config.num_train_timesteps
    if cfg.sampling.num_inference_steps > train_steps:
        raise ConfigError(f"sampling.num_inference_steps={cfg.sampling.num_inference_steps} exceeds the "
                          f"{train_steps} training timesteps of {cfg.model.path}'s scheduler")
    if cfg.sampling.guidance_scale > 1 and pipe.text_encoder is None:
        raise ConfigError(f"sampling.guidance_scale={cfg.sampling.guidance_scale} needs a text-conditioned model; "
                          f"{cfg.model.path} has no text encoder (use sampling.guidance_scale=1)")
    return pipe


# ----------------------------------------------------------------------------- metrics


def crop_flows(flows: ClipFlows, size: tuple[int, int]) -> ClipFlows:
    """Flows of a padded clip, restricted to its top-left ``size`` = (h, w); pixels whose target
    falls outside the crop (into the padding) become invalid."""
    if flows.size == tuple(size):
        return flows
    h, w = size
    to_prev, to_next = flows.to_prev[..., :h, :w], flows.to_next[..., :h, :w]

    def inside(flow: torch.Tensor) -> torch.Tensor:  # (F, 2, h, w) -> (F, 1, h, w)
        ys, xs = torch.meshgrid(torch.arange(h, device=flow.device), torch.arange(w, device=flow.device),
                                indexing="ij")
        tx, ty = xs + flow[:, 0], ys + flow[:, 1]
        return ((tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)).unsqueeze(1).to(flow.dtype)

    return ClipFlows(to_prev, to_next, flows.valid_prev[..., :h, :w] * inside(to_prev),
                     flows.valid_next[..., :h, :w] * inside(to_next))


def _number(x: float | None) -> float | None:
    """JSON-safe: nan/inf -> None."""
    return None if x is None or not math.isfinite(x) else float(x)


def _sharpness(x: torch.Tensor) -> float | None:
    return metrics.sharpness(x) if min(x.shape[-2:]) >= 3 else None


def _ssim(x: torch.Tensor, y: torch.Tensor) -> float | None:
    return metrics.ssim(x, y) if min(x.shape[-2:]) >= 11 else None


def consistency_report(out: torch.Tensor, cond: torch.Tensor, flows: ClipFlows) -> dict:
    """Warp error of the output and of the conditioning frames under the input's flow."""
    return dict(warp_error_noref=_number(metrics.warp_error(out, flows.to_prev, flows.valid_prev)),
                warp_error_noref_input=_number(metrics.warp_error(cond, flows.to_prev, flows.valid_prev)),
                sharpness=_number(_sharpness(out)))


def reference_report(out: torch.Tensor, cond: torch.Tensor, gt: torch.Tensor, scale: int, flow_cfg) -> dict:
    ref_flows = compute_clip_flows(gt, flow_cfg)
    sharp_out, sharp_gt = _sharpness(out), _sharpness(gt)
    rep = dict(psnr=_number(metrics.psnr(out, gt)), ssim=_number(_ssim(out, gt)),
               warp_error_ref=_number(metrics.warp_error(out, ref_flows.to_prev, ref_flows.valid_prev)),
               warp_error_ref_gt=_number(metrics.warp_error(gt, ref_flows.to_prev, ref_flows.valid_prev)),
               sharpness_ratio=_number(sharp_out / sharp_gt) if sharp_out is not None and sharp_gt else None)
    if scale > 1:
        rep.update(psnr_bicubic=_number(metrics.psnr(cond, gt)), ssim_bicubic=_number(_ssim(cond, gt)))
    return rep


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mem = {"host_max_rss_mb": round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)}
    if device.type == "cuda":
        mem["device_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return mem


# ----------------------------------------------------------------------------- the run


def _size(x: torch.Tensor) -> list[int]:
    return [int(x.shape[-2]), int(x.shape[-1])]


def _wxh(x: torch.Tensor) -> str:
    return f"{x.shape[-1]}x{x.shape[-2]}"


@dataclass
class Inputs:
    clip: Clip  # as read (uint8 frames, fps)
    frames: torch.Tensor  # (F, 3, h, w) in [-1, 1]: what the model samples (after input.resize)
    reference: torch.Tensor | None  # (F, 3, H, W) in [-1, 1] ground truth at the output size


def read_inputs(cfg: DictConfig, paths: Paths, timer: StageTimer) -> Inputs:
    """The input (and reference) clip with the config's frame selection; the reference's frame count
    is checked here, its size once the model's scale is known."""
    sel = cfg.input
    select = dict(start=sel.start, end=sel.end, stride=sel.stride, max_frames=sel.max_frames, strict=sel.strict)
    with timer("io"):
        clip = read_clip(paths.input, **select)
        ref_clip = read_clip(paths.reference, **select) if paths.reference else None
    for warning in clip.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    frames = to_tensor(clip.frames)
    rate = f"{clip.fps:g} fps" if clip.fps else "no frame rate"
    log(f"read {len(frames)} frames {_wxh(frames)} ({rate}) from {paths.input}")
    if sel.resize is not None and sel.resize != 1:
        size = (max(1, round(frames.shape[-2] * sel.resize)), max(1, round(frames.shape[-1] * sel.resize)))
        frames = bicubic_resize(frames, size).clamp(-1, 1)
        log(f"resized the input to {_wxh(frames)}")
    if ref_clip is not None and len(ref_clip.frames) != len(frames):
        raise UsageError(f"--reference has {len(ref_clip.frames)} frames, output has {len(frames)}")
    return Inputs(clip, frames, None if ref_clip is None else to_tensor(ref_clip.frames))


def fingerprint(cfg: DictConfig, frames: torch.Tensor) -> str:
    """What makes a work folder reusable: the config that shapes sampling (all but ``output``) and the
    decoded input frames themselves (a frame overwritten in place changes it; a moved file does not)."""
    sampling = {k: v for k, v in to_dict(cfg).items() if k != "output"}
    digest = hashlib.sha256(json.dumps(sampling, sort_keys=True).encode())
    digest.update(str(tuple(frames.shape)).encode())
    digest.update(frames.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sample(cfg: DictConfig, pipe: VideoPipeline, alignment, frames: torch.Tensor, flow_cfg,
           timer: StageTimer, workdir: Path | None = None, key: str = "") -> tuple[torch.Tensor, ClipFlows | None, int]:
    """(F, 3, h, w) input frames -> (F, 3, h * scale, w * scale) output frames on the CPU, the flows the
    pipeline computed for the alignment (None if it needed none; of the padded clip, at the pipeline's
    flow resolution) and the number of steps run. Sides the model cannot take are padded and the output
    is cropped back."""
    from pipelines.sampler import img2img_timesteps

    num_frames = len(frames)
    multiple = pipe.input_multiple()
    padded, _ = pad_to_multiple(frames, multiple)
    if padded.shape != frames.shape:
        log(f"padding {_wxh(frames)} to {_wxh(padded)} (the model needs multiples of {multiple})")
    if alignment.uses_neighbours and num_frames > 1:
        log(f"computing flow ({flow_cfg.method}, scale {flow_cfg.scale:g}) on {num_frames} frames")
    s, r = cfg.sampling, cfg.runtime
    steps_run = len(img2img_timesteps(pipe.scheduler, s.num_inference_steps, s.strength))
    log(f"sampling {num_frames} frames: {steps_run} of {s.num_inference_steps} steps, "
        f"alignment {cfg.alignment.mode}, {cfg.schedule.direction}")
    if workdir is not None:
        log(f"checkpointing to {workdir} every {r.checkpoint_every} step(s)")
    if r.window and num_frames > r.window:
        from pipelines.windows import plan_windows, sample_windowed

        spans = plan_windows(num_frames, r.window, r.overlap)
        log(f"{len(spans)} windows of {r.window} frames overlapping by {r.overlap}")
        bar = tqdm(total=steps_run * sum(b - a for a, b in spans), desc="denoising", unit="frame-step",
                   file=sys.stderr, dynamic_ncols=True)
        try:
            u8 = sample_windowed(pipe, padded, window=r.window, overlap=r.overlap, anchor_weight=r.anchor_weight,
                                 make_alignment=lambda: build_alignment(cfg, pipe), options=sampling_options(cfg),
                                 flow=flow_cfg, progress=bar.update, timer=timer, workdir=workdir, fingerprint=key,
                                 checkpoint_every=r.checkpoint_every)
        finally:
            bar.close()
        out = u8.permute(0, 3, 1, 2).float() / 127.5 - 1
        return crop_to(out, pipe.output_size(frames)), None, steps_run
    from pipelines.checkpoint import Checkpointer

    ckpt = None if workdir is None else Checkpointer(workdir, key, r.checkpoint_every)
    bar = tqdm(total=steps_run * num_frames, desc="denoising", unit="frame-step", file=sys.stderr,
               dynamic_ncols=True)
    try:
        result = pipe(padded, options=sampling_options(cfg), alignment=alignment, flow=flow_cfg, progress=bar.update,
                      timer=timer, checkpoint=ckpt)
    finally:
        bar.close()
    flows = result.flows
    if flows is not None:  # at the padded output size, then cropped like the frames
        flows = crop_flows(flows.to("cpu").resized(pipe.output_size(padded)), pipe.output_size(frames))
    return crop_to(result.frames, pipe.output_size(frames)).float().cpu(), flows, steps_run


def score(pipe: VideoPipeline, inputs: Inputs, out: torch.Tensor, flows: ClipFlows | None, flow_cfg) -> dict:
    """Temporal consistency under the input's flow at the output size (the sampler's flows when there
    are any, else computed here), and the reference metrics when there is a reference."""
    cond = pipe.conditioning_frames(inputs.frames).float().cpu()
    if flows is None:
        log("computing flow for the consistency metrics")
        flows = compute_clip_flows(cond, flow_cfg)
    scores = consistency_report(out, cond, flows)
    if inputs.reference is not None:
        scores.update(reference_report(out, cond, inputs.reference, pipe.scale, flow_cfg))
    return scores


def write_outputs(cfg: DictConfig, paths: Paths, inputs: Inputs, out: torch.Tensor, replace: bool) -> dict:
    """The H.264 video (with the input's audio when asked), the optional comparison video and PNG
    frames, and the merged config; each verified and committed atomically (no-replace unless
    ``replace``). Returns what the report says about the written video."""
    fps = float(cfg.output.fps or inputs.clip.fps or DEFAULT_FPS)
    out_u8 = to_uint8(out)
    log(f"writing {paths.output} ({len(out)} frames {_wxh(out)}, {fps:g} fps, H.264 crf {cfg.output.crf})")
    sel, rate = cfg.input, inputs.clip.fps
    written = write_video(paths.output, out_u8, fps, crf=cfg.output.crf, replace=replace,
                          audio_from=paths.input if cfg.output.audio else None,
                          audio_start_s=sel.start / (rate * sel.stride) if rate else 0.0)
    if written.padded:
        log(f"note: H.264 needs even sides; {_wxh(out)} is stored as {written.size[1]}x{written.size[0]} "
            "(last row/column repeated); output.frames_dir PNGs keep the exact size")
    if cfg.output.audio and written.audio not in (None, "input has no audio"):
        log(f"audio not copied: {written.audio}")
    if paths.side_by_side is not None:
        log(f"writing {paths.side_by_side} (input | output)")
        write_video(paths.side_by_side, side_by_side(to_uint8(inputs.frames), out_u8, mode="bicubic"), fps,
                    crf=cfg.output.crf, replace=replace)
    if paths.frames_dir is not None:
        log(f"writing {len(out)} PNG frames to {paths.frames_dir}")
        write_frames(paths.frames_dir, out_u8)
    atomic_write_text(paths.merged_config, to_yaml(cfg), replace=replace)
    return dict(fps=fps, codec="h264", pix_fmt="yuv420p", crf=cfg.output.crf, encoded_size=list(written.size),
                padded=written.padded, audio="copied" if written.audio is None else written.audio)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    config = _from_root(Path(args.config))
    cfg = load_config(config, args.overrides)
    print(to_yaml(cfg), end="", flush=True)

    # every check before heavy work; nothing is written until the end
    paths = plan_paths(args, cfg, config)
    check_paths(paths, args.overwrite)
    from pipelines.video_writer import remove_stale_temps

    for _, target in paths.files():
        for stale in remove_stale_temps(target):
            log(f"removed {stale}, left behind by an interrupted earlier run")
    device = resolve_device(cfg)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    model_path = resolve_model_path(cfg)
    flow_cfg = flow_config(cfg)
    timer = StageTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    workdir = Path(args.workdir).expanduser() if args.workdir else None
    inputs = read_inputs(cfg, paths, timer)
    key = fingerprint(cfg, inputs.frames) if workdir else ""
    if workdir is not None:
        from pipelines.checkpoint import Checkpointer

        Checkpointer.verify(workdir, key)

    log(f"loading model {model_path} on {device} ({cfg.model.dtype})")
    pipe = load_model(cfg, model_path, device, timer)
    log(f"model: {pipe.kind}, x{pipe.scale}")
    alignment = build_alignment(cfg, pipe)
    out_h, out_w = pipe.output_size(inputs.frames)
    if inputs.reference is not None and tuple(inputs.reference.shape[-2:]) != (out_h, out_w):
        raise UsageError(f"--reference frames are {_wxh(inputs.reference)}, output frames are {out_w}x{out_h}")
    if len(inputs.frames) > 1:  # the alignment and the report's consistency metrics both need flow
        try:
            check_flow_size((out_h, out_w), flow_cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    out, flows, steps_run = sample(cfg, pipe, alignment, inputs.frames, flow_cfg, timer, workdir, key)
    with timer("metrics"):
        scores = score(pipe, inputs, out, flows, flow_cfg)
    with timer("io"):
        video = write_outputs(cfg, paths, inputs, out, replace=args.overwrite)
    fps = video["fps"]

    timings = {"total": round(time.perf_counter() - t0, 4)}
    timings.update({k: 0.0 for k in ("model", "flow", "align", "scheduler", "vae" if pipe.vae else "decode",
                                      "io", "load", "metrics")})
    timings.update(timer.report())
    report = dict(
        input=str(paths.input), output=str(paths.output),
        reference=str(paths.reference) if paths.reference else None, model_path=model_path,
        frames=len(out), source_size=[int(n) for n in inputs.clip.frames.shape[1:3]],
        input_size=_size(inputs.frames), output_size=_size(out), fps=fps, model_kind=pipe.kind, scale=pipe.scale,
        input_multiple=pipe.input_multiple(), device=str(device), dtype=cfg.model.dtype, steps_run=steps_run,
        video=video, warnings=inputs.clip.warnings,
        timings=timings, peak_memory=peak_memory(device), **scores, config=to_dict(cfg))
    atomic_write_text(paths.report, json.dumps(report, indent=2) + "\n", replace=args.overwrite)
    summary = f", psnr {scores['psnr']:.2f} dB" if scores.get("psnr") is not None else ""
    log(f"done in {timings['total']:.1f}s: {paths.output}{summary}")
    return 0


def guarded(job, args) -> int:
    """Run ``job(args)`` and turn errors into the exit-code contract (one line on stderr)."""
    try:
        return job(args)
    except ConfigError as e:
        fail(f"config: {e}")
    except (InputError, UsageError, WorkdirMismatch) as e:
        fail(e)
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    except Terminated:
        fail("terminated")
        return 143
    except Exception as e:
        if args.debug:
            raise
        name = type(e).__name__
        if name == "error":  # OpenCV's (and a few other libraries') exception class
            name = f"{type(e).__module__.split('.')[0]}.{name}"
        fail(f"internal: {name}: {e}")
        return 1
    return 2


# ----------------------------------------------------------------------------- many clips


def clip_list(inp: Path) -> list[Path] | None:
    """The clips of a multi-clip input: a ``.txt`` list of paths (one per line, relative to the list),
    or a folder holding video files (a folder of images is one clip). None for a single clip."""
    from pipelines.video_io import IMAGE_EXTS, VIDEO_EXTS

    clip_exts = (*VIDEO_EXTS, ".gif")
    if inp.suffix.lower() == ".txt" and inp.is_file():
        lines = [ln.strip() for ln in inp.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return [p if p.is_absolute() else inp.parent / p for p in map(Path, lines)]
    if inp.is_dir():
        files = [p for p in inp.iterdir() if p.is_file() and not p.name.startswith(".")]
        videos = sorted(p for p in files if p.suffix.lower() in clip_exts)
        if videos and not any(p.suffix.lower() in IMAGE_EXTS for p in files):
            return videos
    return None


def process_group():
    """(rank, world size, local rank) under torch.distributed's launcher (``torchrun``, which
    ``accelerate launch`` also drives), else (0, 1, 0). Clips are independent, so the processes only
    meet at the end (a barrier); torch.distributed handles one machine or many, GPUs or CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        # the processes meet only at the end, possibly hours apart (one long clip against many short
        # ones): the default timeouts (gloo 30 min, NCCL 10 min) would fail the finished ranks
        from datetime import timedelta

        hours = float(os.environ.get("RUN_VIDEO_BARRIER_HOURS", "168"))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=hours))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def output_names(clips: list[Path]) -> list[str]:
    """One distinct output stem per clip: the clip's stem, or ``stem_ext`` (then ``_2``, ...) where stems
    collide (``a.mp4`` and ``a.mov`` must not write the same output or work folder)."""
    stems = [c.stem for c in clips]
    names, used = [], set()
    for clip, stem in zip(clips, stems):
        name = stem if stems.count(stem) == 1 else f"{stem}_{clip.suffix.lstrip('.').lower() or 'clip'}"
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


def run_many(args: argparse.Namespace, clips: list[Path]) -> int:
    """Each process samples its share of the clips into the --output folder; returns the worst exit code."""
    rank, world, local = process_group()
    outdir = Path(args.output).expanduser() if args.output else Path("outputs")
    if outdir.suffix:
        raise UsageError(f"--output must be a folder when --input is a list of clips, got {outdir}")
    if args.reference:
        raise UsageError("--reference takes one clip; it cannot be used with a list of clips")
    names = output_names(clips)
    mine = list(range(len(clips)))[rank::world]
    log(f"[process {rank}/{world}] {len(mine)} of {len(clips)} clips")
    codes = [0]
    for k in mine:
        clip, name = clips[k], names[k]
        a = argparse.Namespace(**vars(args))
        a.input, a.output = str(clip), str(outdir / f"{name}.mp4")
        a.workdir = str(Path(args.workdir) / name) if args.workdir else None
        if world > 1 and torch.cuda.is_available():
            a.overrides = [*args.overrides, f"model.device=cuda:{local}"]
        log(f"[process {rank}/{world}] {clip} -> {a.output}")
        codes.append(guarded(run, a))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # ffmpeg's own decoder chatter off stderr
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        fail(e)
        return 2
    clips = clip_list(Path(args.input).expanduser()) if args.input else None
    if clips is not None:
        return guarded(lambda a: run_many(a, clips), args)
    return guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
