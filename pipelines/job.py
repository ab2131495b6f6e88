"""The clip job: everything between "config + paths" and "files written".

    from pipelines.config import load_config
    from pipelines.job import run_clip

    report = run_clip(load_config("configs/default.yaml"), "assets/example.mp4", "outputs/example.mp4")
    print(report["psnr"], report["warp_error_noref"], report["peak_memory"])

It reads the clip lazily, pads it to the model's multiple, chooses one pass or windows
(``runtime.mode``), samples, crops, scores and writes. Memory is bounded by the window, not the
clip: frames are decoded per window from the container, each finished window goes straight to the
streaming H.264 writer (and the optional PNG folder and comparison video), and the report's metrics
are accumulated per chunk with flows only for the frames in hand. One pass holds what it needs by
definition (every frame's sample, flows at ``flow.scale``, the outputs until sampling ends).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import interrupts, metrics
from .config import (DEFAULT_CONFIG, ROOT, ConfigError, JobConfig, ModelConfig, build_alignment,
                     check_model_settings, flow_config, from_root, ineffective_settings, inert_settings,
                     pipeline_kwargs, sampling_options, to_dict, to_yaml, validate)
from .degradation import bicubic_resize
from .errors import UsageError
from .flow import check_flow_size, compute_clip_flows
from .timing import StageTimer
from .video_io import (FrameFolderWriter, InputError, PendingText, atomic_write_text, pad_to_multiple,
                       padded_side, side_by_side, to_tensor, to_uint8)
from .video_writer import VideoWriter, remove_stale_temps

DEFAULT_INPUT = Path("assets/example.mp4")
DEFAULT_FPS = 20.0
OUTPUT_EXTS = (".mp4", ".mov", ".mkv", ".avi")  # containers that take the H.264 stream
FRAME_FILE = re.compile(r"frame_\d{5}\.png")  # what the PNG writer puts in output.frames_dir
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK = 16  # frames per scoring/writing chunk in one-pass mode


def is_hub_id(model: str) -> bool:
    """pipelines.loading's rule (what is not local is a hub id), with the repository root as a second place
    for local paths and their first folder ("weights/nope" is a missing local model, not a hub repository)."""
    from .loading import _is_local

    model = str(model)
    return not (_is_local(model) or from_root(Path(model)).exists() or (ROOT / model.split("/")[0]).is_dir())


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


def plan_paths(cfg: DictConfig, input, output, config: Path, reference=None) -> Paths:
    inp = Path(input).expanduser() if input else from_root(DEFAULT_INPUT)
    out = Path(output).expanduser() if output else Path("outputs") / f"{inp.stem}_{Path(config).stem}.mp4"
    o = cfg.output
    return Paths(config=Path(config), input=inp, output=out, report=out.with_suffix(".json"),
                 merged_config=out.with_suffix(".yaml"),
                 reference=Path(reference).expanduser() if reference else None,
                 frames_dir=Path(o.frames_dir).expanduser() if o.frames_dir else None,
                 side_by_side=Path(o.side_by_side).expanduser() if o.side_by_side else None)


def _creatable_parent(label: str, path: Path) -> None:
    """Raise UsageError unless ``path``'s folder exists or can be created, and takes files."""
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


def check_paths(paths: Paths, overwrite: bool, workdir: Path | None = None, ours: frozenset = frozenset()) -> None:
    """Refuse outputs that would clobber an input, each other, or an existing file (without
    ``--overwrite``; ``ours``: outputs the ``workdir``'s run committed before it was stopped), outputs whose
    folder cannot be created, and a work folder overlapping any of them. Writes nothing."""
    protected = {"--input": paths.input.resolve(), "--config": paths.config.resolve()}
    if paths.reference is not None:
        protected["--reference"] = paths.reference.resolve()
    if not paths.input.exists():  # named first: a missing input is the mistake, not the output's name
        raise InputError(f"{paths.input}: no such file or directory")
    for label, path in (("--output", paths.output), ("output.side_by_side", paths.side_by_side)):
        if path is not None and path.is_dir():
            raise UsageError(f"{label} {path} is a directory; give a video file name ({'/'.join(OUTPUT_EXTS)})")
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
        if path.exists() and not overwrite and path.resolve() not in ours:
            raise UsageError(f"{label} {path} exists (use --overwrite to replace it)")
    if paths.frames_dir is not None:
        _check_frames_dir(paths.frames_dir, overwrite or paths.frames_dir.resolve() in ours,
                          [*protected.values(), *seen])
    if workdir is not None:  # its checkpoints would be replaced with an output, or an output deleted with it
        wd = workdir.resolve()
        for label, path in [*targets, *[(k, v) for k, v in protected.items() if k != "--config"]]:
            real = Path(path).resolve()
            if _inside(real, wd) or _inside(wd, real):
                raise UsageError(f"--workdir {workdir} overlaps {label} {path}; give the work folder a place of "
                                 "its own")


MACHINE_FILE = "machine.json"  # in a work folder: the threads and device its run began with


def _machine(device: torch.device) -> dict:
    if device.type != "cpu" and device.index is None:  # an accelerator without an index is its current one
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return {"threads": torch.get_num_threads(), "device": str(device)}


def _has_saved_state(workdir: Path) -> bool:
    return (workdir / "state.safetensors").exists() or any(workdir.glob("window*.safetensors")) \
        or any(workdir.glob("window*/state.safetensors"))


def _record_machine(workdir: Path, device: torch.device) -> None:
    """Note the threads and device a run begins sampling with (kept while saved state exists)."""
    if not (_has_saved_state(workdir) and (workdir / MACHINE_FILE).is_file()):
        atomic_write_text(workdir / MACHINE_FILE, json.dumps(_machine(device)) + "\n", replace=True)


def _same_machine(workdir: Path, device: torch.device) -> list[str]:
    """Warnings when a run resumes saved state with other CPU threads or another device than it began with
    (``machine.json``): sums then add up in another order, and the frames are no longer bit-identical to an
    uninterrupted run's (measured: 10 of 16 frames differ between 1 and 2 threads)."""
    now = _machine(device)
    try:
        began = json.loads((workdir / MACHINE_FILE).read_text()) if _has_saved_state(workdir) else None
    except (ValueError, OSError):
        began = None
    if not isinstance(began, dict):
        return []
    lines = [f"resuming with {k} {now[k]} where the run began with {began[k]}: the frames will not be bit-identical "
             "to an uninterrupted run's" for k in now if k in began and began[k] != now[k]]
    for line in lines:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return lines


OUTPUTS_FILE = "outputs.json"  # in a work folder: the outputs its run commits, and whether it finished


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def _identities(recorded) -> list[list[int]]:
    """An output's recorded identities: the files it may be, each (inode, time, size); one, as written by
    earlier versions, or several (an earlier stopped run's file, and the one this run is moving there)."""
    return [recorded] if recorded and isinstance(recorded[0], int) else list(recorded)


def recorded_outputs(workdir: Path | None) -> tuple[bool, dict[Path, bool]]:
    """What ``outputs.json`` in a work folder says: whether its run finished, and for each output it
    committed whether that is still the very file it committed (inode, time, size)."""
    try:
        made = json.loads((workdir / OUTPUTS_FILE).read_text())
        return bool(made.get("done")), {Path(p): Path(p).exists() and _identity(Path(p)) in _identities(ident)
                                        for p, ident in made["committed"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):  # none, or not ours
        return False, {}


def interrupted_outputs(workdir: Path | None) -> frozenset:
    """The outputs a run with this work folder committed before it was stopped (none once it finished), each
    still the file it committed: the same command may replace them without --overwrite, to finish what it
    began. A file another program put there is not among them."""
    if workdir is None:
        return frozenset()
    done, outputs = recorded_outputs(workdir)
    return frozenset() if done else frozenset(p for p, same in outputs.items() if same)


class _Commits:
    """What this run commits, recorded in the work folder before the moves into place (see
    interrupted_outputs): a move keeps the file's inode, time and size, so a run stopped anywhere among the
    moves is finished by the same command."""

    def __init__(self, workdir: Path | None):
        # an earlier stopped run's outputs still in place stay recorded: a second stop must not forget them
        self.workdir = workdir
        self.committed = {str(p): [_identity(p)] for p in interrupted_outputs(workdir) if p.exists()}

    def expect(self, moves: list[tuple[Path, Path]]) -> None:
        """Record, in one write before any move, each ``(output, finished temporary)`` about to be moved into
        place (the move keeps the temporary's identity): a run stopped during the moves is finished by the
        same command; an output whose move never happened keeps its earlier file, which is not recorded."""
        if self.workdir is not None:
            for path, tmp in moves:  # besides an earlier stopped run's file there, which stays ours until moved
                self.committed.setdefault(str(path.parent.resolve() / path.name), []).append(_identity(tmp))
            self._write(done=False)

    def finish(self) -> None:
        """Every output, the report last, is in place: the run's end."""
        if self.workdir is not None:
            self._write(done=True)

    def _write(self, done: bool) -> None:
        atomic_write_text(self.workdir / OUTPUTS_FILE, json.dumps({"committed": self.committed, "done": done}) + "\n",
                          replace=True)


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


def _accelerator() -> torch.device | None:
    """The machine's accelerator (CUDA, or whatever torch.accelerator reports), or None."""
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None


def resolve_device(cfg: DictConfig) -> torch.device:
    """``model.device``: auto (the accelerator when there is one, else the CPU), cpu, or an accelerator."""
    name, dtype = cfg.model.device, cfg.model.dtype
    acc = _accelerator()
    try:
        device = (acc or torch.device("cpu")) if name == "auto" else torch.device(name)
    except RuntimeError:  # a device type this torch does not know (its vendor's plugin is not installed)
        raise ConfigError(f"model.device={name} is not a device type this torch build knows; use "
                          "model.device=cpu or auto") from None
    if device.type != "cpu":
        if acc is None or acc.type != device.type:
            raise ConfigError(f"model.device={name} but {device.type.upper()} is not available here; "
                              "use model.device=cpu or auto")
        if device.index is not None and device.index >= torch.accelerator.device_count():
            raise ConfigError(f"model.device={name} but only {torch.accelerator.device_count()} "
                              f"{device.type.upper()} device(s) exist")
    elif dtype != "float32":
        raise ConfigError(f"model.dtype={dtype} needs a CUDA device or another accelerator (model.device is {name}); "
                          "use model.dtype=float32")
    return device


def resolve_model_path(cfg: DictConfig) -> str:
    """The model folder (relative paths fall back to the repo root) or hub id; local folders are
    checked for the components the config needs. Raises ConfigError."""
    m = cfg.model
    path = str(from_root(Path(m.path)))
    if is_hub_id(path):
        return path  # checked when loading
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model.path={m.path}: no such folder (nor under the repo root {ROOT})")
    if not (folder / m.unet_subfolder).is_dir():
        raise ConfigError(f"model.path={m.path}: no {m.unet_subfolder}/ subfolder (diffusers layout expected)")
    for key in ("vae_subfolder", "scheduler_subfolder", "text_encoder_subfolder", "tokenizer_subfolder",
                "controlnet_subfolder"):
        sub = m[key]  # optional components are skipped when absent, but a name the user chose must exist
        if sub and sub != getattr(ModelConfig, key) and not (folder / sub).is_dir():
            raise ConfigError(f"model.{key}={sub}: {m.path} has no {sub}/ subfolder")
    if cfg.alignment.mode == "tcm" and not (folder / m.controlnet_subfolder).is_dir():
        raise ConfigError(f"alignment.mode=tcm needs a model with a {m.controlnet_subfolder}/ folder "
                          f"(model.controlnet_subfolder); {m.path} has none")
    if cfg.alignment.mode == "tcm" and cfg.alignment.tcm_decoder == "preview" \
            and not (folder / "preview_decoder").is_dir():
        raise ConfigError(f"alignment.tcm_decoder=preview needs a model with a preview_decoder/ folder; {m.path} "
                          "has none (alignment.tcm_decoder=vae decodes the condition with the VAE)")
    return path


def load_model(cfg: DictConfig, path: str, device: torch.device, timer: StageTimer):
    """The pipeline, timed under "load"; the first import of diffusers and the pipeline under "import" (seconds:
    torch._dynamo and every diffusers model come with it; nothing on the next clip of a list)."""
    # Ctrl-C and SIGTERM wait for the import's end (one raised inside torch's import callbacks can abort the
    # process, as in interrupts.import_held), then stop the run as usual
    with timer("import"), interrupts.deferred():
        from diffusers.utils import logging as diffusers_logging

        from .loading import ModelLoadError
        from .video_pipeline import VideoPipeline

    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its chatter (even logged "errors" about
    diffusers_logging.disable_progress_bar()  # optional files) would break the one-line-error contract
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" for the text encoder
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # "Retrying in 8s" while a hub id cannot be reached
    except ImportError:
        pass
    try:
        with timer("load"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hub client's deprecation warnings
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
    if pipe.kind == "upscale":
        labels = getattr(pipe.unet, "class_embedding", None)
        if pipe.upscale_convention() == "stablevsr" and labels is not None:
            raise ConfigError("the upscaler's UNet has a class embedding (noise-level labels), which the StableVSR "
                              "convention does not pass; use model.convention=sd_upscaler")
        if pipe.upscale_convention() == "sd_upscaler":
            top, why = pipe.noise_level_range()
            if not 0 <= cfg.sampling.noise_level <= top:
                raise ConfigError(f"sampling.noise_level={cfg.sampling.noise_level} must be in [0, {top}] for "
                                  f"{cfg.model.path} ({why})")
    if pipe.controlnet is not None and cfg.alignment.mode == "tcm":
        factor = 2 ** (len(pipe.controlnet.config.conditioning_embedding_out_channels) - 1)
        want = pipe.scale if pipe.kind == "upscale" else 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if factor != want:
            raise ConfigError(f"the ControlNet's conditioning embedding takes its RGB condition down x{factor}, but "
                              f"this model's condition is x{want} its latents")
    if cfg.sampling.guidance_scale > 1 and pipe.text_encoder is None:
        raise ConfigError(f"sampling.guidance_scale={cfg.sampling.guidance_scale} needs a text-conditioned model; "
                          f"{cfg.model.path} has no text encoder (use sampling.guidance_scale=1)")
    check_model_settings(cfg, pipe)
    return pipe


def _cgroup_memory(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
                   ) -> tuple[int | None, int | None]:
    """(limit, usage) bytes of this process's memory cgroup (v2, else v1); (None, None) without a limit."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            folder, limit, usage = root / where.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            folder = root / "memory" / where.lstrip("/")
            limit, usage = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            value = (folder / limit).read_text().strip()
            used = int((folder / usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if value.isdigit() and int(value) < 1 << 60:  # v2 says "max", v1 a huge number, for no limit
            return int(value), used
    return None, None


def memory_limits(device: torch.device) -> tuple[int | None, int | None]:
    """(total, available) bytes of the memory ``device`` computes in: the host's (its cgroup's limit when
    lower, less what the cgroup uses) or the accelerator's; (None, None) where unknown."""
    if device.type != "cpu":
        try:
            free, total = torch.accelerator.get_memory_info(device)
        except (RuntimeError, ValueError, TypeError):  # an accelerator without memory queries
            return None, None
        return total, free
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None, None
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    limit, used = _cgroup_memory()
    if limit is not None and total is not None and limit < total:
        total, available = limit, min(available or limit, limit - used)
    return total, available


def _decode_fits(pipe, out_size: tuple[int, int], decode_batch: int, device: torch.device,
                 most: int = 1 << 30) -> tuple[int, list[str]]:
    """The VAE decodes whole output frames: refuse (ConfigError) a frame size whose decoding needs more memory
    than the machine has, before hours of sampling end in an out-of-memory kill; warn above what is free.
    ``most``: the frames one decoder call can get (the clip's or a window's; 1 with VAE slicing). Returns the
    decode batch to use (``decode_batch``; an automatic one shrunk to what is free) and warnings."""
    from .video_pipeline import auto_batch

    pixels = out_size[0] * out_size[1]
    batch = min(decode_batch or auto_batch(device, pixels), max(1, most))
    one = pipe.decode_memory(pixels, 1)
    total, available = memory_limits(device)
    if one is None or total is None:
        return decode_batch, []
    if decode_batch == 0 and batch > 1 and available is not None and one * batch > available:
        batch = decode_batch = max(1, int(0.8 * available) // one)  # automatic: as many as fit (a GPU's 8 of 4K)
    need = one * batch

    def size(b: float) -> str:
        return f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 27 else f"{b / 2 ** 20:.0f} MiB"

    what = (f"decoding {batch} {_wxh(out_size)} output frame{'s' if batch > 1 else ''} at once needs about "
            f"{size(need)} (the VAE's full-resolution layers)")
    fixes = ("a smaller input.resize, a smaller input, " + ("sampling.decode_batch_size=1 or model.vae_slicing=true, "
                                                           if batch > 1 else "")
             + "a machine with more memory, or model.vae_tiling=true (tiles decode separately: 5-8 dB lost with the "
             "shipped VAE)")
    if need > total:
        raise ConfigError(f"{what}; {device.type} memory here is {size(total)}: use {fixes}")
    if available is not None and need > available:
        return decode_batch, [f"{what}; {size(available)} is free now: the run may run out of memory "
                              "when it decodes"]
    return decode_batch, []


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mem = {"host_max_rss_mb": round(rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)}
    if device.type != "cpu":
        mem["device_max_allocated_mb"] = round(torch.accelerator.max_memory_allocated(device) / 2 ** 20, 1)
    return mem


# ----------------------------------------------------------------------------- input


class FrameReader:
    """The model's input frames ``[a, b)`` as float ``(n, 3, h, w)`` in [-1, 1], decoded on demand from a
    :class:`pipelines.clip_source.ClipSource` (``input.resize`` applied per chunk)."""

    def __init__(self, source, resize: float | None):
        self.source, self.resize = source, resize
        h, w = source.size
        self.size = (h, w) if not resize or resize == 1 else (max(1, round(h * resize)), max(1, round(w * resize)))

    def __len__(self) -> int:
        return len(self.source)

    def __call__(self, a: int, b: int) -> torch.Tensor:
        x = to_tensor(self.source.read(a, b))
        return x if tuple(x.shape[-2:]) == self.size else bicubic_resize(x, self.size).clamp(-1, 1)


STATE_VERSION = 4  # raised when what a work folder holds changes meaning (2: latent upscalers are not padded;
# 3: the fingerprint holds a local model folder's and the RAFT weights' contents, not their paths, and no input keys;
# 4: a hub id's cached snapshot commit, not its name)


_digests: dict[tuple, str] = {}  # a file's sha256 by (path, inode, size, mtime, ctime): a list of clips hashes once


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def _hub_snapshot(cfg: DictConfig) -> Path | None:
    """The local cache's snapshot folder (named by its commit) that a hub id loads from without the network: the
    one its ``refs/main`` names, as ``from_pretrained`` resolves it offline; None when the id is not cached."""
    m = cfg.model
    name = f"{m.unet_subfolder}/config.json"  # read by every load
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(m.path), name)
    except Exception:  # not a valid repo id, or no hub client
        return None
    return Path(found).parents[len(Path(name).parts) - 1] if isinstance(found, str) else None


def _model_contents(cfg: DictConfig) -> dict | None:
    """The files a local model folder's loading reads (pipelines.loading: ``vsr_config.json`` and the
    component subfolders the config names), relative path -> sha256; for a hub id, the commit its cached
    snapshot holds (:func:`_hub_snapshot`; that folder's files when it is not named by a commit), or None
    when it is not cached."""
    m = cfg.model
    folder = from_root(Path(m.path))
    if not folder.is_dir():
        if not is_hub_id(str(m.path)) or (folder := _hub_snapshot(cfg)) is None:
            return None
        if re.fullmatch(r"[0-9a-f]{40}", folder.name):  # a commit identifies its files
            return {"commit": folder.name}
    subs = [m.unet_subfolder, m.vae_subfolder, m.scheduler_subfolder, m.text_encoder_subfolder,
            m.tokenizer_subfolder, "low_res_scheduler"]
    if cfg.alignment.mode == "tcm":  # loaded only for the TCM
        subs += [m.controlnet_subfolder, "preview_decoder"]
    files = [folder / "vsr_config.json"] + [f for sub in subs if sub and (folder / sub).is_dir()
                                            for f in (folder / sub).rglob("*")]
    return {f.relative_to(folder).as_posix(): _file_digest(f) for f in sorted(set(files)) if f.is_file()}


# keys the fingerprint holds even where they sample nothing: schedule.chain_length with alignment.mode=none
# still decides whether a long one pass keeps its samples in files, and a checkpoint of the other kind is not
# read back right
SHAPES_THE_WORK_FOLDER = {("schedule", "chain_length")}


def fingerprint(cfg: DictConfig, pipe, read: Callable[[int, int], torch.Tensor], n: int) -> str:
    """What makes a work folder reusable: the config that shapes sampling (all but ``output`` and ``input``; a
    key without effect for the loaded ``pipe`` and this mode counts as its default, see
    :func:`~.config.inert_settings`), the decoded input frames themselves (a frame overwritten in place changes
    it; a moved file does not), the contents of a local model folder (and of the RAFT weights) rather than
    their paths (weights retrained in place change it; the same folder named by another path does not), a hub
    id's cached commit and :data:`STATE_VERSION`. Hashed chunk by chunk, so the clip is never held."""
    # ``input`` only selects and resizes the frames, which are hashed as the model gets them: input.strict, or
    # input.end written out where it was the clip's end, changes nothing sampled
    sampling = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "input")}
    default = to_dict(OmegaConf.structured(JobConfig))
    # scheduler.eta under DDPM, alignment.tcm_* without the TCM, ...: another value samples the same frames.
    # Asked without ``one_pass``, it names none of the window keys: they are hashed as given (they choose one
    # pass or windows, and the windows' folders), threads and checkpoint_every not at all (below). It names
    # runtime.one_pass_max under mode one_pass or windows, which chooses nothing then, and runtime.files_above
    # where it keeps nothing in files: what decides that (the mode, one_pass_max under auto, the window, the
    # scheduler, chain_length, the convention, n) is hashed, so a checkpoint of the other kind is never met
    for section, name, _ in inert_settings(cfg, pipe, no_files=_files_above_unused(cfg, pipe, n)):
        if (section, name) not in SHAPES_THE_WORK_FOLDER:
            sampling[section][name] = default[section][name]
    # how fast and how often, not what: a resumed run may change them
    sampling["runtime"] = {k: v for k, v in sampling["runtime"].items() if k not in ("threads", "checkpoint_every")}
    contents = _model_contents(cfg)
    if contents is not None:
        sampling["model"]["path"] = {"contents": contents}
    flow = sampling["flow"]
    flow["raft_weights"] = _file_digest(Path(flow["raft_weights"]).expanduser()) if flow["method"] == "raft" else None
    sampling["state_version"] = STATE_VERSION
    digest = hashlib.sha256(json.dumps(sampling, sort_keys=True).encode())
    digest.update(str(n).encode())
    for a in range(0, n, CHUNK):
        digest.update(read(a, min(n, a + CHUNK)).float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- scores


def _number(x: float | None) -> float | None:
    """JSON-safe: nan/inf -> None."""
    return None if x is None or not math.isfinite(x) else float(x)


class Scores:
    """The report's metrics, accumulated chunk by chunk (frames arrive in order; the pair across a chunk
    boundary is scored with the previous chunk's last frame): the no-reference warp error of the output
    and of the conditioning frames under the input's flow, sharpness, and with a reference PSNR, SSIM,
    the warp error under the reference's flow and the sharpness ratio."""

    def __init__(self, flow_cfg):
        self.flow_cfg = flow_cfg
        self.sums: dict[str, list[float]] = {}
        self.prev: tuple | None = None

    def _add(self, key: str, values) -> None:
        self.sums.setdefault(key, []).extend(v for v in values if v is not None and math.isfinite(v))

    def add(self, out: torch.Tensor, cond: torch.Tensor, gt: torch.Tensor | None = None) -> None:
        """Float chunks ``(n, 3, H, W)`` in [-1, 1]: output, conditioning (bicubic) frames, reference."""
        n = len(out)
        if min(out.shape[-2:]) >= 3:
            self._add("sharpness", [metrics.sharpness(out)] * n)
        if gt is not None:
            self._add("psnr", [metrics.psnr(out[i:i + 1], gt[i:i + 1]) for i in range(n)])
            self._add("psnr_bicubic", [metrics.psnr(cond[i:i + 1], gt[i:i + 1]) for i in range(n)])
            if min(out.shape[-2:]) >= 11:
                self._add("ssim", [metrics.ssim(out[i:i + 1], gt[i:i + 1]) for i in range(n)])
                self._add("ssim_bicubic", [metrics.ssim(cond[i:i + 1], gt[i:i + 1]) for i in range(n)])
            if min(gt.shape[-2:]) >= 3:
                self._add("sharpness_gt", [metrics.sharpness(gt)] * n)
        chunks = (out, cond, gt)
        if self.prev is not None:
            chunks = tuple(None if c is None else torch.cat([p, c]) for p, c in zip(self.prev, chunks))
        self.prev = tuple(None if c is None else c[-1:] for c in (out, cond, gt))
        o, c, g = chunks
        if len(o) < 2:
            return
        flows = compute_clip_flows(c, self.flow_cfg)
        self._add("warp_error_noref", metrics.warp_errors(o, flows.to_prev, flows.valid_prev))
        self._add("warp_error_noref_input", metrics.warp_errors(c, flows.to_prev, flows.valid_prev))
        if g is not None:
            ref = compute_clip_flows(g, self.flow_cfg)
            self._add("warp_error_ref", metrics.warp_errors(o, ref.to_prev, ref.valid_prev))
            self._add("warp_error_ref_gt", metrics.warp_errors(g, ref.to_prev, ref.valid_prev))

    def report(self, scale: int) -> dict:
        mean = {k: float(np.mean(v)) if v else None for k, v in self.sums.items()}
        rep = {k: _number(mean.get(k)) for k in ("warp_error_noref", "warp_error_noref_input", "sharpness")}
        if "psnr" in mean:
            rep.update(psnr=_number(mean["psnr"]), ssim=_number(mean.get("ssim")),
                       warp_error_ref=_number(mean.get("warp_error_ref")),
                       warp_error_ref_gt=_number(mean.get("warp_error_ref_gt")),
                       sharpness_ratio=_number(mean["sharpness"] / mean["sharpness_gt"])
                       if mean.get("sharpness") is not None and mean.get("sharpness_gt") else None)
            if scale > 1:
                rep.update(psnr_bicubic=_number(mean["psnr_bicubic"]), ssim_bicubic=_number(mean.get("ssim_bicubic")))
        return rep


# ----------------------------------------------------------------------------- the job


def _wxh(size) -> str:
    return f"{size[1]}x{size[0]}"


def _choose_mode(cfg: DictConfig, n: int) -> str:
    r = cfg.runtime
    if r.mode != "auto":
        return r.mode
    return "one_pass" if n <= r.one_pass_max else "windows"


def _files_above_unused(cfg: DictConfig, pipe, n: int) -> str | None:
    """Why no value of ``runtime.files_above`` changes where the ``n`` frames' samples are kept, or None where it
    decides whether a one pass keeps them in files: windows keep none in files, and a one-pass state that
    cannot live in files (``pipe.file_state_problem``) stays in memory at any value."""
    r = cfg.runtime
    if _choose_mode(cfg, n) == "windows" and n > r.window:
        return f"the {n} frame(s) run in windows of runtime.window={r.window}, and it applies to one pass"
    problem = pipe.file_state_problem(sampling_options(cfg).chain_length, n)
    return None if problem is None else f"one pass keeps its samples in memory at any value: {problem}"


def run_clip(cfg: DictConfig, input=None, output=None, *, config_path=DEFAULT_CONFIG, reference=None,
             overwrite: bool = False, workdir=None, log: Callable[[str], None] = print,
             progress: bool = True, asked: set[str] | None = None) -> dict:
    """Run the job ``cfg`` on one clip and write ``output`` (H.264), ``<stem>.json`` (the report, also
    returned) and ``<stem>.yaml`` (the merged config). Raises ConfigError / UsageError / InputError /
    WorkdirMismatch for bad input (checked before heavy work where it can be known up front).
    ``asked``: the keys the user chose (:func:`pipelines.config.asked_keys`); those this model and mode
    leave without effect are named in warnings. A ``workdir`` is held (an flock on the folder, where the file
    system has flock) for the run: a second run on it is refused."""
    from .checkpoint import workdir_lock

    t0 = time.perf_counter()
    validate(cfg)  # again: a library caller may have edited the loaded config
    paths = plan_paths(cfg, input, output, config_path, reference)
    workdir = Path(workdir).expanduser() if workdir else None
    targets = [target for _, target in paths.files()] + ([paths.frames_dir] if paths.frames_dir else [])
    for target in targets:  # the PNG folder's temporary sibling too: a killed run's copy of every frame
        for stale in remove_stale_temps(target):
            log(f"removed {stale}, left behind by an interrupted earlier run")
    ours = interrupted_outputs(workdir)
    check_paths(paths, overwrite, workdir, ours)
    if any(t.exists() and t.resolve() in ours for t in targets) and not overwrite:
        log(f"finishing the outputs the run with --workdir {workdir} was writing when it stopped")

    def may_replace(path: Path) -> bool:
        return overwrite or path.resolve() in ours

    with workdir_lock(workdir), ExitStack() as opened:  # the clips' decoders, closed however the run ends
        return _run(cfg, paths, workdir=workdir, may_replace=may_replace, log=log, progress=progress, asked=asked,
                    t0=t0, opened=opened)


def _run(cfg: DictConfig, paths: Paths, *, workdir: Path | None, may_replace: Callable[[Path], bool],
         log: Callable[[str], None], progress: bool, asked: set[str] | None, t0: float, opened: ExitStack) -> dict:
    """:func:`run_clip` from its checked paths on (``may_replace(path)``: whether an existing output may go;
    ``opened``: closes the clips it opens when the caller's block ends, an error before sampling included)."""
    from tqdm import tqdm

    from .clip_source import ClipSource

    device = resolve_device(cfg)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    model_path = resolve_model_path(cfg)
    flow_cfg = flow_config(cfg)
    timer = StageTimer(device)
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)

    sel, r = cfg.input, cfg.runtime
    select = dict(start=sel.start, end=sel.end, stride=sel.stride, max_frames=sel.max_frames, strict=sel.strict)
    with timer("io"):
        # windows re-read a finished window's input for scoring: cached, or every re-read would decode the
        # clip again from its first frame (a bounded cache: one window of low-res frames)
        source = opened.enter_context(ClipSource(paths.input, **select, cache=r.window + r.overlap + 1))
        ref_source = None if paths.reference is None else opened.enter_context(
            ClipSource(paths.reference, **select, cache=2))
    for warning in source.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    n = len(source)
    rate = f"{source.fps:g} fps" if source.fps else "no frame rate"
    log(f"read {n} frames {_wxh(source.size)} ({rate}) from {paths.input}")
    if source.rotation or source.mirrored:
        turned = [f"turned {source.rotation} degrees counterclockwise"] if source.rotation else []
        log(f"frames {' and '.join((['mirrored left-right'] if source.mirrored else []) + turned)}, as the "
            "container's display matrix asks")
    read = FrameReader(source, sel.resize)
    if read.size != tuple(source.size):
        log(f"resizing the input to {_wxh(read.size)}")
    if ref_source is not None and len(ref_source) != n:
        raise UsageError(f"--reference has {len(ref_source)} frames, output has {n}")
    key, early_warnings = "", []
    if workdir is not None:
        from .checkpoint import Checkpointer

        # before the model loads: a work folder (its fingerprint is checked after the load) that takes files
        Checkpointer.verify(workdir, None)
        _creatable_parent("--workdir", workdir / "run.json")

    log(f"loading model {model_path} on {device} ({cfg.model.dtype})")
    pipe = load_model(cfg, model_path, device, timer)
    if workdir is not None:
        # after the load: which keys are without effect depends on the model, and a hub id's commit is then the
        # one loaded (the load may have fetched another than the cache held)
        key = fingerprint(cfg, pipe, read, n)
        Checkpointer.verify(workdir, key)
        early_warnings += _same_machine(workdir, device)
    log(f"model: {pipe.kind}, x{pipe.scale}")
    alignment = build_alignment(cfg, pipe)
    job_warnings = [*source.warnings, *early_warnings]
    mode = _choose_mode(cfg, n)
    by_window = mode == "windows" and n <= r.window  # one window holds the clip: reported as what runs
    one_pass = None  # why the clip runs in one pass, for the no-effect warnings
    if by_window:  # a smaller window would give windows: the window has an effect, the overlap none
        mode = "one_pass"
        one_pass = f"runtime.window={r.window} holds all {n} frame(s): one pass" + (
            f" (runtime.mode=auto gives windows above runtime.one_pass_max={r.one_pass_max})"
            if r.mode == "auto" else "")
    elif mode == "one_pass":
        one_pass = "runtime.mode is one_pass" if r.mode == "one_pass" else (
            f"the {n} frame(s) run in one pass (runtime.mode=auto, runtime.one_pass_max={r.one_pass_max})")
    for warning in ineffective_settings(cfg, pipe, asked or set(), one_pass=one_pass, by_window=by_window,
                                        no_files=_files_above_unused(cfg, pipe, n), workdir=workdir is not None):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
        job_warnings.append(warning)
    out_size = (read.size[0] * pipe.scale, read.size[1] * pipe.scale)
    if ref_source is not None and tuple(ref_source.size) != out_size:
        raise UsageError(f"--reference frames are {_wxh(ref_source.size)}, output frames are {_wxh(out_size)}")
    if n > 1:  # the alignment and the report's consistency metrics both need flow
        try:
            check_flow_size(out_size, flow_cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    # sampling, as a stream of finished output chunks (first index, uint8 (k, H, W, 3))
    multiple, least = pipe.input_multiple(), pipe.min_input_side()
    padded_size = tuple(padded_side(s, multiple, least) for s in read.size)
    if padded_size != read.size:
        log(f"padding {_wxh(read.size)} to {_wxh(padded_size)} (the model needs multiples of {multiple}, "
            f"at least {least} a side)")
    # frames per decoder call: the batch, but never more than a pass (or window) holds
    most = 1 if getattr(pipe.vae, "use_slicing", False) else (r.window if mode == "windows" else n)
    decode_batch, fit_warnings = _decode_fits(pipe, (padded_size[0] * pipe.scale, padded_size[1] * pipe.scale),
                                              cfg.sampling.decode_batch_size, device, most)
    for warning in fit_warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
        job_warnings.append(warning)
    if decode_batch != cfg.sampling.decode_batch_size:
        log(f"decoding {decode_batch} frame(s) per VAE call: what fits in the free memory")
    options = replace(sampling_options(cfg), decode_batch_size=decode_batch)

    def model_input(a: int, b: int) -> torch.Tensor:
        return pad_to_multiple(read(a, b), multiple, least)[0]

    s = cfg.sampling
    from .sampler import img2img_timesteps

    steps_run = len(img2img_timesteps(pipe.scheduler, s.num_inference_steps, s.strength))
    log(f"sampling {n} frames ({mode.replace('_', ' ')}): {steps_run} of {s.num_inference_steps} steps, "
        f"alignment {cfg.alignment.mode}, {cfg.schedule.direction}")
    if hasattr(alignment, "uses_step"):  # the TCM's guidance window
        used = sum(alignment.uses_step(i, steps_run) for i in range(steps_run))
        a = cfg.alignment
        if used == 0:
            raise ConfigError(f"alignment.tcm_start/tcm_end=({a.tcm_start}, {a.tcm_end}) holds none of the "
                              f"{steps_run} steps run (step i of N uses the TCM when start <= i/N and (i+1)/N <= "
                              "end); widen the window or use more steps")
        if used < steps_run:
            log(f"the TCM conditions {used} of the {steps_run} steps (alignment.tcm_start/tcm_end)")
    if workdir is not None:
        log(f"checkpointing to {workdir} every {r.checkpoint_every} step(s)")
        _record_machine(workdir, device)
    windows = mode == "windows" and n > r.window
    if windows:
        from .windows import plan_windows

        spans = plan_windows(n, r.window, r.overlap)
        log(f"{len(spans)} windows of {r.window} frames overlapping by {r.overlap}")
        total = steps_run * sum(b - a for a, b in spans)
    else:
        total = steps_run * n
    in_files = not windows and n > r.files_above
    if in_files and (reason := pipe.file_state_problem(sampling_options(cfg).chain_length, n)):
        log(f"one pass over {n} frames > runtime.files_above={r.files_above}, but the samples stay in memory: "
            f"{reason}")
        in_files = False
    state_dir = None  # made in the try below, which removes a temporary one on every way out
    bar = tqdm(total=total, desc="denoising", unit="frame-step", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)

    def chunks():
        if windows:
            from .windows import iter_windows

            finished = iter_windows(pipe, n, model_input, window=r.window, overlap=r.overlap,
                                    anchor_weight=r.anchor_weight, make_alignment=lambda: build_alignment(cfg, pipe),
                                    options=options, flow=flow_cfg, progress=bar.update, timer=timer,
                                    workdir=workdir, fingerprint=key, checkpoint_every=r.checkpoint_every, crop=out_size)
            for a, out in finished:
                yield a, out, None  # the input frames of a window are not kept: re-read (cached) below
            return
        from .checkpoint import Checkpointer

        ckpt = None if workdir is None else Checkpointer(workdir, key, r.checkpoint_every)
        if not in_files:
            inputs = model_input(0, n)
            result = pipe(inputs, options=options, alignment=alignment, flow=flow_cfg,
                          progress=bar.update, timer=timer, checkpoint=ckpt, output_uint8=True)
            frames = result.frames[:, :out_size[0], :out_size[1]]
            del result
            for a in range(0, n, CHUNK):
                yield a, frames[a:a + CHUNK], inputs[a:a + CHUNK]
            return
        # one pass over a long clip: input, samples and flows in files, decoded chunk by chunk
        from .filestore import FileTensor

        inputs = FileTensor(state_dir / "input.bin", (n, 3, *padded_size))
        for a in range(0, n, CHUNK):
            inputs[torch.arange(a, min(n, a + CHUNK))] = model_input(a, min(n, a + CHUNK))
        result = pipe(inputs, options=options, alignment=alignment, flow=flow_cfg, progress=bar.update,
                      timer=timer, checkpoint=ckpt, state_dir=state_dir)
        for a, u8 in pipe.iter_output(result.state, inputs, decode_batch, chunk=CHUNK, back_projection=s.back_projection,
                                      flows=result.flows, as_uint8=True, timer=timer):
            yield a, u8[:, :out_size[0], :out_size[1]], inputs[a:a + len(u8)]

    # the writers and the scores, fed chunk by chunk
    o = cfg.output
    fps = float(o.fps or source.fps or DEFAULT_FPS)
    # AVI stores no presentation times (a written .avi with them declares a bogus frame rate)
    keep_times = o.fps is None and source.pts is not None and paths.output.suffix.lower() != ".avi"
    # the audio from the first kept frame's time on the streams' shared timeline (a video stream may
    # start after its audio)
    audio_start = 0.0
    if source.pts is not None:
        audio_start = float(source.pts[0] * source.time_base)
    elif source.fps:
        first = float(source.start_pts * source.time_base) if source.start_pts is not None else 0.0
        audio_start = first + sel.start / (source.fps * sel.stride)
    # output.fps other than the selection's rate plays the frames faster or slower: the input's sound would not
    # match them
    respeed = (f"output.fps={o.fps:g} plays the frames at another speed than the input's {source.fps:g} fps"
               if o.fps is not None and source.fps and abs(o.fps / source.fps - 1) > 1e-3 else None)
    log(f"writing {paths.output} ({n} frames {_wxh(out_size)}, {fps:g} fps, H.264 crf {o.crf})")
    writer = sbs = pngs = None
    scores = Scores(flow_cfg)
    pending: list[PendingText] = []  # the config copy and the report, written before any output moves
    try:  # what each writer and the state folder make is dropped on an error (or Ctrl-C) from here on
        if in_files:
            from .video_writer import temp_sibling

            state_dir = workdir / "state" if workdir is not None else temp_sibling(paths.output, directory=True)
            log(f"one pass over {n} frames > runtime.files_above={r.files_above}: samples and flows kept in "
                f"files in {state_dir}")
        writer = VideoWriter(paths.output, fps, crf=o.crf, replace=may_replace(paths.output),
                             audio_from=paths.input if o.audio and source.is_video and not respeed else None,
                             audio_start_s=audio_start, time_base=source.time_base if keep_times else None,
                             sample_aspect=source.sample_aspect, end_pts=source.end_pts if keep_times else None)
        sbs = None if paths.side_by_side is None else VideoWriter(
            paths.side_by_side, fps, crf=o.crf, replace=may_replace(paths.side_by_side),
            sample_aspect=source.sample_aspect)
        pngs = None if paths.frames_dir is None else FrameFolderWriter(paths.frames_dir)
        for a, out_u8, padded_input in chunks():
            k = len(out_u8)
            with timer("io"):
                u8 = out_u8.numpy() if torch.is_tensor(out_u8) else out_u8
                writer.append(u8, source.pts[a:a + k] if keep_times else None)
                # the model's input frames of this chunk, without padding (decoded again only for windows)
                inp = read(a, a + k) if padded_input is None else padded_input[..., :read.size[0], :read.size[1]]
                if sbs is not None:
                    sbs.append(side_by_side(to_uint8(inp), u8, mode="bicubic"))
                if pngs is not None:
                    pngs.append(u8)
            with timer("metrics"):
                gt = None if ref_source is None else to_tensor(ref_source.read(a, a + k))
                scores.add(to_tensor(u8), pipe.conditioning_frames(inp).float(), gt)
        bar.close()
        with timer("io"):  # every output is made ready before any is moved into place (see _commit_all)
            written = writer.finish()
            for w in (sbs, pngs):
                if w is not None:
                    w.finish()
            pending.append(PendingText(paths.merged_config, to_yaml(cfg)))
        if written.padded:
            log(f"note: H.264 needs even sides; {_wxh(out_size)} is stored as {_wxh(written.size)} "
                "(last row/column repeated); output.frames_dir PNGs keep the exact size")
        audio = written.audio if source.is_video else "input has no audio"  # images, GIF
        if o.audio and respeed and audio == "no audio source given":
            audio = respeed
        if o.audio and audio not in (None, "input has no audio"):
            log(f"audio not copied: {audio}")

        timings = {"total": round(time.perf_counter() - t0, 4)}
        timings.update({k: 0.0 for k in ("model", "flow", "align", "scheduler", "vae" if pipe.vae else "decode",
                                          "backproject", "io", "load", "import", "metrics")})
        timings.update(timer.report())
        video = dict(fps=fps, codec="h264", pix_fmt="yuv420p", crf=o.crf, encoded_size=list(written.size),
                     padded=written.padded, audio="copied" if audio is None else audio,
                     timestamps="kept from the input" if keep_times else "constant rate")
        report = dict(
            input=str(paths.input), output=str(paths.output),
            reference=str(paths.reference) if paths.reference else None, model_path=model_path,
            frames=n, source_size=list(source.size), input_size=list(read.size), output_size=list(out_size),
            fps=fps, model_kind=pipe.kind, scale=pipe.scale, input_multiple=multiple, padded_size=list(padded_size),
            device=str(device),
            dtype=cfg.model.dtype, steps_run=steps_run, mode=mode, state_in_files=in_files, video=video,
            warnings=job_warnings,
            timings=timings, peak_memory=peak_memory(device), **scores.report(pipe.scale), config=to_dict(cfg))
        pending.append(PendingText(paths.report, json.dumps(report, indent=2) + "\n"))
        _commit_all(paths, writer, sbs, pngs, pending, workdir, may_replace, n, log)
    except BaseException:
        bar.close()
        for w in (writer, sbs, pngs, *pending):
            if w is not None:
                w.abort()
        raise
    finally:
        with ExitStack() as cleanup:  # last in, first run; each runs though one before it raised
            if state_dir is not None and workdir is None:
                import shutil

                cleanup.callback(shutil.rmtree, state_dir, ignore_errors=True)
            cleanup.callback(opened.close)  # the clips now (run_clip's block closes them after an earlier error)
    summary = f", psnr {report['psnr']:.2f} dB" if report.get("psnr") is not None else ""
    log(f"done in {timings['total']:.1f}s: {paths.output}{summary}")
    return report


def _commit_all(paths: Paths, writer, sbs, pngs, pending: list, workdir: Path | None,
                may_replace: Callable[[Path], bool], n: int, log: Callable[[str], None]) -> None:
    """Move every prepared output into place, the report last: renames only (each file already sealed,
    :func:`~.video_writer.seal`), which need no free space, so a full disk (or any error while the outputs
    were made) leaves the earlier outputs as they were. All are recorded in the work folder before the first
    move (:meth:`_Commits.expect`): a run stopped from here on is finished by the same command. Ctrl-C and
    SIGTERM wait for the moves (:func:`~.interrupts.deferred`)."""
    from .interrupts import deferred

    commits = _Commits(workdir)
    moves = [(paths.output, writer.tmp)]
    if sbs is not None:
        moves.append((paths.side_by_side, sbs.tmp))
    if pngs is not None:
        moves.append((paths.frames_dir, pngs.tmp))
    moves += [(text.path, text.tmp) for text in pending]
    commits.expect(moves)  # before the first move: it writes, the moves do not
    with deferred():
        writer.commit()
        if sbs is not None:
            sbs.commit()
        if pngs is not None:
            pngs.close()
        for text in pending:  # the config copy, then the report
            text.commit(replace=may_replace(text.path))
    commits.finish()
    if sbs is not None:
        log(f"wrote {paths.side_by_side} (input | output)")
    if pngs is not None:
        log(f"wrote {n} PNG frames to {paths.frames_dir}")


__all__ = ["run_clip", "UsageError", "Paths", "plan_paths", "check_paths", "fingerprint", "Scores", "InputError"]
