"""Load diffusers components from a hub id or a local folder (diffusers layout) with ``from_pretrained``.

diffusers is imported by the functions that load (its first import takes seconds: torch._dynamo comes with
it), so that the job can check a model path (:func:`_is_local`) without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER_KINDS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


class ModelLoadError(ValueError):
    """The model path or one of its components is missing or unreadable."""


def _is_local(path: str) -> bool:
    """What is on disk, looks like a path, or is not "owner/name" is local; so is "owner/name" whose owner
    is a local folder ("weights/nope" is a missing local model, not a hub repository to retry for a minute)."""
    return (Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
            or Path(path.split("/")[0]).is_dir())


def _has(path: str, sub: str | None, local: bool) -> bool:
    if not sub:
        return False
    if local:
        return (Path(path) / sub).is_dir()
    index = _hub_json(path, "model_index.json")
    return sub in index if index else sub in ("unet", "scheduler")


def _hub_json(repo: str, name: str) -> dict:
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo, name)).read_text())
    except Exception:
        return {}


def _variants_only(folder: Path) -> list[str]:
    """Weight variants (``fp16`` of ``diffusion_pytorch_model.fp16.safetensors``) in ``folder`` when it holds
    no plain weights file; [] otherwise."""
    if not folder.is_dir():
        return []
    names = [f.name for f in folder.iterdir() if f.name.endswith((".safetensors", ".bin"))]
    parts = [n.split(".") for n in names]
    if not names or any(len(q) == 2 for q in parts):
        return []
    return sorted({q[-2].split("-")[0] for q in parts if len(q) == 3})  # shards: <name>.fp16-00001-of-00002.<ext>


def _from_pretrained(load, path: str, sub: str, variant: str | None, **kw):
    """``load(path, subfolder=sub)`` with the weights ``variant`` when the component has it, else its plain
    weights (as diffusers' pipelines do: a scheduler or tokenizer has no variants, nor need every model)."""
    if not variant:
        return load(path, subfolder=sub, **kw)
    try:
        return load(path, subfolder=sub, variant=variant, **kw)
    except OSError as first:  # "no file named ..." (a folder), "does not appear to have a file named ..." (the hub)
        try:
            return load(path, subfolder=sub, **kw)
        except OSError:
            raise first from None


def _read_json(f: Path):
    """The JSON value in the model's file ``f``; ModelLoadError naming it when it cannot be read or parsed."""
    try:
        return json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{f} is not valid JSON: {e}") from e


def read_vsr_config(path: str | Path) -> dict:
    """This project's ``vsr_config.json`` (scale, residual_scale, training facts); {} when absent."""
    f = Path(path) / "vsr_config.json"
    if not f.exists():
        return {}
    meta = _read_json(f)
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{f} must hold a JSON object, not {type(meta).__name__}")
    return meta


def read_max_noise_level(path: str, local: bool) -> int | None:
    """``max_noise_level`` of the model's ``model_index.json`` (a local folder's, or a hub id's through
    :func:`_hub_json`): the highest ``noise_level`` diffusers' StableDiffusionUpscalePipeline accepts for it;
    None when the file or the key is absent (that pipeline then uses its own default, 350)."""
    if local:
        f = Path(path) / "model_index.json"
        if not f.is_file():
            return None
        index = _read_json(f)
    else:
        index = _hub_json(path, "model_index.json")
    value = index.get("max_noise_level") if isinstance(index, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"model {path}: model_index.json max_noise_level must be an integer >= 0, "
                             f"not {value!r}")
    return value


def make_scheduler(config, kind: str = "auto"):
    """Build the scheduler named by ``kind`` (auto: the checkpoint's own) from a scheduler config."""
    import diffusers

    if kind == "auto":
        name = config["_class_name"]
    elif kind in SCHEDULER_KINDS:
        name = SCHEDULER_KINDS[kind]
    else:
        raise ValueError(f"scheduler kind must be auto or one of {', '.join(SCHEDULER_KINDS)}, not {kind!r}")
    extra = {"algorithm_type": "dpmsolver++"} if kind == "dpm++" else {}  # auto keeps the checkpoint's own
    if kind != "auto" and "clip_sample" not in config:
        # another class's defaults would clip x0 to [-1, 1] (DDIM, DDPM); diffusers' pipelines turn that off
        # for a checkpoint that does not ask for it, and so does this
        extra["clip_sample"] = False
    return getattr(diffusers, name).from_config(config, **extra)


def load_pipeline(cls, path, *, device="cpu", dtype=torch.float32, scheduler_kind: str = "auto",
                  unet: str = "unet", vae: str | None = "vae", scheduler: str = "scheduler",
                  text_encoder: str | None = "text_encoder", tokenizer: str | None = "tokenizer",
                  controlnet: str | None = "controlnet", low_res_scheduler: str | None = "low_res_scheduler",
                  use_controlnet: bool = True, variant: str | None = None):
    """The pipeline ``cls`` from a diffusers-layout folder or hub id. ``variant`` picks weight files such as
    ``diffusion_pytorch_model.fp16.safetensors`` for the components that have them."""
    import diffusers

    from schedulers import check_scheduler

    path = str(Path(path).expanduser()) if _is_local(str(path)) else str(path)
    local = _is_local(path)
    if local and not Path(path).is_dir():
        raise ModelLoadError(f"model path does not exist or is not a folder: {path}")
    if local and not (Path(path) / unet).is_dir():
        raise ModelLoadError(f"model folder {path} has no {unet}/ subfolder (diffusers layout expected)")
    if local and variant and not any(f".{variant}." in f.name or f".{variant}-" in f.name
                                     for f in Path(path).glob("*/*") if f.suffix in (".safetensors", ".bin")):
        raise ModelLoadError(f"model.variant={variant}: no component of {path} has {variant} weights "
                             f"(files named *.{variant}.safetensors); leave model.variant out for the plain ones")
    try:
        unet_model = _from_pretrained(diffusers.AutoModel.from_pretrained, path, unet, variant, torch_dtype=dtype)
        sched_cfg = diffusers.DDPMScheduler.load_config(path, subfolder=scheduler)
        sched = make_scheduler(sched_cfg, scheduler_kind)
        try:
            check_scheduler(sched)
        except ValueError as e:  # (another DDPM keeps the checkpoint's variance type)
            kinds = "ddim, dpm++ or euler" if "variance_type" in str(e) else "ddim, ddpm, dpm++ or euler"
            raise ModelLoadError(f"model {path}: {e}; scheduler.kind={kinds} replaces the checkpoint's "
                                 "scheduler") from None
        comps = dict(vae=None, text_encoder=None, tokenizer=None, controlnet=None, low_res_scheduler=None,
                     preview=None)
        if _has(path, vae, local):
            half = dtype == torch.float16  # loaded in float32 first: it may stay there
            comps["vae"] = _from_pretrained(diffusers.AutoencoderKL.from_pretrained, path, vae, variant,
                                            torch_dtype=torch.float32 if half else dtype)
            if half and not comps["vae"].config.get("force_upcast", False):
                comps["vae"].to(dtype)
            # else as diffusers' pipelines do: a VAE whose config says it overflows in float16 (the SD x4
            # upscaler's, so StableVSR's) runs in float32; every VAE call casts to the VAE's own dtype
        if _has(path, text_encoder, local):
            from transformers import CLIPTextModel, CLIPTokenizer

            if not _has(path, tokenizer, local):
                raise ModelLoadError(f"model {path} has a {text_encoder}/ text encoder but no {tokenizer}/ "
                                     "tokenizer subfolder")

            comps["text_encoder"] = _from_pretrained(CLIPTextModel.from_pretrained, path, text_encoder, variant,
                                                      torch_dtype=dtype)
            comps["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder=tokenizer)
        if use_controlnet and _has(path, "preview_decoder", local):  # the TCM condition's tiny decoder
            comps["preview"] = _from_pretrained(diffusers.AutoencoderTiny.from_pretrained, path, "preview_decoder",
                                               variant, torch_dtype=dtype)
        if use_controlnet and _has(path, controlnet, local):
            comps["controlnet"] = _from_pretrained(diffusers.ControlNetModel.from_pretrained, path, controlnet,
                                                  variant, torch_dtype=dtype)
        if comps["vae"] is not None and comps["vae"].config.get("shift_factor") not in (None, 0, 0.0):
            raise ModelLoadError(f"model {path}: its VAE has a shift_factor (SD3/Flux-style latents), which this "
                                 "pipeline does not apply")
        if comps["vae"] is not None and unet_model.config.in_channels == comps["vae"].config.latent_channels + 3:
            # the upscaler's low-res noise schedule; StableVSR ships none and uses the default DDPM one
            comps["low_res_scheduler"] = (diffusers.DDPMScheduler.from_pretrained(path, subfolder=low_res_scheduler)
                                          if _has(path, low_res_scheduler, local) else diffusers.DDPMScheduler())
        meta = read_vsr_config(path) if local else _hub_json(path, "vsr_config.json")
    except ModelLoadError:
        raise
    except (OSError, EnvironmentError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if local else " from the Hugging Face hub (needs network access, or a local copy as model.path)"
        hint = ""
        if local and not variant:
            found = {v for sub in (unet, vae, text_encoder, controlnet, "preview_decoder") if sub
                     for v in _variants_only(Path(path) / sub)}
            if found:
                hint = f" (it holds only {'/'.join(sorted(found))} variant weights: set model.variant={min(found)})"
        raise ModelLoadError(f"cannot load model {path!r}{where}: {first}{hint}") from e
    if isinstance(unet_model, diffusers.UNet2DConditionModel) and comps["text_encoder"] is None:
        raise ModelLoadError(f"model {path}: the UNet is text-conditioned (UNet2DConditionModel) but there is no "
                             f"{text_encoder}/ text encoder subfolder")
    try:
        pipe = cls(unet_model, sched, scale=int(meta.get("scale", 1)),
                   residual_scale=meta.get("residual_scale"), **comps)
    except ValueError as e:
        vae_note = f" ({vae}/ subfolder found)" if comps["vae"] is not None else f" (no {vae}/ subfolder found)"
        raise ModelLoadError(f"model {path}: {e}{vae_note}") from e
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.controlnet, pipe.preview):
        if m is not None:  # convolution weights NHWC (only 4-D tensors change): 8-25 % faster per call here (README)
            m.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if "upscale" == pipe.kind and "scale" not in meta:
        pipe.scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if pipe.kind == "upscale":
        pipe.max_noise_level = read_max_noise_level(path, local)
    return pipe
