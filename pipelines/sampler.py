"""The frame-wise bidirectional sampling loop (StableVSR, Rota et al., ECCV 2024).

At every denoising step the frames are swept in that step's direction. Each frame is evaluated,
its approximated x0 is computed, aligned with the neighbour's x0 from *this* sweep (warped onto the
frame with the clip's precomputed optical flow), and the model output implied by the aligned x0 is
stored. A frame's scheduler step never influences another frame within the same step, so once
the sweep is done the scheduler advances all frames with one batched, unmodified ``step`` call.

State is one ``(F, C, h, w)`` tensor of samples, plus one of x0 estimates and one of model
outputs; frame order is an explicit list of indices, never a list of tensors reversed in place.
"""
from __future__ import annotations

import inspect
from typing import Callable, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers import DDIMScheduler, DDPMScheduler

from schedulers import approx_x0, check_scheduler, model_output_shift

from .align import Alignment, Neighbours
from .flow import ClipFlows
from .sweep import chain_starts, plan_sweep, step_directions
from .timing import NullTimer, StageTimer

STATELESS = (DDPMScheduler, DDIMScheduler)
StepCallback = Callable[[int, torch.Tensor, int, torch.Tensor], None]  # (step index, t, frame, x0 (C,h,w))


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float, device=None) -> torch.Tensor:
    """diffusers' img2img convention: run the last ``int(steps * strength)`` of the schedule.

    Strength 1.0 runs every step. The scheduler's begin index is set so that sigma-based
    schedulers start at the right noise level.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, not {num_inference_steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise ValueError(f"strength {strength} x {num_inference_steps} steps leaves no step to run")
    start = (num_inference_steps - run) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def initial_noise(shape, generators: list[torch.Generator], device, dtype,
                  mode: Literal["independent", "shared"] = "independent") -> torch.Tensor:
    """(F, C, h, w) Gaussian noise: one draw per frame from its own generator, or frame 0's draw shared."""
    one = (1, *shape[1:])
    if mode == "shared":
        return randn_tensor(one, generator=generators[0], device=device, dtype=dtype).expand(shape).clone()
    if mode != "independent":
        raise ValueError(f"noise mode must be independent or shared, not {mode!r}")
    return torch.cat([randn_tensor(one, generator=g, device=device, dtype=dtype) for g in generators])


def _step_kwargs(scheduler, generators, eta: float) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "generator" in params:
        kw["generator"] = generators
    if "eta" in params:
        kw["eta"] = eta
    return kw


def _neighbours(visits, x0_of: Callable[[torch.Tensor], torch.Tensor], flows: ClipFlows, size, device) -> Neighbours:
    # frame bookkeeping stays on the host (reading it never waits for the accelerator); x0, flow and
    # mask are on the compute device
    frames = torch.tensor([v.frame for v in visits])
    index = torch.tensor([-1 if v.neighbour is None else v.neighbour for v in visits])
    present = index >= 0
    flow, mask = flows.pick(frames, torch.where(present, index, frames), size)
    flow, mask = flow.to(device), mask.to(device)
    x0 = x0_of(torch.where(present, index, frames))
    mask = mask * present.view(-1, 1, 1, 1).to(device, mask.dtype)
    return Neighbours(frames, index, present, x0, flow.to(x0.dtype), mask.to(x0.dtype))


class _Ahead:
    """Model outputs computed ahead of the sweep: ``take(frames)`` returns (samples, outputs) of the
    frames whose turn it is, evaluating the next ``batch`` frames of the visiting ``order`` in one
    call whenever one of them is missing. At most about two batches are held at a time."""

    def __init__(self, order: list[int], batch: int, evaluate):
        self.order, self.batch, self.evaluate = order, batch, evaluate
        self.next, self.ready = 0, {}

    def take(self, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        while any(f not in self.ready for f in frames):
            chunk = self.order[self.next:self.next + self.batch]
            if not chunk:
                raise RuntimeError(f"frames {frames} are not in this sweep's order")
            self.next += len(chunk)
            xs, outs = self.evaluate(chunk)
            self.ready.update(zip(chunk, zip(xs, outs)))
        xs, outs = zip(*(self.ready.pop(f) for f in frames))
        return torch.stack(xs), torch.stack(outs)


def sample_frames(
    denoiser: Callable[..., torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generators: list[torch.Generator],
    concat: torch.Tensor | None = None,
    alignment: Alignment | None = None,
    flows: ClipFlows | None = None,
    directions: list[int] | None = None,
    chain_length: int | None = None,
    batch_size: int = 8,
    eta: float = 0.0,
    callback: StepCallback | None = None,
    progress: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
    chain_log: list | None = None,
    checkpoint=None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run the sweep loop from ``latents`` (F, C, h, w) at ``timesteps[0]``; returns the final samples.

    ``concat``: (F, Cc, h, w) per-frame conditioning concatenated to the model input, or a function
    of the frame indices (B,) returning that batch's conditioning (recomputed instead of stored).
    ``flows``: neighbour flows and validity masks at any resolution, on any device (resized per
    batch; needed when the alignment uses neighbours). ``device``: where the model runs (default:
    the latents'); ``latents`` may live on the host to keep accelerator memory flat. ``directions``: +1/-1 per step (default: flip every step).
    ``chain_length``: None for the exact sweep, L for chains of L frames run in lockstep.
    ``chain_log``: if a list is given, the chain start frames of every step are appended to it.
    ``checkpoint``: a :class:`pipelines.checkpoint.Checkpointer`; the loop resumes from its last state
    and saves after every ``checkpoint.every`` steps.
    """
    check_scheduler(scheduler)
    alignment = alignment or Alignment()
    timer = timer or NullTimer()
    num_frames = latents.shape[0]
    if len(generators) != num_frames:
        raise ValueError(f"need one generator per frame: {len(generators)} for {num_frames} frames")
    if alignment.uses_neighbours and flows is None and num_frames > 1:
        raise ValueError(f"alignment {alignment.name!r} needs optical flows")
    directions = directions or step_directions(len(timesteps))
    device = device or latents.device
    cond_of = concat if callable(concat) or concat is None else (lambda idx: concat[idx.to(concat.device)])
    x = latents  # (F, C, h, w): the only full-clip tensor, on the state device (host or accelerator)
    align = alignment.uses_neighbours and num_frames > 1
    # Neighbour x0s: the exact sweep only ever needs the previous position's; chains also read the
    # previous step's x0 at chain starts, so then every frame's x0 is kept.
    keep_all = align and chain_length is not None and chain_length < num_frames
    x0_buf = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if keep_all else torch.zeros(0)
    in_files = hasattr(x, "begin_step")  # pipelines.filestore.SteppedState: samples double-buffered in files
    if in_files and not isinstance(scheduler, STATELESS):
        raise ValueError("samples kept in files need a stateless scheduler (DDPM or DDIM)")
    # Stateless schedulers (DDPM, DDIM) step each batch as soon as it is evaluated; the others
    # (step counters, multistep history) step all frames at once after the sweep, on the device
    # the state lives on (the host with offload_state), so the accelerator only ever holds a batch.
    per_batch = isinstance(scheduler, STATELESS)
    last: dict[int, torch.Tensor] = {}  # exact sweep: the x0 of the previous position's frames
    zero = torch.zeros(x.shape[1:], dtype=torch.float32)

    def neighbour_x0(index: torch.Tensor) -> torch.Tensor:
        """(B,) neighbour frames -> their current x0 (B, C, h, w) on the compute device."""
        if keep_all:
            return x0_buf[index.to(x0_buf.device)].to(device)
        return torch.stack([last.get(int(f), zero) for f in index]).to(device)

    def evaluate(xi: torch.Tensor, host_idx: torch.Tensor, t, extra: dict) -> torch.Tensor:
        with timer("condition"):
            cond = None if cond_of is None else cond_of(host_idx).to(device)
        with timer("model"):
            return denoiser(xi, t, concat=cond, **extra)

    def read_and_evaluate(chunk: list[int], t) -> tuple[torch.Tensor, torch.Tensor]:
        host_idx = torch.tensor(chunk)
        xi = x[host_idx.to(x.device)].to(device)  # frames not yet stepped in this step: their current samples
        return xi, evaluate(xi, host_idx, t, {})

    first = 0
    if checkpoint is not None:
        resumed = checkpoint.load(generators, scheduler, x.device)
        if resumed is not None:
            first = resumed[0]
            if resumed[1] is not None and resumed[1].shape != x.shape:
                from .checkpoint import WorkdirMismatch

                raise WorkdirMismatch(f"work folder {checkpoint.dir}: its samples are {tuple(resumed[1].shape)}, "
                                      f"this run's {tuple(x.shape)}; delete the folder to start over")
            x = x if resumed[1] is None else resumed[1].to(x.dtype)
            x0_buf = resumed[2] if keep_all else x0_buf
            if progress is not None:
                progress(first * num_frames)
    for s, t in enumerate(timesteps):
        if s < first:
            continue
        if in_files:
            x.begin_step(s)
        if hasattr(alignment, "begin_step"):
            alignment.begin_step(s, len(timesteps))
        positions = plan_sweep(num_frames, directions[s], chain_length, s, align=align)
        if chain_log is not None:
            chain_log.append(chain_starts(num_frames, chain_length or num_frames, s))
        last = {}
        ahead = None
        if align and not alignment.conditions_model and batch_size > 1:
            # the model's inputs do not depend on the sweep: evaluate the frames in visiting order,
            # batch_size at a time, ahead of their turn (the same outputs, far fewer calls)
            order = [v.frame for position in positions for v in position]
            ahead = _Ahead(order, batch_size, lambda chunk, t=t: read_and_evaluate(chunk, t))
        # A fresh buffer every step: multistep schedulers keep a reference to the output they are
        # given as history, so reusing one buffer would overwrite their past steps.
        out_buf = None if per_batch else torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for position in positions:
            nb_all = None
            if align:
                with timer("align"):
                    nb_all = _neighbours(position, neighbour_x0, flows, tuple(x.shape[-2:]), device)
            last = {}
            for lo in range(0, len(position), batch_size):
                frames = [v.frame for v in position[lo:lo + batch_size]]
                host_idx = torch.tensor(frames)  # conditioning is looked up on the host: no device sync
                idx = host_idx.to(x.device)
                if nb_all is None:  # independent frames: which frames these are, with no neighbour
                    nb = Neighbours.absent(host_idx)
                else:
                    nb = Neighbours(*(f[lo:lo + batch_size] for f in vars(nb_all).values()))
                if ahead is not None:
                    xi, out = ahead.take(frames)
                else:
                    xi = x[idx].to(device)
                    with timer("align"):
                        extra = alignment.model_kwargs(nb, t)
                    out = evaluate(xi, host_idx, t, extra)
                with timer("align"):
                    x0 = approx_x0(scheduler, out, t, xi.float())
                    fused = alignment.fuse(x0, nb, t)
                    if fused is not x0:  # the shift rule: the output moves only where x0 moved
                        out = out + model_output_shift(scheduler, fused - x0, t, xi.float())
                if keep_all:
                    x0_buf[idx] = fused.to(x0_buf.device)
                elif align:
                    last.update(zip(frames, fused))
                if per_batch:
                    with timer("scheduler"):
                        kw = _step_kwargs(scheduler, [generators[f] for f in frames], eta)
                        # in float32: DDPM (and DDIM with eta) draw the step's noise in the sample's dtype, and a
                        # half-precision draw is another random stream (fp16 would not follow fp32's seeds)
                        new = scheduler.step(out.float(), t, xi.float(), **kw, return_dict=False)[0]
                        x[idx] = new if in_files else new.to(x)
                else:
                    out_buf[idx] = out.to(out_buf)
                if callback is not None:
                    for k, f in enumerate(frames):
                        callback(s, t, f, fused[k])
                if progress is not None:
                    progress(len(frames))
        if not per_batch:
            with timer("scheduler"):
                kw = _step_kwargs(scheduler, generators, eta)
                x = scheduler.step(out_buf, t, x.float(), **kw, return_dict=False)[0].to(x.dtype)  # (see above)
        if checkpoint is not None:
            with timer("checkpoint"):
                checkpoint.maybe_save(s + 1, len(timesteps), x, x0_buf, generators, scheduler)
    if in_files:
        x.begin_step(len(timesteps))  # x.final() is the finished state
    return x
