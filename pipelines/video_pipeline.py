"""Video pipeline: wires a diffusers model, a scheduler, optical flow and an alignment into the sampler.

Four kinds of model are recognised from their components:

* ``residual_sr`` - a pixel-space ``UNet2DModel`` super-resolution model (this project's shipped
  model): the UNet sees ``[x_t, bicubic]`` and x0 is the residual ``(HR - bicubic) / residual_scale``;
* ``upscale``     - a latent upscaler (SD x4 upscaler, StableVSR): the VAE latent has the low-res
  size and the UNet sees ``[x_t, low-res frame in [-1, 1]]``. Two conventions (``convention``):
  ``sd_upscaler`` noises the low-res frame and passes the noise level as class label (diffusers'
  StableDiffusionUpscalePipeline); ``stablevsr`` passes the clean frame and no class label to the
  UNet or the ControlNet (StableVSR's pipeline and training script). ``auto`` picks ``stablevsr``
  for a model with a ControlNet or without a class embedding, ``sd_upscaler`` otherwise;
* ``img2img``     - a latent model (VAE + UNet) starting from the encoded input frames;
* ``pixel``       - a pixel-space UNet starting from the input frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import diffusers
import torch

from .align import Alignment, decode_latents
from .degradation import bicubic_resize
from .denoiser import Denoiser
from .flow import ClipFlows, FlowConfig, compute_clip_flows, compute_clip_flows_chunked
from .loading import read_vsr_config  # noqa: F401  (re-exported for the benchmarks)
from .options import SamplingOptions  # defined there: the config checks its ranges without torch
from .sampler import StepCallback, img2img_timesteps, initial_noise, sample_frames
from .sweep import step_directions
from .timing import NullTimer, StageTimer

ModelKind = Literal["residual_sr", "upscale", "img2img", "pixel"]
Convention = Literal["auto", "stablevsr", "sd_upscaler"]


# diffusers' StableDiffusionUpscalePipeline refuses noise_level above its config's max_noise_level, 350 unless
# the model's model_index.json registers another (the published SD x4 upscaler registers 350)
DEFAULT_MAX_NOISE_LEVEL = 350

AUTO_BATCH_PIXELS = 1 << 16  # on the CPU, an "auto" batch holds at most this many pixels (64x64 x 16)


def auto_batch(device, pixels: int, accelerator: int = 8) -> int:
    """Frames per call for batch size 0 ("auto"): ``accelerator`` on a GPU; on the CPU as many frames
    of ``pixels`` as fit ``AUTO_BATCH_PIXELS``, between 1 and 16.

    Measured on a 2-core x86 CPU (``benchmarks/speed.py --sections batches``; README, "Batched model
    calls in the exact sweep"): batching 8 frames of 64x64 latents runs the
    latent UNet 1.6x faster per frame than one at a time, but batching 8 frames of 256x256 runs the
    pixel UNet and the VAE decoder 1.6x and 1.7x *slower* per frame (their activations leave the caches).
    """
    if torch.device(device).type != "cpu":
        return accelerator
    return max(1, min(16, AUTO_BATCH_PIXELS // max(int(pixels), 1)))


@dataclass
class Result:
    frames: torch.Tensor  # (F, 3, H, W) in [-1, 1]
    flows: ClipFlows | None
    timings: dict[str, float] = field(default_factory=dict)
    samples: torch.Tensor | None = None  # final samples of the last ``keep_last`` frames (window anchors)
    state: object = None  # with state_dir: the final samples (a FileTensor), for decoding chunk by chunk


class VideoPipeline:
    def __init__(self, unet, scheduler, *, vae=None, text_encoder=None, tokenizer=None, controlnet=None,
                 low_res_scheduler=None, scale: int = 1, residual_scale: float | None = None,
                 convention: Convention = "auto", preview=None, max_noise_level: int | None = None):
        self.unet, self.scheduler, self.vae = unet, scheduler, vae
        self.max_noise_level = max_noise_level  # the model_index.json's; None: DEFAULT_MAX_NOISE_LEVEL
        self.preview = preview  # optional tiny decoder (AutoencoderTiny) for the TCM condition only
        self.text_encoder, self.tokenizer, self.controlnet = text_encoder, tokenizer, controlnet
        self.low_res_scheduler, self.scale, self.residual_scale = low_res_scheduler, scale, residual_scale
        if convention not in ("auto", "stablevsr", "sd_upscaler"):
            raise ValueError(f"convention must be auto, stablevsr or sd_upscaler, not {convention!r}")
        self.convention = convention
        self.kind = self._kind()

    # ------------------------------------------------------------------ construction
    def _kind(self) -> ModelKind:
        cin, cout = self.unet.config.in_channels, self.unet.config.out_channels
        cfg = self.unet.config
        if cfg.get("addition_embed_type"):
            raise ValueError(f"the UNet needs added conditioning (addition_embed_type={cfg.addition_embed_type}, "
                             "SDXL-style), which this pipeline does not supply")
        if cfg.get("time_cond_proj_dim"):
            raise ValueError("the UNet is guidance-distilled (time_cond_proj_dim: LCM-style) and needs a guidance "
                             "embedding, which this pipeline does not supply")
        if self.vae is None:
            if self.residual_scale is not None:
                if cin != cout + 3:
                    raise ValueError(f"the residual SR UNet has {cin} input channels; expected {cout + 3} "
                                     f"(its {cout} output channels + the upscaled RGB frame)")
                return "residual_sr"
            if not cin == cout == 3:
                raise ValueError(f"the UNet has {cin} input and {cout} output channels, so it is not a pixel-space "
                                 "(RGB) model; a latent model needs its VAE")
            return "pixel"
        lat = self.vae.config.latent_channels
        if cout != lat:
            raise ValueError(f"the UNet predicts {cout} channels for {lat} latent channels (a learned variance?), "
                             "which this pipeline does not use")
        if cin == lat + 3:
            return "upscale"
        if cin == lat:
            if getattr(self.unet, "class_embedding", None) is not None:
                raise ValueError("the img2img UNet has a class embedding, whose labels this pipeline does not supply")
            return "img2img"
        raise ValueError(f"UNet has {cin} input channels; expected {lat} (img2img) or {lat + 3} (upscaler)")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device="cpu", dtype=torch.float32, **subfolders):
        """Load from a hub id or a local folder in diffusers layout (unet/, scheduler/, optional vae/,
        text_encoder/, tokenizer/, controlnet/, low_res_scheduler/ and this project's vsr_config.json).
        ``dtype``: a torch dtype or its name (float32, float16, bfloat16)."""
        from . import loading

        if isinstance(dtype, str):
            names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
            if dtype not in names:
                raise ValueError(f"dtype must be a torch dtype or one of {', '.join(names)}, not {dtype!r}")
            dtype = names[dtype]

        return loading.load_pipeline(cls, path, device=device, dtype=dtype, **subfolders)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, L, D) text embeddings, computed once per run."""
        tok = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    def input_multiple(self) -> int:
        """Input sides must be multiples of this (the CLI pads and crops back). A ``UNet2DConditionModel``
        takes any size (it upsamples to each skip's size), so an upscaler with one needs no padding, as in
        diffusers' pipelines and the original StableVSR; a ``UNet2DModel`` needs multiples of its downsampling."""
        if isinstance(self.unet, diffusers.UNet2DConditionModel):
            return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.kind == "img2img" else 1
        return self.min_input_side()

    def min_input_side(self) -> int:
        """Shorter sides are padded up to this: the UNet's whole downsampling (its deepest level then has at
        least one pixel a side; a 2x2 input reached a GroupNorm with one value per group and failed)."""
        from math import gcd

        unet = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.kind == "upscale":
            return unet  # the latent has the low-res frame's size
        if self.kind == "img2img":
            return unet * 2 ** (len(self.vae.config.block_out_channels) - 1)
        return unet // gcd(unet, self.scale)

    def file_state_problem(self, chain_length: int | None, num_frames: int) -> str | None:
        """Why the one-pass state of ``num_frames`` frames cannot live in files (``state_dir``); None: it can."""
        from .sampler import STATELESS

        if not isinstance(self.scheduler, STATELESS) or (chain_length or num_frames) < num_frames:
            return ("file-backed one-pass state needs a DDPM or DDIM scheduler and the exact sweep "
                    f"(schedule.chain_length 0), not {type(self.scheduler).__name__} with chain length {chain_length}")
        if self.kind == "upscale" and self.upscale_convention() == "sd_upscaler":
            return "file-backed one-pass state does not support the sd_upscaler convention"
        return None

    def upscale_convention(self) -> str:
        """``stablevsr`` or ``sd_upscaler``: how an upscaler is conditioned (see the module docstring)."""
        if self.convention != "auto":
            return self.convention
        has_labels = getattr(self.unet, "class_embedding", None) is not None
        return "stablevsr" if self.controlnet is not None or not has_labels else "sd_upscaler"

    def noise_level_range(self) -> tuple[int, str]:
        """(highest noise_level, why) for the sd_upscaler convention: the low-res schedule, the UNet's class
        embedding and the model's ``max_noise_level`` (diffusers' StableDiffusionUpscalePipeline bound) all
        bound it; ``why`` names the tightest one."""
        labels = getattr(self.unet, "class_embedding", None)
        top = min(self.low_res_scheduler.config.num_train_timesteps, getattr(labels, "num_embeddings", 10 ** 9)) - 1
        if self.max_noise_level is not None:
            cap, why = self.max_noise_level, f"max_noise_level={self.max_noise_level} in its model_index.json"
        else:
            cap, why = DEFAULT_MAX_NOISE_LEVEL, (f"max_noise_level={DEFAULT_MAX_NOISE_LEVEL}: diffusers' "
                                                 "StableDiffusionUpscalePipeline default, as no model_index.json sets one")
        return (cap, why) if cap <= top else (top, "the low-res noise schedule")

    def sample_offset(self, frames: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Residual models: ``base / s`` for frames ``idx`` of the input ``frames``, so that
        ``x0 + offset`` is the clean frame in sample units (the bicubic upscale is recomputed)."""
        base = self.conditioning_frames(frames[idx.cpu()].to(self.device))
        return base / self.residual_scale

    def unet_latent_size(self, frames: torch.Tensor) -> tuple[int, int]:
        """(h, w) of an img2img model's latent for input ``frames`` (the VAE's downsampling factor)."""
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return frames.shape[-2] // f, frames.shape[-1] // f

    def output_size(self, frames: torch.Tensor) -> tuple[int, int]:
        h, w = frames.shape[-2:]
        return h * self.scale, w * self.scale

    def pixels(self, frames: torch.Tensor, output: bool = True) -> int:
        """Pixels per frame of the input ``frames`` (or, with ``output``, of the output)."""
        h, w = self.output_size(frames) if output else frames.shape[-2:]
        return int(h) * int(w)

    # measured: AutoencoderKL.decode's peak above its input, per output pixel and channel of its full-resolution
    # layers, float32 (the shipped VAE, 32 channels: 0.77-0.93 GB per output megapixel at 0.9 and 3.7 Mpx, this CPU;
    # the allocator's state moves it)
    DECODE_TENSORS_PER_PIXEL = 7.5

    def decode_memory(self, out_pixels: int, batch: int = 1) -> int | None:
        """Estimated peak bytes of one VAE decoder call on ``batch`` frames of ``out_pixels`` each: its
        full-resolution layers hold about ``DECODE_TENSORS_PER_PIXEL`` tensors of ``block_out_channels[0]``
        channels at once. None without a VAE, or with tiling on (tiles bound it)."""
        if self.vae is None or getattr(self.vae, "use_tiling", False):
            return None
        item = torch.finfo(self.vae.dtype).bits // 8
        return int(self.DECODE_TENSORS_PER_PIXEL * self.vae.config.block_out_channels[0] * item * out_pixels * batch)

    def conditioning_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """The frames at output resolution (bicubic upscale for SR models): flow is computed on these."""
        return frames if self.scale == 1 else bicubic_resize(frames, self.output_size(frames)).clamp(-1, 1)

    def _vae_encode(self, frames: torch.Tensor, gens, batch: int, upscale: bool = False) -> torch.Tensor:
        """Input frames -> scaled VAE latents (the bicubic upscale is made per chunk for upscalers)."""
        sf = self.vae.config.scaling_factor
        out = []
        batch = batch or auto_batch(self.device, self.pixels(frames, upscale))
        for lo in range(0, len(frames), batch):
            chunk = frames[lo:lo + batch]
            chunk = (self.conditioning_frames(chunk) if upscale else chunk).to(self.device, self.vae.dtype)
            dist = self.vae.encode(chunk).latent_dist
            # one draw per frame from its own generator, like diffusers' retrieve_latents
            out.append(torch.cat([dist.mean[k:k + 1] + dist.std[k:k + 1] * torch.randn(
                dist.mean[k:k + 1].shape, generator=gens[lo + k]).to(self.device, dist.mean.dtype)
                for k in range(len(chunk))]))
        return torch.cat(out) * sf

    def _decode_chunk(self, xi: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Samples (k, C, h, w) of input ``frames`` (k, 3, h', w') -> float RGB (k, 3, H, W) on the device."""
        xi = xi.to(self.device)
        if self.kind in ("upscale", "img2img"):
            img = decode_latents(self.vae, xi).float()
        elif self.kind == "residual_sr":
            img = self.conditioning_frames(frames).to(xi.device) + self.residual_scale * xi.float()
        else:
            img = xi.float()
        return img.clamp(-1, 1)

    @staticmethod
    def _finish(img: torch.Tensor, as_uint8: bool) -> torch.Tensor:
        img = img.cpu()
        return ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1) if as_uint8 else img

    @torch.no_grad()
    def decode(self, x: torch.Tensor, frames: torch.Tensor, batch: int, as_uint8: bool = False) -> torch.Tensor:
        """Samples (F, C, h, w) -> RGB frames (F, 3, H, W) in [-1, 1] (or (F, H, W, 3) uint8), in chunks.

        ``frames`` are the input frames; residual models add their bicubic upscale back per chunk.
        ``batch``: frames per decoder call (0: :func:`auto_batch` for the output size).
        """
        return torch.cat([img for _, img in self.iter_output(x, frames, batch, as_uint8=as_uint8)])

    @torch.no_grad()
    def iter_output(self, x, frames, batch: int = 0, *, chunk: int = 0, back_projection: bool = False,
                    flows: ClipFlows | None = None, as_uint8: bool = False, timer=None):
        """Decode samples ``x`` of input ``frames`` and yield ``(first frame, RGB frames)`` in order, ``chunk``
        frames at a time (0: one decoder batch), ``batch`` frames per decoder call (0: auto); ``x`` and
        ``frames`` may be FileTensors.

        ``back_projection`` (super-resolution models): each output is made to agree with its input
        (:mod:`pipelines.backproject`), its correction averaged along ``flows`` when given.
        """
        timer = timer or NullTimer()
        batch = batch or auto_batch(self.device, self.pixels(frames, True))
        chunk = chunk or batch
        stage = "vae" if self.vae is not None else "decode"

        def decoded():
            for lo in range(0, len(x), chunk):
                fi, parts = frames[lo:lo + chunk], []
                for a in range(0, len(fi), batch):
                    with timer(stage):
                        parts.append(self._decode_chunk(x[lo + a:lo + min(a + batch, len(fi))], fi[a:a + batch]))
                img = torch.cat(parts)
                yield lo, img, fi.to(img.device)

        if not back_projection or self.scale == 1:
            for lo, img, _ in decoded():
                yield lo, self._finish(img, as_uint8)
            return
        from .backproject import back_project

        chunks = back_project(decoded(), self.scale, flows)
        while True:
            with timer("backproject"):
                item = next(chunks, None)
            if item is None:
                return
            yield item[0], self._finish(item[1], as_uint8)

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, *, options: SamplingOptions | None = None,
                 alignment: Alignment | None = None, flow: FlowConfig | None = None,
                 flows: ClipFlows | None = None, callback: StepCallback | None = None,
                 progress: Callable[[int], None] | None = None, timer: StageTimer | None = None,
                 chain_log: list | None = None, checkpoint=None, output_uint8: bool = False,
                 keep_last: int = 0, state_dir=None) -> Result:
        """Sample a clip. ``frames``: (F, 3, h, w) input frames in [-1, 1] (low-res for SR models).

        Memory: besides the small input frames, only the samples (one latent per frame, on the host
        when ``options.offload_state``), the flows at ``flow.scale`` of the output size and, for
        chains, one x0 per frame are held for the whole clip; conditioning frames are recomputed
        per batch. ``output_uint8`` returns (F, H, W, 3) uint8 frames instead of floats;
        ``keep_last`` also returns the final samples of the last frames (anchors for the next window).

        ``state_dir``: keep the samples and the flows in files there instead of memory (one pass over a
        long clip with flat memory; DDPM/DDIM, exact sweep). ``frames`` may then be a
        :class:`pipelines.filestore.FileTensor`; the result has no frames but ``state`` (the final
        samples, a FileTensor) for :meth:`decode` chunk by chunk.
        """
        o = options or SamplingOptions()
        alignment = alignment or Alignment()
        timer = timer or NullTimer()
        from .filestore import FileTensor

        if not isinstance(frames, (torch.Tensor, FileTensor)) or not frames.dtype.is_floating_point:
            got = f"{type(frames).__name__} of {frames.dtype}" if hasattr(frames, "dtype") else type(frames).__name__
            raise ValueError(f"frames must be a float tensor (F, 3, H, W) in [-1, 1], got a {got} "
                             "(pipelines.video_io.to_tensor converts uint8 (F, H, W, 3) frames)")
        dev, F = self.device, frames.shape[0]
        if len(frames.shape) != 4 or frames.shape[1] != 3 or F < 1:
            raise ValueError(f"frames must be (F, 3, H, W) with F >= 1, got {tuple(frames.shape)}")
        m, least = self.input_multiple(), self.min_input_side()
        if (frames.shape[-2] % m or frames.shape[-1] % m) and isinstance(self.unet, diffusers.UNet2DModel) \
                or min(frames.shape[-2:]) < least:
            # UNet2DModel cannot take such sides (UNet2DConditionModel upsamples to the skip's size itself, but
            # its deepest level needs more than one value per normalisation group)
            raise ValueError(f"this model takes frames whose sides are multiples of {m} and at least {least}, got "
                             f"{frames.shape[-2]}x{frames.shape[-1]} (pad with pipelines.video_io.pad_to_multiple("
                             f"frames, {m}, {least}) and crop the output back, as the job does)")
        if not 0 <= keep_last <= F:
            raise ValueError(f"keep_last must be in [0, {F}] (the frames given), got {keep_last}")
        if state_dir is not None and (problem := self.file_state_problem(o.chain_length, F)):
            raise ValueError(problem)
        state_dev = torch.device("cpu") if o.offload_state else dev
        gens = [torch.Generator().manual_seed(o.seed + o.frame_offset + f) for f in range(F)]
        # timesteps stay on the host: the schedule maths per frame then never waits for the accelerator
        timesteps = img2img_timesteps(self.scheduler, o.num_inference_steps, o.strength)
        out_size = self.output_size(frames)

        needs_flow = alignment.uses_neighbours and F > 1
        if needs_flow and flows is None:
            cfg = flow or FlowConfig()
            with timer("flow"):
                work = (max(1, round(out_size[0] * cfg.scale)), max(1, round(out_size[1] * cfg.scale)))
                if state_dir is None:
                    flows = compute_clip_flows(self.conditioning_frames(frames), cfg, size=work, device=state_dev,
                                               compute_device=dev)
                else:  # chunk by chunk into files: never the whole clip at full resolution
                    flows = compute_clip_flows_chunked(lambda a, b: self.conditioning_frames(frames[a:b]), F, cfg,
                                                       work, Path(state_dir) / "flows", compute_device=dev)

        concat, class_labels = None, None
        if self.kind == "residual_sr":
            # recomputed per batch, on the compute device (idx: host frame indices)
            concat = lambda idx: self.conditioning_frames(frames[idx].to(dev))  # noqa: E731
            shape = (F, self.unet.config.out_channels, *out_size)
        elif self.kind == "upscale":
            if self.upscale_convention() == "sd_upscaler":  # noised low-res frame, noise level as class label
                top, why = self.noise_level_range()
                if o.noise_level > top:
                    raise ValueError(f"noise_level {o.noise_level} must be in [0, {top}] ({why})")
                lr = frames[:].to(dev, self.unet.dtype)
                noise = torch.cat([torch.randn((1, *lr.shape[1:]), generator=g).to(dev, lr.dtype) for g in gens])
                level = torch.tensor([o.noise_level], dtype=torch.long, device=dev)
                concat = self.low_res_scheduler.add_noise(lr, noise, level)
                class_labels = level if getattr(self.unet, "class_embedding", None) is not None else None
            else:  # StableVSR: the clean low-res frame (in [-1, 1]), no class labels for the UNet or the ControlNet
                if getattr(self.unet, "class_embedding", None) is not None:
                    raise ValueError("the StableVSR convention passes no class labels, but this UNet has a class "
                                     "embedding that needs them; use model.convention=sd_upscaler")
                concat = lambda idx: frames[idx].to(dev, self.unet.dtype)  # noqa: E731  (idx on the host)
            shape = (F, self.vae.config.latent_channels, *frames.shape[-2:])
        elif self.kind == "img2img":
            shape = (F, self.vae.config.latent_channels, *(self.unet_latent_size(frames)))
        else:
            shape = tuple(frames.shape)
        # one draw for the whole clip, from the seed of its first frame (not of this window's)
        shared = None if o.noise != "shared" else initial_noise(
            shape, [torch.Generator().manual_seed(o.seed)], state_dev, torch.float32, "shared")[:1]

        def start(a: int, b: int) -> torch.Tensor:
            """The starting samples of frames [a, b): pure noise at strength 1 (text-to-image), else the
            frame's clean sample (encoded for latent models) noised to the first timestep (img2img)."""
            init = None
            if o.strength < 1.0:
                if self.kind == "residual_sr":
                    init = torch.zeros((1, *shape[1:]), device=state_dev)  # the residual of the bicubic frame
                elif self.kind in ("upscale", "img2img"):
                    with timer("vae"):
                        init = self._vae_encode(frames[a:b], gens[a:b], o.decode_batch_size,
                                                upscale=self.kind == "upscale").to(state_dev)
                else:
                    init = frames[a:b].to(state_dev)
            noise = (shared.expand(b - a, *shape[1:]).clone() if shared is not None
                     else initial_noise((b - a, *shape[1:]), gens[a:b], state_dev, torch.float32))
            if init is None:
                return (noise * self.scheduler.init_noise_sigma).to(self.unet.dtype)
            return self.scheduler.add_noise(init.float(), noise, timesteps[:1].repeat(b - a).to(state_dev)
                                            ).to(self.unet.dtype)

        prompt = negative = None
        if self.text_encoder is not None:
            prompt = self.encode_prompt(o.prompt)
            negative = self.encode_prompt(o.negative_prompt) if o.guidance_scale > 1 else None
        denoiser = Denoiser(self.unet, self.scheduler, prompt_embeds=prompt, negative_embeds=negative,
                            guidance_scale=o.guidance_scale, class_labels=class_labels, controlnet=self.controlnet)

        batch = o.batch_size or auto_batch(dev, shape[-2] * shape[-1])  # the model's input size
        if state_dir is None:
            latents = start(0, F)
        else:  # long one-pass clips: the samples live in two files in state_dir (see pipelines.filestore)
            from .filestore import SteppedState

            resume = checkpoint is not None and checkpoint.has_state()
            try:
                latents = SteppedState(state_dir, shape, self.unet.dtype, resume=resume)
            except ValueError as e:  # truncated or deleted: resuming would start from zeros
                if not resume:
                    raise
                from .checkpoint import WorkdirMismatch

                raise WorkdirMismatch(f"work folder {checkpoint.dir}: {e}; delete the folder to start over") from e
            if not resume:
                for a in range(0, F, batch):
                    latents.init(torch.arange(a, min(F, a + batch)), start(a, min(F, a + batch)))
        if hasattr(alignment, "bind"):
            alignment.bind(self, flows=flows, size=out_size, timer=timer, frames=frames,
                           decode_batch=o.decode_batch_size or auto_batch(dev, out_size[0] * out_size[1]))

        x = sample_frames(
            denoiser, self.scheduler, latents, timesteps, generators=gens, concat=concat, alignment=alignment,
            flows=flows, directions=step_directions(len(timesteps), o.direction, o.passes, o.start),
            chain_length=o.chain_length, batch_size=batch, eta=o.eta, callback=callback,
            progress=progress, timer=timer, chain_log=chain_log, checkpoint=checkpoint, device=dev)
        if state_dir is not None:  # the caller decodes chunk by chunk: pipe.iter_output(state, frames, chunk=...)
            return Result(None, flows, timer.report(), None, state=x.final())
        out = torch.cat([img for _, img in self.iter_output(x, frames, o.decode_batch_size, flows=flows, timer=timer,
                                                            back_projection=o.back_projection, as_uint8=output_uint8)])
        samples = x[len(x) - keep_last:].float().cpu().clone() if keep_last else None
        return Result(out, flows, timer.report(), samples)
