"""The job config: a typed schema, loading and validation, and its translation into library objects.

The schema is a tree of dataclasses that OmegaConf merges with a YAML file and ``key=value``
overrides, so an unknown key or a value of the wrong type is an error rather than a silent
default. Ranges are checked after merging (``validate``). Every problem is raised as
``ConfigError`` with a one-line message that names the key, e.g.
``sampling.strength must be in (0, 1], got 1.5``.

A YAML file may start from another one with ``base: other.yaml`` (relative to the file); its
own keys then override the base's.

The schema defaults are the library's defaults; ``configs/default.yaml`` holds the project's job.
"""
from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, get_args

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

if TYPE_CHECKING:
    from .align import Alignment
    from .flow import FlowConfig
    from .options import SamplingOptions
    from .video_pipeline import VideoPipeline

Dtype = Literal["float32", "float16", "bfloat16"]
SchedulerKind = Literal["auto", "ddpm", "ddim", "dpm++", "euler"]  # pipelines.loading.SCHEDULER_KINDS + auto
NoiseMode = Literal["independent", "shared"]
Direction = Literal["bidirectional", "forward", "backward"]
Start = Literal["forward", "backward"]
AlignmentMode = Literal["none", "fusion", "tcm"]
WeightSchedule = Literal["constant", "linear"]
FlowMethod = Literal["dis", "farneback", "raft"]
DisPreset = Literal["ultrafast", "fast", "medium"]

Convention = Literal["auto", "stablevsr", "sd_upscaler"]
TcmWarp = Literal["exact", "stablevsr"]
RunMode = Literal["auto", "one_pass", "windows"]
TcmDecoder = Literal["vae", "preview"]
FusionSpace = Literal["frame", "sample", "decoded"]
DEVICE_PATTERN = re.compile(r"auto|cpu|(cuda|xpu|mps|mtia|hpu|npu|xla|privateuseone)(:\d+)?")  # torch's accelerators
MAX_DEVICE_INDEX = 127  # torch keeps a device index in 8 signed bits: cuda:256 is cuda:0, cuda:128 is cuda:-128
BASE_KEY = "base"
ROOT = Path(__file__).resolve().parents[1]  # the repository
DEFAULT_CONFIG = Path("configs/default.yaml")


class ConfigError(ValueError):
    """A bad config: the CLI prints ``error: config: <message>`` and exits with code 2."""


# ----------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    path: str = "weights/latent-x4"  # hub id or local folder (diffusers layout)
    unet_subfolder: str = "unet"
    vae_subfolder: str = "vae"
    scheduler_subfolder: str = "scheduler"
    text_encoder_subfolder: str = "text_encoder"
    tokenizer_subfolder: str = "tokenizer"
    controlnet_subfolder: str = "controlnet"
    variant: Optional[str] = None  # weight files of this variant where a component has them (fp16: *.fp16.safetensors)
    dtype: Dtype = "float32"  # float16 / bfloat16 need CUDA
    device: str = "auto"  # auto | cpu | an accelerator: cuda, cuda:N, xpu:N, mps, ...
    vae_tiling: bool = False
    vae_slicing: bool = False
    # latent upscalers (the low-res frame is in [-1, 1] under both): stablevsr = clean low-res frame, no
    # class labels; sd_upscaler = noised low-res frame with its noise level as class label; auto = stablevsr
    # with a ControlNet or without a class embedding, else sd_upscaler
    convention: Convention = "auto"


@dataclass
class SchedulerConfig:
    kind: SchedulerKind = "auto"  # auto: the checkpoint's own scheduler
    eta: float = 0.0  # DDIM / DDPM-style stochasticity, in [0, 1] (above 1 DDIM's step turns NaN)


@dataclass
class SamplingConfig:
    num_inference_steps: int = 20
    # run the last int(steps * strength) steps, in (0, 1]. Below 1 the start is diffusers' img2img (the
    # encoded/conditioning frame noised to the first timestep); at 1 it is pure noise times the scheduler's
    # init_noise_sigma, diffusers' text-to-image start, so no trace of the input survives in the start
    strength: float = 1.0
    seed: int = 0
    noise: NoiseMode = "independent"
    guidance_scale: float = 1.0  # > 1: classifier-free guidance (text-conditioned models)
    prompt: str = ""
    negative_prompt: str = ""
    noise_level: int = 20  # latent upscaler only
    batch_size: int = 0  # frames per model call; 0 = auto (8 on a GPU, CPU: see video_pipeline.auto_batch)
    decode_batch_size: int = 0  # frames per VAE call; 0 = auto, as batch_size
    # super-resolution models: add U(y - D(x)) so the output downscales to its input, the correction
    # averaged along the flow with the neighbours' (pipelines/backproject.py); no effect at scale 1
    back_projection: bool = False


@dataclass
class ScheduleConfig:
    direction: Direction = "bidirectional"
    start: Start = "forward"
    passes: int = 0  # direction blocks; 0 = flip every step
    chain_length: int = 0  # 0 = exact sweep; L = chains of L frames in lockstep


@dataclass
class AlignmentConfig:
    mode: AlignmentMode = "none"
    weight: float = 0.5  # fusion weight, in [0, 1]
    weight_schedule: WeightSchedule = "constant"
    space: FusionSpace = "frame"  # residual models: fuse whole frames (frame) or the residual samples (sample);
    # latent models fuse the latents, or with "decoded" the decoded RGB estimates (measured: about 10x slower,
    # +0.05 dB on average over held-out clips; README "Latent or decoded-space fusion")
    tcm_scale: float = 1.0  # ControlNet conditioning scale
    tcm_masked: bool = False  # zero the warped condition where the flow check marks occlusions
    tcm_fusion: bool = False  # also fuse x0 estimates (weight, weight_schedule) like mode fusion
    tcm_warp: TcmWarp = "exact"  # warp of the TCM condition: exact, or StableVSR's flow_warp convention
    tcm_decoder: TcmDecoder = "vae"  # decoder of the TCM condition: the VAE's, or the model's preview_decoder/
    tcm_start: float = 0.0  # fraction of the steps before which the TCM is skipped (ControlNet guidance start)
    tcm_end: float = 1.0  # fraction of the steps after which the TCM is skipped (ControlNet guidance end)


@dataclass
class FlowSection:
    method: FlowMethod = "dis"
    dis_preset: DisPreset = "medium"
    raft_weights: Optional[str] = None  # local torchvision RAFT weights file
    scale: float = 1.0  # flow resolution as a fraction of the frame size, in (0, 1]
    fb_alpha1: float = 0.01
    fb_alpha2: float = 0.5


@dataclass
class InputConfig:
    start: int = 0
    end: Optional[int] = None  # exclusive
    stride: int = 1
    max_frames: Optional[int] = None
    resize: Optional[float] = None  # bicubic rescale of the input frames before sampling
    strict: bool = False  # fail (exit 2) when a video decodes fewer frames than its container declares


@dataclass
class OutputConfig:
    fps: Optional[float] = None  # default: the input's rate, or 20 when it has none
    frames_dir: Optional[str] = None  # also write PNG frames here
    side_by_side: Optional[str] = None  # also write an input | output comparison video here
    audio: bool = True  # copy the input's audio stream (trimmed to the selected frames) into the output
    crf: int = 12  # H.264 constant rate factor (0 best .. 51 worst): measured 0.20 dB on the default job, 18: 0.32


@dataclass
class RuntimeConfig:
    threads: int = 0  # CPU threads for torch (0: torch's default)
    offload_state: bool = False  # keep per-frame latents on the host, move only the batch to the device
    # one_pass: the exact sweep over the whole clip; windows: overlapping windows of `window` frames, memory
    # bounded by the window; auto: one pass up to `one_pass_max` frames, windows beyond (see README)
    mode: RunMode = "auto"
    one_pass_max: int = 48
    window: int = 24  # frames per window
    files_above: int = 200  # one pass over more frames keeps samples and flows in files (flat memory)
    overlap: int = 4  # frames shared by consecutive windows
    anchor_weight: float = 0.0  # pull of the previous window's finished frames on the overlap, in [0, 1]
    # (0 measured best: at 0.8 the overlap came out a copy of the previous window's frames and the whole
    # switch to the new window fell on one pair, 1.5-1.8x one pass's warp error; README "Window seams")
    checkpoint_every: int = 1  # with --workdir: save the sampling state every N steps


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    flow: FlowSection = field(default_factory=FlowSection)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ----------------------------------------------------------------------------- loading


def _describe(err: OmegaConfBaseException, source: str) -> str:
    """One line from an OmegaConf error: the key, what is wrong, and where it came from."""
    key = getattr(err, "full_key", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ConfigKeyError) and key:
        return f"unknown key {key} (in {source})"
    return f"{key}: {first} (in {source})" if key else f"{first} (in {source})"


# each schema key's declared type, as written in its dataclass ("bool", "str", "Optional[int]", ...)
FIELD_TYPES = {f"{section.name}.{f.name}": f.type
               for section in fields(JobConfig) for f in fields(section.default_factory)}
# the values OmegaConf takes as booleans, less its other integers (it reads 2 or -1 as true)
BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "1", "0"}


def _leaves(conf: DictConfig):
    """(dotted key, raw value) of each leaf, unresolved: an interpolation may name a key of the base or the schema."""
    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return walk(OmegaConf.to_container(conf, resolve=False))


def _no_unset_marks(conf: DictConfig, source: str) -> None:
    """OmegaConf reads ``???`` as "unset", and merging an unset value keeps the value under it: refuse it rather
    than run with the default the user meant to replace."""
    unset = sorted(key for key, value in _leaves(conf) if value == "???")
    if unset:
        raise ConfigError(f"{unset[0]}: '???' marks a value as unset in OmegaConf, so the default would stay; "
                          f"give a value (in {source})")


def _refused_null(conf: DictConfig) -> tuple[str, str | None] | None:
    """The first key given null (YAML's empty value, ``null``, ``~``) that cannot take it, with its type: a whole
    section (type None) or a key that is not Optional, which OmegaConf refuses with "Incompatible value 'None'"
    or "field is not Optional" (an unknown key is left to OmegaConf; null is a value of an Optional key)."""
    sections = {f.name for f in fields(JobConfig)}
    for key, value in _leaves(conf):
        kind = FIELD_TYPES.get(key)
        if value is None and (key in sections or (kind is not None and not kind.startswith("Optional["))):
            return key, kind
    return None


def _no_empty_values(conf: DictConfig, source: str) -> None:
    """An empty value in a YAML file (``prompt:``, ``sampling:``, ``base:``) that its key cannot take
    (:func:`_refused_null`): say so, naming the key."""
    if BASE_KEY in conf and conf[BASE_KEY] is None:
        raise ConfigError(f"{BASE_KEY}: the value is empty (null in YAML); give a file name, or leave it out "
                          f"(in {source})")
    if (found := _refused_null(conf)) is None:
        return
    key, kind = found
    if kind is None:
        raise ConfigError(f"{key}: the section is empty (null in YAML); give its keys under it, or leave it out "
                          f"(in {source})")
    how = f"for an empty string write {key.rpartition('.')[2]}: \"\"" if kind == "str" else "give a value"
    raise ConfigError(f"{key}: the value is empty (null in YAML), which this key does not take; {how} "
                      f"(in {source})")


def _no_null_overrides(given: DictConfig, item: str) -> None:
    """An override that gives null (``key=null``, ``key=~``, ``key=``, ``section={key: }``, ``section=null``) to
    a key that cannot take it (:func:`_refused_null`): say so, naming the key."""
    if (found := _refused_null(given)) is None:
        return
    key, kind = found
    what = "the value is empty, which OmegaConf reads as null" if not item.partition("=")[2].strip() else \
        "the value is null (or empty in YAML), which this key does not take"
    if kind is None:
        how = f"give its keys ({key}.name=value)"
    elif kind == "str":
        how = f"for an empty string give {key}=\"\" or {key}='', quoted for the shell as in '{key}=\"\"'"
    else:
        how = "give a value"
    raise ConfigError(f"{key}: {what}; {how} (in override {item!r})")


def _is_boolean(value) -> bool:
    """Whether a bool key may take ``value``: true/false and the words and numbers OmegaConf itself reads as them
    (yes/no, on/off, y/n, 1/0), not the other integers, which it turns into true."""
    if isinstance(value, str):
        return value.lower() in BOOLEAN_WORDS
    return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))


def _interpolation(value) -> bool:
    return isinstance(value, str) and "${" in value


def _only_booleans(conf: DictConfig, source: str) -> None:
    """OmegaConf turns any integer into a boolean for a bool field (2 would mean true): refuse all but
    :func:`_is_boolean`'s values. An interpolation is held to the same rule once resolved
    (:func:`_resolved_booleans`)."""
    for key, value in _leaves(conf):
        if FIELD_TYPES.get(key) != "bool" or value is None or _interpolation(value):
            continue  # None: the empty-value message, or OmegaConf's
        if not _is_boolean(value):
            raise ConfigError(f"{key} must be true or false, got {value!r} (in {source})")


def _resolved_booleans(cfg: DictConfig, interpolated: dict[str, str], origins: dict[str, str]) -> None:
    """Bool keys given as interpolations (dotted key -> ``${...}``): OmegaConf turns what one resolves to into a
    boolean as it would any value, so ``${runtime.threads}`` at 2 meant true. Each is resolved again, against
    ``cfg``'s resolved values in an untyped copy, where nothing converts it, and held to :func:`_is_boolean`.
    ``origins``: where each key was set (:func:`load_config`), named in the message."""
    if not interpolated:
        return
    plain = OmegaConf.create(to_dict(cfg))
    for key, expression in interpolated.items():
        OmegaConf.update(plain, key, expression)
        try:
            value = OmegaConf.select(plain, key)
        except OmegaConfBaseException as e:
            raise ConfigError(_describe(e, origins.get(getattr(e, "full_key", None) or key, "config"))) from None
        if not _is_boolean(value):
            raise ConfigError(f"{key} must be true or false, got {value!r} from {expression} "
                              f"(in {origins.get(key, 'config')})")


def from_root(path: Path) -> Path:
    """``path`` as given, or under the repo root when it is relative and missing from the cwd (here, not in
    pipelines.job, which imports torch: the command line finds its --config before it needs torch)."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return ROOT / path
    return path


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), origins: dict[str, str] | None = None) -> DictConfig:
    """A YAML file as a DictConfig, with its ``base:`` chain merged underneath. ``origins``, where given, gets
    each key's file: the last in the chain that sets it, as in the merge."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {path.name}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e, path.name)}") from None
    except AssertionError:  # OmegaConf asserts on a document that is one number or boolean
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got a single value") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got a {type(data).__name__}")
    _no_unset_marks(data, str(path))
    _no_empty_values(data, str(path))
    _only_booleans(data, str(path))
    base = data.pop(BASE_KEY, None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    parent = None if base is None else _read_yaml(path.parent / base, (*seen, path.resolve()), origins)
    if origins is not None:  # after the base's keys: this file's override them
        origins.update(dict.fromkeys((leaf for leaf, _ in _leaves(data)), str(path)))
    return data if parent is None else OmegaConf.merge(parent, data)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults <- YAML file at ``path`` (None: none) <- ``key=value`` overrides, validated.

    Returns a structured DictConfig (typed like ``JobConfig``). Raises ConfigError.
    """
    cfg = OmegaConf.structured(JobConfig)
    origins: dict[str, str] = {}  # dotted key -> the file or override that set it last, for interpolation errors
    if path is not None:
        path = Path(path)
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(path, origins=origins))
        except OmegaConfBaseException as e:
            raise ConfigError(_describe(e, str(path))) from None
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            given = OmegaConf.from_dotlist([item])
            _no_null_overrides(given, item)
            _no_unset_marks(given, f"override {item!r}")
            _only_booleans(given, f"override {item!r}")
            cfg = OmegaConf.merge(cfg, given)
            origins.update(dict.fromkeys((leaf for leaf, _ in _leaves(given)), f"override {item!r}"))
        except OmegaConfBaseException as e:  # an unknown key (ConfigKeyError) among them
            raise ConfigError(_describe(e, f"override {item!r}")) from None
        except yaml.YAMLError as e:  # the value is parsed as YAML: an unclosed quote or bracket
            problem = " ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) \
                or str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it whole, "
                              f"e.g. {key}=\"...\"") from None
    interpolated = {key: value for key, value in _leaves(cfg)
                    if FIELD_TYPES.get(key) == "bool" and _interpolation(value)}
    try:
        OmegaConf.resolve(cfg)  # interpolations: fail here, not halfway through a run
    except OmegaConfBaseException as e:  # named by the key whose interpolation failed: where that key was set
        raise ConfigError(_describe(e, origins.get(getattr(e, "full_key", None), "config"))) from None
    _resolved_booleans(cfg, interpolated, origins)
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Range checks the schema's types cannot express; raises ConfigError naming the key."""
    m, s = cfg.model, cfg.sampling
    _check(bool(m.path.strip()), "model.path", "a hub id or a folder", m.path)
    _check(DEVICE_PATTERN.fullmatch(m.device) is not None, "model.device",
           "auto, cpu or an accelerator such as cuda, cuda:N, xpu:N or mps", m.device)
    index = m.device.partition(":")[2]
    if index:  # torch refuses cuda:01 and, past 2**31, any index; in between it wraps the index around
        _check(re.fullmatch(r"0|[1-9]\d*", index) is not None and int(index) <= MAX_DEVICE_INDEX, "model.device",
               f"an accelerator with an index N in [0, {MAX_DEVICE_INDEX}] without leading zeros (cuda:N)", m.device)
    _check(m.dtype in get_args(Dtype), "model.dtype", " or ".join(get_args(Dtype)), m.dtype)
    if m.variant is not None:
        _check(re.fullmatch(r"[A-Za-z0-9_-]+", m.variant) is not None, "model.variant",
               "null or a weights variant name such as fp16", m.variant)
    try:  # the sampling ranges: SamplingOptions' own checks, one rule for library callers and configs
        sampling_options(cfg)
    except ValueError as e:
        field = str(e).split()[0].removeprefix("SamplingOptions.")
        section = {"eta": "scheduler", "direction": "schedule", "start": "schedule", "passes": "schedule",
                   "chain_length": "schedule", "offload_state": "runtime"}.get(field, "sampling")
        raise ConfigError(str(e).replace(f"SamplingOptions.{field}", f"{section}.{field}", 1)) from None
    if int(s.num_inference_steps * s.strength) < 1:
        raise ConfigError(f"sampling.strength={s.strength} x sampling.num_inference_steps={s.num_inference_steps}"
                          " leaves no denoising step to run (int(steps * strength) must be >= 1)")

    a = cfg.alignment
    _check(0 <= a.weight <= 1, "alignment.weight", "in [0, 1]", a.weight)
    _check(math.isfinite(a.tcm_scale) and a.tcm_scale >= 0, "alignment.tcm_scale", "finite and >= 0", a.tcm_scale)
    _check(0 <= a.tcm_start < a.tcm_end <= 1, "alignment.tcm_start/tcm_end", "0 <= start < end <= 1",
           (a.tcm_start, a.tcm_end))

    f = cfg.flow
    _check(0 < f.scale <= 1, "flow.scale", "in (0, 1]", f.scale)
    _check(f.fb_alpha1 >= 0, "flow.fb_alpha1", ">= 0", f.fb_alpha1)
    _check(f.fb_alpha2 >= 0, "flow.fb_alpha2", ">= 0", f.fb_alpha2)
    if f.method == "raft":
        _check(bool(f.raft_weights), "flow.raft_weights", "a local RAFT weights file when flow.method=raft",
               f.raft_weights)
        _check(Path(f.raft_weights).expanduser().is_file(), "flow.raft_weights", "an existing file",
               f.raft_weights)
        if importlib.util.find_spec("torchvision") is None:
            raise ConfigError("flow.method=raft needs torchvision, which is not installed here "
                              "(pip install torchvision, or use flow.method=dis)")

    i = cfg.input
    _check(i.start >= 0, "input.start", ">= 0", i.start)
    if i.end is not None:
        _check(i.end > i.start, "input.end", f"null or > input.start ({i.start})", i.end)
    _check(i.stride >= 1, "input.stride", ">= 1", i.stride)
    if i.max_frames is not None:
        _check(i.max_frames >= 1, "input.max_frames", "null or >= 1", i.max_frames)
    if i.resize is not None:  # x16 already makes a 64-pixel clip 4096 wide before the model's own scale
        _check(0 < i.resize <= 16, "input.resize", "null or in (0, 16]", i.resize)

    r = cfg.runtime
    _check(0 <= r.threads <= 1024, "runtime.threads", "in [0, 1024] (0 = torch default)", r.threads)
    _check(r.window >= 2, "runtime.window", ">= 2", r.window)
    _check(r.one_pass_max >= 1, "runtime.one_pass_max", ">= 1", r.one_pass_max)
    _check(r.files_above >= 0, "runtime.files_above", ">= 0", r.files_above)
    _check(0 <= r.overlap < r.window, "runtime.overlap", f"in [0, runtime.window) (window is {r.window})", r.overlap)
    _check(0 <= r.anchor_weight <= 1, "runtime.anchor_weight", "in [0, 1]", r.anchor_weight)
    _check(r.checkpoint_every >= 1, "runtime.checkpoint_every", ">= 1", r.checkpoint_every)

    o = cfg.output
    _check(0 <= o.crf <= 51, "output.crf", "in [0, 51]", o.crf)
    if o.fps is not None:  # H.264 timestamps: a rate beyond this range does not survive the container
        _check(0.01 <= o.fps <= 1000, "output.fps", "null or in [0.01, 1000]", o.fps)
    for key in ("frames_dir", "side_by_side"):
        value = o[key]
        if value is not None:
            _check(bool(value.strip()), f"output.{key}", "null or a path", value)


# ----------------------------------------------------------------------------- config -> library objects


def sampling_options(cfg: DictConfig) -> SamplingOptions:
    from .options import SamplingOptions  # torch-free: validate() checks a config without the pipeline

    s, sc = cfg.sampling, cfg.schedule
    return SamplingOptions(
        num_inference_steps=s.num_inference_steps, strength=s.strength, seed=s.seed, noise=s.noise,
        eta=cfg.scheduler.eta, prompt=s.prompt, negative_prompt=s.negative_prompt,
        guidance_scale=s.guidance_scale, noise_level=s.noise_level, direction=sc.direction, start=sc.start,
        passes=sc.passes, chain_length=sc.chain_length or None, batch_size=s.batch_size,
        decode_batch_size=s.decode_batch_size, offload_state=cfg.runtime.offload_state,
        back_projection=s.back_projection)


def flow_config(cfg: DictConfig) -> FlowConfig:
    from .flow import FlowConfig

    return FlowConfig(**to_dict(cfg.flow))


def pipeline_kwargs(cfg: DictConfig) -> dict:
    """Keyword arguments of ``VideoPipeline.from_pretrained`` besides path, device and dtype."""
    m = cfg.model
    return dict(scheduler_kind=cfg.scheduler.kind, unet=m.unet_subfolder, vae=m.vae_subfolder,
                scheduler=m.scheduler_subfolder, text_encoder=m.text_encoder_subfolder,
                tokenizer=m.tokenizer_subfolder, controlnet=m.controlnet_subfolder,
                use_controlnet=cfg.alignment.mode == "tcm", variant=m.variant)


def build_alignment(cfg: DictConfig, pipe: VideoPipeline) -> Alignment:
    """The alignment named by ``cfg.alignment.mode`` for ``pipe``; raises ConfigError when the model
    cannot do it (tcm without a ControlNet)."""
    from . import align

    a = cfg.alignment
    if a.mode == "none":
        return align.Alignment()
    if a.mode == "fusion" and a.space == "decoded":
        if pipe.vae is None:
            raise ConfigError(f"alignment.space=decoded fuses decoded x0 estimates and needs a latent model (a VAE); "
                              f"{cfg.model.path} has none (use frame or sample)")
        return align.DecodedFusion(a.weight, a.weight_schedule, pipe.scheduler.config.num_train_timesteps)
    if a.mode == "fusion":
        return align.Fusion(a.weight, a.weight_schedule, pipe.scheduler.config.num_train_timesteps, a.space)
    if pipe.controlnet is None or pipe.vae is None:
        raise ConfigError(f"alignment.mode=tcm needs a model with a {cfg.model.controlnet_subfolder}/ folder "
                          f"(model.controlnet_subfolder) and a VAE; {cfg.model.path} has "
                          f"{'no controlnet' if pipe.controlnet is None else 'no VAE'}")
    from .tcm import TCMAlignment

    T = pipe.scheduler.config.num_train_timesteps
    fusion = None
    if a.tcm_fusion:  # the same fusion as mode fusion, in the space asked for
        fusion = align.DecodedFusion(a.weight, a.weight_schedule, T) if a.space == "decoded" else \
            align.Fusion(a.weight, a.weight_schedule, T, a.space)
    return TCMAlignment(scale=a.tcm_scale, masked=a.tcm_masked, fusion=fusion, warp_mode=a.tcm_warp,
                        start=a.tcm_start, end=a.tcm_end, decoder=a.tcm_decoder)


# ----------------------------------------------------------------------------- settings without effect

SHIPPED_CONFIGS = ROOT / "configs"
SHIPPED_NAMES = ("default.yaml", "independent.yaml", "latent-tcm.yaml", "stablevsr.yaml")  # a user's own file
# placed beside them is the user's


def _flat_keys(tree, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return {prefix} if prefix else set()
    return set().union(*(_flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
                         for k, v in tree.items())) if tree else set()


def asked_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys a user chose: every override, and the keys of each YAML file in the ``base:`` chain
    that is not one of this repository's configs/ (a shipped config's keys are the project's, tuned for its
    own mode). Call after :func:`load_config` accepted the same arguments."""
    keys: set[str] = set()
    seen = set()
    while path is not None and Path(path).resolve() not in seen:
        path = Path(path)
        seen.add(path.resolve())
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        base = data.pop(BASE_KEY, None)
        if path.resolve().parent != SHIPPED_CONFIGS or path.name not in SHIPPED_NAMES:
            keys |= _flat_keys(data)
        path = path.parent / base if isinstance(base, str) else None
    for item in overrides:
        keys |= _flat_keys(OmegaConf.to_container(OmegaConf.from_dotlist([item])))
    return keys


def check_model_settings(cfg: DictConfig, pipe: VideoPipeline) -> None:
    """Settings that contradict the loaded model: ConfigError (exit 2), like guidance without a text encoder."""
    s, m = cfg.sampling, cfg.model
    if pipe.text_encoder is None and (s.prompt or s.negative_prompt):
        raise ConfigError(f"sampling.prompt / negative_prompt need a text-conditioned model; {m.path} has no text "
                          "encoder (leave them empty)")
    if m.convention != "auto" and pipe.kind != "upscale":
        raise ConfigError(f"model.convention={m.convention} applies to latent upscalers; {m.path} is a {pipe.kind} "
                          "model (use model.convention=auto)")


def inert_settings(cfg: DictConfig, pipe: VideoPipeline, *, one_pass: str | None = None, by_window: bool = False,
                   no_files: str | None = None, workdir: bool = True) -> list[tuple[str, str, str]]:
    """``(section, name, why)`` of each setting that has no effect with this model and mode: the schema's
    default in its place would give the same frames. ``one_pass``: why the clip runs in one pass, where it does;
    ``by_window``: that one pass is the window's doing (windows were chosen and one holds the clip), so a
    smaller window would change it; ``no_files``: why no value of ``runtime.files_above`` would keep the samples
    in files (the clip runs in windows, or its one-pass state cannot live in files), where that holds;
    ``workdir``: whether the run checkpoints to a work folder."""
    import inspect

    a, sc, s, f = cfg.alignment, cfg.schedule, cfg.sampling, cfg.flow
    rules = []
    if a.mode != "tcm":
        rules.append((("tcm_scale", "tcm_masked", "tcm_fusion", "tcm_warp", "tcm_decoder", "tcm_start", "tcm_end"),
                      "alignment", f"alignment.mode is {a.mode}, not tcm"))
    if a.mode == "none":
        rules.append((("weight", "weight_schedule", "space"), "alignment", "alignment.mode is none"))
        rules.append((("direction", "start", "passes", "chain_length"), "schedule",
                      "alignment.mode is none: every frame is sampled on its own"))
    else:
        if a.mode == "tcm" and not a.tcm_fusion:
            rules.append((("weight", "weight_schedule", "space"), "alignment",
                          "the TCM fuses no estimates without alignment.tcm_fusion=true"))
        elif pipe.vae is not None and a.space == "sample":
            rules.append((("space",), "alignment", "a latent model fuses its latents under frame and sample alike"))
        if sc.direction != "bidirectional":
            rules.append((("passes", "start"), "schedule", f"schedule.direction is {sc.direction}"))
    if "eta" not in inspect.signature(pipe.scheduler.step).parameters:
        rules.append((("eta",), "scheduler", f"{type(pipe.scheduler).__name__} takes none (scheduler.kind=ddim does)"))
    if pipe.kind != "upscale" or pipe.upscale_convention() != "sd_upscaler":
        rules.append((("noise_level",), "sampling", "only the sd_upscaler convention noises the low-res frame"))
    if s.guidance_scale <= 1:
        rules.append((("negative_prompt",), "sampling", "sampling.guidance_scale <= 1 runs no negative branch"))
    if f.method != "dis":
        rules.append((("dis_preset",), "flow", f"flow.method is {f.method}"))
    if f.method != "raft":
        rules.append((("raft_weights",), "flow", f"flow.method is {f.method}"))
    if pipe.vae is None:
        rules.append((("vae_tiling", "vae_slicing"), "model", "the model has no VAE"))
    if one_pass:
        if not by_window:
            names = ("overlap", "anchor_weight", "window")
        else:  # the window has an effect; under auto one_pass_max none: by it or by the window, one pass
            names = ("overlap", "anchor_weight") + (("one_pass_max",) if cfg.runtime.mode == "auto" else ())
        rules.append((names, "runtime", one_pass))
    if cfg.runtime.mode != "auto":
        rules.append((("one_pass_max",), "runtime",
                      f"runtime.mode is {cfg.runtime.mode}; only auto chooses one pass or windows by it"))
    if no_files:
        rules.append((("files_above",), "runtime", no_files))
    if not workdir:
        rules.append((("checkpoint_every",), "runtime", "without --workdir nothing is checkpointed"))
    return [(section, name, why) for names, section, why in rules for name in names]


def ineffective_settings(cfg: DictConfig, pipe: VideoPipeline, asked: set[str], *, one_pass: str | None = None,
                         by_window: bool = False, no_files: str | None = None, workdir: bool = True) -> list[str]:
    """One line for each setting in ``asked`` (see :func:`asked_keys`) whose value differs from the schema's
    default but has no effect with this model and mode (:func:`inert_settings`), saying why (for a warning)."""
    s = cfg.sampling
    default = OmegaConf.structured(JobConfig)
    lines = []
    for section, name, why in inert_settings(cfg, pipe, one_pass=one_pass, by_window=by_window, no_files=no_files,
                                             workdir=workdir):
        key, value = f"{section}.{name}", cfg[section][name]
        if key in asked and value != default[section][name]:
            lines.append(f"config: {key}={value} has no effect: {why}")
    if "sampling.guidance_scale" in asked and s.guidance_scale > 1 and s.prompt == s.negative_prompt:
        lines.append(f"config: sampling.guidance_scale={s.guidance_scale} with the prompt equal to the negative "
                     "prompt gives the unguided result at twice the model calls")
    return lines
