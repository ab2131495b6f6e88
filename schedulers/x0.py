"""Approximated-x0 maths for *unmodified* diffusers schedulers.

Every supported scheduler is a variance-preserving (VP) diffusion underneath. With
``a = alphas_cumprod[t]`` (written ``a_t`` below), the noisy sample is

    x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps                                       (1)

and a network is trained to predict one of three things from ``x_t``:

* ``epsilon``:       the noise ``eps``;
* ``v_prediction``:  the velocity ``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0``      (2)
* ``sample``:        ``x0`` itself.

**The velocity and the approximated x0 are different maps.** (2) is the *training target*: it
takes the clean sample and the noise, (x0, eps) -> v, and is what diffusers' ``get_velocity``
builds. The *approximated x0* goes the other way, (x_t, v) -> x0. Substituting (1) into (2) and
solving for x0 gives

    x0 = sqrt(a_t) * x_t - sqrt(1 - a_t) * v                                         (3)

The coefficients look swapped between (2) and (3) because the inputs are different: (2) mixes
x0 and eps, (3) mixes x_t and v. Both follow from the same rotation of (x0, eps) by the angle
``phi`` with ``cos(phi) = sqrt(a_t)``.

**Why sampling still goes step by step.** (3) gives a clean estimate from a single model call at
any t, but at a large t it is the network's guess of the *mean* of all clean images compatible
with a very noisy x_t: a blurry average, not a sample. Each scheduler step moves x_t only a
little towards that estimate, re-noises consistently, and asks again at a lower t, where the
estimate is sharper. The estimate of *each step* is therefore the current best guess of the
clean frame, which is exactly what neighbouring frames should agree on, so that is what the
video sampler warps and shares between frames.

Euler (a sigma-parameterised scheduler) keeps its sample as ``x_sigma = x0 + sigma * eps`` with
``sigma = sqrt((1 - a_t) / a_t)``; the network sees ``x_t = x_sigma / sqrt(sigma**2 + 1)``, which
is (1) again (``scale_model_input``). The functions below convert to the VP form first, so the
same three equations serve all schedulers. DPM-Solver with ``use_flow_sigmas`` is the one exception:
its sample is ``x_t = (1 - k) * x0 + k * eps`` (a straight path, not VP), and (3) and its epsilon form
hold with ``sqrt(a_t) -> 1 - k`` and ``sqrt(1 - a_t) -> k``, which is what that solver itself uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

SUPPORTED_SCHEDULERS = (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SIGMA_SCHEDULERS = (DPMSolverMultistepScheduler, EulerDiscreteScheduler)


def check_scheduler(scheduler) -> None:
    """Raise ``ValueError`` unless this module's maths is exact for ``scheduler``."""
    if not isinstance(scheduler, SUPPORTED_SCHEDULERS):
        names = ", ".join(c.__name__ for c in SUPPORTED_SCHEDULERS)
        raise ValueError(f"scheduler {type(scheduler).__name__} is not supported; use one of: {names}")
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported; use one of: {', '.join(PREDICTION_TYPES)}")
    if scheduler.config.get("thresholding", False):
        raise ValueError("scheduler option thresholding=True is not supported (it changes x0 non-linearly)")
    variance = scheduler.config.get("variance_type") if isinstance(scheduler, DDPMScheduler) else None
    if variance in ("fixed_large_log", "learned", "learned_range"):
        raise ValueError(f"DDPM variance_type {variance!r} is not supported (diffusers' step gives NaN with "
                         "fixed_large_log, and learned variances need a UNet with twice the output channels); "
                         "use fixed_small, fixed_small_log or fixed_large")
    algorithm = scheduler.config.get("algorithm_type", "dpmsolver++")
    if type(scheduler).__name__ == "DPMSolverMultistepScheduler" and algorithm.startswith("sde-"):
        raise ValueError(f"DPM-Solver algorithm_type {algorithm!r} is not supported (its stochastic steps are "
                         "not covered; dpmsolver and dpmsolver++ are, scheduler.kind=dpm++ selects the latter)")


@dataclass
class VPCoefficients:
    """``x_vp = in_scale * sample``; ``x_vp = alpha * x0 + sigma * eps`` with alpha^2 + sigma^2 = 1
    (alpha + sigma = 1 for DPM-Solver's ``use_flow_sigmas``: the maths below needs only the linear map)."""

    alpha: torch.Tensor  # sqrt(a_t)
    sigma: torch.Tensor  # sqrt(1 - a_t)
    in_scale: torch.Tensor  # 1 for VP schedulers, 1/sqrt(sigma_k^2 + 1) for Euler/DPM sigmas


def _step_index(scheduler, t) -> int:
    """The index into ``scheduler.sigmas`` that the scheduler's next ``step(t)`` will use."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    return scheduler.index_for_timestep(t)


def coefficients(scheduler, t, like: torch.Tensor) -> VPCoefficients:
    """VP coefficients of the scheduler's current step at timestep ``t`` (dtype/device of ``like``)."""
    check_scheduler(scheduler)
    if isinstance(scheduler, _SIGMA_SCHEDULERS):
        k = scheduler.sigmas[_step_index(scheduler, t)].to(torch.float64)
        if scheduler.config.get("use_flow_sigmas", False):
            alpha, sigma = 1.0 - k, k  # DPM-Solver's flow sigmas: x_t = (1 - k) * x0 + k * eps
        else:
            alpha = 1.0 / torch.sqrt(k**2 + 1.0)
            sigma = k * alpha
        # Euler's sample lives in sigma space (x0 + k eps); DPM-Solver's sample is already VP.
        in_scale = alpha if isinstance(scheduler, EulerDiscreteScheduler) else torch.ones_like(alpha)
    else:
        a = scheduler.alphas_cumprod[int(t)].to(torch.float64)
        alpha, sigma, in_scale = a.sqrt(), (1 - a).sqrt(), torch.ones_like(a)
    cast = lambda v: v.to(device=like.device, dtype=like.dtype)  # noqa: E731
    return VPCoefficients(cast(alpha), cast(sigma), cast(in_scale))


def _clip(scheduler, x0: torch.Tensor) -> torch.Tensor:
    """DDPM/DDIM clamp x0 when ``clip_sample`` is set; mirror it so results match ``step``."""
    if isinstance(scheduler, (DDPMScheduler, DDIMScheduler)) and scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        return x0.clamp(-r, r)
    return x0


def approx_x0(scheduler, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
    """The approximated x0 (``pred_original_sample``) implied by a model output.

    With ``x_t = in_scale * sample`` (the model input):
      epsilon:       x0 = (x_t - sqrt(1-a_t) * eps) / sqrt(a_t)
      v_prediction:  x0 = sqrt(a_t) * x_t - sqrt(1-a_t) * v
      sample:        x0 = model_output
    Shapes: any, broadcast together (typically ``(F, C, H, W)``).
    """
    c = coefficients(scheduler, t, sample)
    x_t = c.in_scale * sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x_t - c.sigma * model_output) / c.alpha
    elif kind == "v_prediction":
        x0 = c.alpha * x_t - c.sigma * model_output
    else:
        x0 = model_output
    return _clip(scheduler, x0)


def model_output_for_x0(scheduler, x0: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`approx_x0`: the model output that makes ``scheduler.step`` see ``x0``.

      epsilon:       eps = (x_t - sqrt(a_t) * x0) / sqrt(1-a_t)
      v_prediction:  v   = (sqrt(a_t) * x_t - x0) / sqrt(1-a_t)
      sample:        x0
    Handing the result to an unmodified ``scheduler.step(out, t, sample)`` continues the ordinary
    step from a modified (for example fused) x0.
    """
    c = coefficients(scheduler, t, sample)
    x_t = c.in_scale * sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - c.alpha * x0) / c.sigma
    if kind == "v_prediction":
        return (c.alpha * x_t - x0) / c.sigma
    return x0


def model_output_shift(scheduler, delta_x0: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
    """How much the model output must move so that the step's x0 moves by ``delta_x0`` at fixed x_t.

    :func:`model_output_for_x0` is affine in x0 with slope
      epsilon:       d eps / d x0 = -sqrt(a_t) / sqrt(1-a_t)
      v_prediction:  d v   / d x0 = -1 / sqrt(1-a_t)
      sample:        1
    so ``out' = out + slope * (x0' - x0)`` is the *shift rule* the sampler uses to hand a fused x0
    to an unmodified step. Unlike rebuilding the output from x0' alone, it leaves the output
    bit-identical wherever fusion leaves x0 unchanged (weight 0, masked pixels), and with DDPM/DDIM
    ``clip_sample`` it shifts the scheduler's *raw* x0 and noise direction by the fusion's change
    instead of replacing the raw noise direction by the one of the clamped x0.
    """
    c = coefficients(scheduler, t, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return delta_x0 * (-c.alpha / c.sigma)
    if kind == "v_prediction":
        return delta_x0 * (-1.0 / c.sigma)
    return delta_x0


def velocity(scheduler, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """The v-prediction training target ``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0`` (Salimans & Ho 2022).

    ``t`` is a training timestep (int or a ``(B,)`` tensor), as in diffusers' ``get_velocity``.
    """
    a = scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[torch.as_tensor(t, device=x0.device)]
    a = a.reshape(a.shape + (1,) * (x0.dim() - a.dim()))
    return a.sqrt() * noise - (1 - a).sqrt() * x0
