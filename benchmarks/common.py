"""Shared pieces of the benchmarks: ground-truth clips, named methods, timed runs and metrics.

Data flow of one benchmark:

    ground truth (F, 3, H, W) --downscale--> low-res input (F, 3, H/s, W/s)
        --method (pipeline run, or bicubic)--> output (F, 3, H, W) --metrics vs GT--> numbers

All frames are float32 ``(F, 3, H, W)`` in [-1, 1] on the CPU (the pipeline moves them to its
device). Flows used by the temporal metrics are computed once on the *ground truth* (DIS, forward-
backward occlusion masks; Lai et al. 2018) and shared by every method of a run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.align import Alignment, Fusion  # noqa: E402
from pipelines.degradation import bicubic_resize, downscale, upscale  # noqa: E402
from pipelines.flow import ClipFlows, FlowConfig, compute_clip_flows  # noqa: E402
from pipelines.loading import ModelLoadError, make_scheduler  # noqa: E402
from pipelines.metrics import psnr, sharpness, ssim, tof, warp_error  # noqa: E402
from pipelines.timing import StageTimer  # noqa: E402
from pipelines.video_io import read_clip, to_tensor  # noqa: E402
from pipelines.video_pipeline import SamplingOptions, VideoPipeline, auto_batch, read_vsr_config  # noqa: E402

EXAMPLE_GT = ROOT / "assets" / "example_gt"
SHARED_CLIPS = ROOT.parent / "shared" / "clips"
EWARP_UNIT = 1e3  # E_warp is reported x 1000 in tables and plots
AlignMode = Literal["none", "fusion"]


# ----------------------------------------------------------------------------- clips


@dataclass
class Clip:
    """A ground-truth clip and its low-res input: gt (F, 3, H, W), lr (F, 3, H/scale, W/scale)."""

    name: str
    gt: torch.Tensor
    lr: torch.Tensor
    fps: float
    scale: int


def project_defaults() -> dict:
    """Steps, strength, fusion weight and back-projection of configs/default.yaml: the benchmarks measure the defaults."""
    from pipelines.config import load_config

    cfg = load_config(ROOT / "configs" / "default.yaml")
    return dict(steps=cfg.sampling.num_inference_steps, strength=cfg.sampling.strength, weight=cfg.alignment.weight,
                back_projection=cfg.sampling.back_projection, model=cfg.model.path)


DEFAULTS = project_defaults()
DEFAULT_MODEL = ROOT / DEFAULTS["model"]  # the default job's model (weights/latent-x4)


def resize_to_side(frames: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """(F, 3, H, W) -> the shorter side resized to ``side``, both sides rounded to a multiple of
    ``multiple`` (antialiased bicubic when shrinking), clamped to [-1, 1]."""
    h, w = frames.shape[-2:]
    r = side / min(h, w)
    size = tuple(max(multiple, round(n * r / multiple) * multiple) for n in (h, w))
    return bicubic_resize(frames, size).clamp(-1, 1)


def crop_to_multiple(frames: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop (F, 3, H, W) so both sides are multiples of ``multiple``."""
    h, w = frames.shape[-2:]
    nh, nw = h - h % multiple, w - w % multiple
    if nh < multiple or nw < multiple:
        raise ValueError(f"frames of {h}x{w} are smaller than the size multiple {multiple}")
    top, left = (h - nh) // 2, (w - nw) // 2
    return frames[..., top:top + nh, left:left + nw]


def ping_pong(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(F, ...) -> (num_frames, ...) by playing the clip forward, backward, forward... (no jump cuts)."""
    n = frames.shape[0]
    if n == 1:
        return frames.expand(num_frames, *frames.shape[1:]).clone()
    period = 2 * (n - 1)
    idx = [(i % period) if (i % period) < n else period - (i % period) for i in range(num_frames)]
    return frames[idx].clone()


def load_clip(path: str | Path, scale: int, *, start: int = 0, max_frames: int | None = None, stride: int = 1,
              resize: int | None = None, num_frames: int | None = None) -> Clip:
    """Read a ground-truth clip (video file or image folder) and make its low-res input.

    ``resize``: shorter side of the ground truth after an antialiased bicubic resize; sides are
    rounded (``resize``) or centre-cropped (no ``resize``) to multiples of ``scale * 8``.
    ``num_frames``: if given and the clip is shorter, it is extended by ping-pong looping.
    The input is ``downscale(gt, scale)`` (antialiased bicubic), clamped to [-1, 1].
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, not {scale}")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive side length, not {resize}")
    read = read_clip(path, start=start, max_frames=max_frames or num_frames, stride=stride)
    gt = to_tensor(read.frames)
    multiple = scale * 8
    gt = resize_to_side(gt, resize, multiple) if resize else crop_to_multiple(gt, multiple)
    if num_frames is not None and gt.shape[0] < num_frames:
        gt = ping_pong(gt, num_frames)
    lr = downscale(gt, scale).clamp(-1, 1)
    return Clip(Path(path).stem, gt.contiguous(), lr.contiguous(), read.fps or 20.0, scale)


# ----------------------------------------------------------------------------- methods


@dataclass
class Method:
    """A named way to make the output.

    ``options``: SamplingOptions fields overriding the run's base options; ``alignment``:
    ``{"mode": "none"}`` or ``{"mode": "fusion", "weight": w, "schedule": "constant"|"linear"}``;
    ``flow``: FlowConfig fields; ``scheduler``: a ``pipelines.loading`` kind (auto = the model's);
    ``bicubic``: no model, the bicubic upscale of the input; ``vae_roundtrip``: no sampling, the model's
    VAE decoding its own encoding of the *ground truth* (the ceiling of a latent model's output).
    """

    name: str
    options: dict = field(default_factory=dict)
    alignment: dict = field(default_factory=lambda: {"mode": "none"})
    flow: dict = field(default_factory=dict)
    scheduler: str = "auto"
    bicubic: bool = False
    vae_roundtrip: bool = False


def fusion(name: str, weight: float, schedule: str = "constant", **options) -> Method:
    """A bidirectional-sweep method with training-free fusion (SamplingOptions overrides in ``options``)."""
    return Method(name, options=options, alignment={"mode": "fusion", "weight": weight, "schedule": schedule})


def make_alignment(spec: dict, num_train_timesteps: int = 1000) -> Alignment:
    mode = spec.get("mode", "none")
    if mode == "none":
        return Alignment()
    if mode == "fusion" and spec.get("space") == "decoded":  # latent models: fuse the decoded x0 estimates
        from pipelines.align import DecodedFusion

        return DecodedFusion(spec.get("weight", 0.5), spec.get("schedule", "constant"), num_train_timesteps)
    if mode == "fusion":
        return Fusion(spec.get("weight", 0.5), spec.get("schedule", "constant"), num_train_timesteps)
    if mode == "tcm":  # the model's ControlNet; optionally with fusion and/or the preview decoder
        from pipelines.tcm import TCMAlignment

        w = spec.get("fusion")
        return TCMAlignment(fusion=None if w is None else Fusion(w, "constant", num_train_timesteps),
                            decoder=spec.get("decoder", "vae"), warp_mode=spec.get("warp", "exact"),
                            start=spec.get("start", 0.0), end=spec.get("end", 1.0), scale=spec.get("scale", 1.0))
    raise ValueError(f"alignment mode must be none, fusion or tcm, not {mode!r}")


def steps_run(options: SamplingOptions) -> int:
    """Denoising steps actually run: diffusers' img2img convention int(steps * strength)."""
    return min(int(options.num_inference_steps * options.strength), options.num_inference_steps)


# ----------------------------------------------------------------------------- running


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None


def resolve_model(model: str | Path) -> str:
    """A model folder (relative paths fall back to the repository root) or a hub id (the command line's
    rule, ``pipelines.job.is_hub_id``); a missing local-looking path is a ValueError at once, not three
    rounds of hub lookups."""
    from pipelines.job import from_root, is_hub_id

    path = from_root(Path(model))
    if path.is_dir():
        return str(path)
    if is_hub_id(str(model)):
        return str(model)
    raise ValueError(f"model {model}: no such folder (nor under {ROOT})")


def set_threads(threads: int | None) -> None:
    """torch intra-op threads for this process (None: leave torch's default). On a shared CPU, fewer
    threads than busy cores avoids threads waiting on each other (much slower than one thread)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, not {name!r}")
    if name != "float32" and device.type != "cuda":
        raise ValueError(f"dtype {name} needs a CUDA device; on {device.type} use float32")
    return dtypes[name]


def load_pipeline(model: str | Path, device="cpu", dtype=torch.float32, attempts: int = 3) -> VideoPipeline:
    """VideoPipeline.from_pretrained, retried briefly: a training run may be swapping the folder (a hub id
    is tried once)."""
    model = resolve_model(model)
    if not Path(model).is_dir():
        attempts = 1
    for k in range(attempts):
        try:
            return VideoPipeline.from_pretrained(model, device=device, dtype=dtype)
        except (ModelLoadError, OSError):
            if k == attempts - 1:
                raise
            time.sleep(2.0)
    raise AssertionError("unreachable")


def model_info(model: str | Path) -> dict:
    """The model path and its vsr_config.json (train_steps etc.: which snapshot was measured)."""
    path = Path(model)
    meta = read_vsr_config(path) if path.is_dir() else {}
    return {"path": str(model), **{k: meta[k] for k in ("scale", "residual_scale", "train_steps") if k in meta}}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Run:
    """One method's output (F, 3, H, W) on the CPU, wall seconds of the call and per-stage seconds."""

    method: str
    frames: torch.Tensor | None
    seconds: float
    timings: dict[str, float]
    calls: dict[str, int]
    steps: int
    error: str | None = None

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / self.frames.shape[0] if self.frames is not None else math.nan


@torch.no_grad()
def vae_roundtrip(vae, frames: torch.Tensor, batch: int) -> torch.Tensor:
    """x_hat = D(mean of E(x)) for (F, 3, H, W) frames in [-1, 1], ``batch`` frames at a time, clamped."""
    return torch.cat([vae.decode(vae.encode(frames[i:i + batch]).latent_dist.mean).sample
                      for i in range(0, len(frames), batch)]).clamp(-1, 1)


def run_method(pipe: VideoPipeline, method: Method, lr: torch.Tensor, base: SamplingOptions) -> Run:
    """Run ``method`` on low-res frames ``lr`` (F, 3, h, w). A ValueError from the pipeline (for
    example a strength that leaves no step) is returned as ``Run.error`` instead of raised."""
    device = pipe.device
    if method.vae_roundtrip:  # lr is the ground truth here (see Method)
        start = time.perf_counter()
        out = vae_roundtrip(pipe.vae, lr.to(device, pipe.vae.dtype),
                           base.decode_batch_size or auto_batch(device, lr.shape[-2] * lr.shape[-1]))
        sync(device)
        return Run(method.name, out.float().cpu(), time.perf_counter() - start, {}, {}, 0)
    if method.bicubic:
        start = time.perf_counter()
        out = upscale(lr, pipe.scale).clamp(-1, 1)
        sec = time.perf_counter() - start
        return Run(method.name, out, sec, {}, {}, 0)
    options = replace(base, **method.options)
    saved = pipe.scheduler
    timer = StageTimer(device)
    try:
        alignment = make_alignment(method.alignment, saved.config.num_train_timesteps)
        flow = FlowConfig(**method.flow)
        if method.scheduler != "auto":
            pipe.scheduler = make_scheduler(saved.config, method.scheduler)
        sync(device)
        start = time.perf_counter()
        result = pipe(lr, options=options, alignment=alignment, flow=flow, timer=timer)
        sync(device)
        sec = time.perf_counter() - start
    except ValueError as err:
        return Run(method.name, None, math.nan, {}, {}, 0, error=str(err))
    finally:
        pipe.scheduler = saved
    return Run(method.name, result.frames.float(), sec, dict(result.timings), dict(timer.calls), steps_run(options))


# ----------------------------------------------------------------------------- metrics


@dataclass
class Reference:
    """The ground truth (F, 3, H, W), its flows (DIS) and its own warping error and sharpness."""

    gt: torch.Tensor
    flows: ClipFlows
    ewarp: float
    sharpness: float

    @classmethod
    def of(cls, gt: torch.Tensor, flow: FlowConfig | None = None) -> Reference:
        flows = compute_clip_flows(gt, flow or FlowConfig())
        return cls(gt, flows, warp_error(gt, flows.to_prev, flows.valid_prev), sharpness(gt))


def evaluate(frames: torch.Tensor, ref: Reference) -> dict[str, float]:
    """PSNR, SSIM, E_warp (raw, on [-1, 1] values, with the GT's flows and masks), tOF (pixels; DIS
    flows of the output vs the GT's), sharpness and its ratio to the GT's."""
    out_flows = compute_clip_flows(frames, FlowConfig())
    sharp = sharpness(frames)
    return {
        "psnr": psnr(frames, ref.gt),
        "ssim": ssim(frames, ref.gt),
        "ewarp": warp_error(frames, ref.flows.to_prev, ref.flows.valid_prev),
        "tof": tof(out_flows.to_prev, ref.flows.to_prev),
        "sharpness": sharp,
        "sharpness_ratio": sharp / ref.sharpness,
    }


def run_record(run: Run, metrics: dict | None) -> dict:
    """A JSON-ready record of one run."""
    rec = {"method": run.method, "error": run.error, "steps_run": run.steps, "seconds": run.seconds,
           "seconds_per_frame": run.seconds_per_frame, "timings": run.timings, "calls": run.calls}
    if metrics:
        rec.update(metrics)
    return rec


# ----------------------------------------------------------------------------- reporting


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['processor']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), "
            f"torch {info['torch']}, device {info['device']}{gpu}")


def command_line(script: str, argv: list[str]) -> str:
    return shlex.join(["python", script, *argv])


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def run_cli(cli_args: list[str], output: Path) -> tuple[float, dict]:
    """Run ``python run_video.py --output OUTPUT *cli_args`` in a fresh process, as a user would; returns its
    wall time (imports and loading included) and the JSON report it writes beside ``output``. A failed run
    raises RuntimeError with the last line of its stderr."""
    import subprocess

    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "run_video.py"), "--output", str(output), *cli_args],
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ['?'])[-1]
        raise (CliRefused if run.returncode == 2 else RuntimeError)(f"run_video.py failed ({run.returncode}): {last}")
    return wall, json.loads(Path(output).with_suffix(".json").read_text())


class CliRefused(ValueError, RuntimeError):
    """run_video.py refused the job (exit 2: bad input): a benchmark's bad flags, one line and exit 2 through
    :func:`run_script`; callers recording a failed row still catch it as a RuntimeError."""


def run_script(main) -> None:
    """Run a benchmark's ``main``; bad flags, clips or models give one line on stderr and exit code 2."""
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON (nan/inf become null), atomically."""
    write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (``pipelines.video_io.atomic_write_text``): a killed run never leaves half
    a report."""
    from pipelines.video_io import atomic_write_text

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {path}: {path.parent} is not a folder") from None
    atomic_write_text(path, text)


def default_out(name: str, full: bool) -> Path:
    """Where a benchmark writes by default: ``benchmarks/results/<name>`` for a full run (the committed
    figures), ``runs/benchmarks/<name>`` (ignored by git) for a smoke or partial one."""
    return ROOT / ("benchmarks/results" if full else "runs/benchmarks") / name


def method_dict(method: Method) -> dict:
    return asdict(method)
