"""Parity matrix: the video sampler against diffusers' own pipelines, frame by frame.

Reference kind: diffusers' ``StableDiffusionImg2ImgPipeline`` (strength < 1) and
``StableDiffusionPipeline`` (strength 1, the text-to-image start this project uses) run on each frame
alone with that frame's seed; code not written here. A clip of 3 different frames is sampled with
alignment ``none`` and with fusion at weight 0 (which must change nothing), for every scheduler
configuration the sampler accepts.
"""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

import tiny
from pipelines.align import Fusion
from pipelines.flow import FlowConfig, compute_clip_flows
from pipelines.video_pipeline import SamplingOptions, VideoPipeline

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, steps_offset=1)
SCHEDULERS = {
    "ddpm": lambda: DDPMScheduler(**SD),
    "ddim": lambda: DDIMScheduler(**SD, clip_sample=False),
    "ddim-clip": lambda: DDIMScheduler(**SD, clip_sample=True),
    "euler": lambda: EulerDiscreteScheduler(**SD),
    "euler-karras": lambda: EulerDiscreteScheduler(**SD, use_karras_sigmas=True),
    "euler-trailing": lambda: EulerDiscreteScheduler(**SD, timestep_spacing="trailing"),
    "dpm++-eps": lambda: DPMSolverMultistepScheduler(**SD),
    "dpm++-v": lambda: DPMSolverMultistepScheduler(**SD, prediction_type="v_prediction"),
    "dpm++-sample": lambda: DPMSolverMultistepScheduler(**SD, prediction_type="sample"),
    "dpmsolver": lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
}
STEPS, SEED = 4, 21


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    enc, tok = tiny.clip_parts(tmp_path_factory.mktemp("clip"))
    return dict(unet=tiny.cond_unet(), vae=tiny.vae(), text_encoder=enc, tokenizer=tok)


@pytest.fixture(scope="module")
def clip():
    frames = tiny.textured_clip(3, 32, shift=(2.0, 1.0))
    assert all((frames[i] - frames[i + 1]).abs().max() > 0.1 for i in range(2))  # 3 different frames
    return frames


@pytest.fixture(scope="module")
def flows(clip):
    return compute_clip_flows(clip, FlowConfig())


def diffusers_frame(parts, name, frame, seed, strength):
    """One frame through diffusers' own pipeline, in [0, 1] (B, 3, H, W)."""
    common = dict(**parts, scheduler=DDIMScheduler(**SD), safety_checker=None, feature_extractor=None,
                  requires_safety_checker=False)
    kw = dict(prompt="", num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt",
              generator=torch.Generator().manual_seed(seed))
    ref = (StableDiffusionImg2ImgPipeline if strength < 1 else StableDiffusionPipeline)(**common)
    ref.scheduler = SCHEDULERS[name]()  # after __init__, which would rewrite clip_sample and steps_offset
    ref.set_progress_bar_config(disable=True)
    if strength < 1:
        return ref(image=(frame + 1) / 2, strength=strength, **kw).images
    return ref(height=frame.shape[-2], width=frame.shape[-1], **kw).images


@torch.no_grad()
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_frame_equals_diffusers_alone(parts, clip, flows, name, strength):
    want = torch.cat([diffusers_frame(parts, name, clip[f:f + 1], SEED + f, strength) for f in range(len(clip))])
    pipe = VideoPipeline(parts["unet"], SCHEDULERS[name](), vae=parts["vae"], text_encoder=parts["text_encoder"],
                         tokenizer=parts["tokenizer"])
    opts = SamplingOptions(num_inference_steps=STEPS, strength=strength, seed=SEED, batch_size=2)
    for alignment in (None, Fusion(weight=0.0)):
        got = (pipe(clip, options=opts, alignment=alignment, flows=flows).frames + 1) / 2
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name} strength {strength} {alignment}: {m}")
    # and the frames really differ from one another (a sampler ignoring the frame would fail above)
    assert (want[0] - want[1]).abs().max() > 1e-2


@torch.no_grad()
def test_fusion_with_ddim_clipping_changes_only_what_fusion_changes():
    """The shift rule with DDIM clip_sample: where fusion leaves x0 alone (mask 0) the step is DDIM's own,
    bit for bit; where the raw x0 is inside the clip range the step's x0 is exactly the fused one.
    Reference kind: diffusers' DDIMScheduler.step itself."""
    from schedulers import approx_x0, model_output_shift

    sched = DDIMScheduler(**SD, clip_sample=True, clip_sample_range=1.0)
    sched.set_timesteps(10)
    t = sched.timesteps[2]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g) * 1.5
    out = torch.randn(1, 4, 8, 8, generator=g) * 1.5
    raw = approx_x0(DDIMScheduler(**SD, clip_sample=False), out, t, sample)
    assert (raw.abs() > 1).any() and (raw.abs() < 1).any()  # both clipped and unclipped pixels
    x0 = approx_x0(sched, out, t, sample)
    mask = (torch.arange(64).view(1, 1, 8, 8) % 2).float()
    fused = x0 + 0.5 * mask * (torch.rand(1, 4, 8, 8, generator=g) * 2 - 1 - x0)
    own = sched.step(out, t, sample)
    new = sched.step(out + model_output_shift(sched, fused - x0, t, sample), t, sample)
    untouched = mask.expand_as(x0) == 0
    assert torch.equal(new.prev_sample[untouched], own.prev_sample[untouched])
    inside = (raw.abs() < 1) & ~untouched
    torch.testing.assert_close(new.pred_original_sample[inside], fused[inside], atol=1e-5, rtol=0)
