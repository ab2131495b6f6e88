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


@torch.no_grad()
def test_upscaler_noise_level_bound_is_the_model_index_max_noise_level(tmp_path, monkeypatch):
    """The sd_upscaler convention accepts the noise levels diffusers' StableDiffusionUpscalePipeline accepts
    for the same saved model: up to model_index.json's ``max_noise_level``, 350 (that pipeline's default) when
    the file sets none, and samples what it samples at the bound. Reference kind: diffusers' pipeline run
    (``from_pretrained`` of a tiny folder written by its own ``save_pretrained``)."""
    import json

    from diffusers import StableDiffusionUpscalePipeline

    from pipelines import loading

    enc, tok = tiny.clip_parts(tmp_path / "clip")
    vae = tiny.vae(down=3)
    vae.register_to_config(scaling_factor=0.08333)
    x4 = dict(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
    StableDiffusionUpscalePipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=tiny.cond_unet(7, class_embed=True),
                                   low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"),
                                   scheduler=DDIMScheduler(**x4), max_noise_level=120).save_pretrained(tmp_path / "x4")
    lr = tiny.textured_clip(1, 16)

    def both(level):
        """(diffusers' frame or its error, ours or our error) at ``level``."""
        ref = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "x4")
        ref.set_progress_bar_config(disable=True)
        pipe = VideoPipeline.from_pretrained(tmp_path / "x4")
        out = []
        for run in (lambda: ref(prompt="", image=(lr + 1) / 2, num_inference_steps=2, guidance_scale=1.0,
                                noise_level=level, generator=torch.Generator().manual_seed(4), output_type="pt").images,
                    lambda: (pipe(lr, options=SamplingOptions(num_inference_steps=2, seed=4, noise_level=level)
                                  ).frames + 1) / 2):
            try:
                out.append(run())
            except ValueError as e:
                out.append(str(e))
        return out

    for cap in (120, 350):  # registered, then the default once the key is gone
        want, got = both(cap)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        want, got = both(cap + 1)
        assert isinstance(want, str) and f"<= {cap}" in want  # diffusers refuses it ...
        assert isinstance(got, str) and f"must be in [0, {cap}]" in got and "max_noise_level" in got, got  # ... and so do we
        index = json.loads((tmp_path / "x4" / "model_index.json").read_text())
        index.pop("max_noise_level", None)
        (tmp_path / "x4" / "model_index.json").write_text(json.dumps(index))
    # a hub id's model_index.json is read through the same helper as its components'
    monkeypatch.setattr(loading, "_hub_json", lambda repo, name: {"max_noise_level": 77} if name == "model_index.json"
                        else {})
    assert loading.read_max_noise_level("owner/x4", local=False) == 77


LONG = "a prompt far longer than the tiny tokenizer's sixteen tokens, which both sides truncate alike"
OPTION_CASES = {  # name: (scheduler, strength, steps, options shared by both pipelines)
    "one step (int(4 * 0.3) = 1)": ("ddim", 0.3, 4, {}),
    "one step, dpm++": ("dpm++-eps", 0.25, 4, {}),
    "guidance 1.0 with a negative prompt": ("ddim", 0.6, 4, dict(prompt="a cat", negative_prompt="a dog")),
    "guidance 1.01 (the CFG threshold)": ("ddim", 0.6, 4, dict(prompt="a cat", negative_prompt="a dog",
                                                               guidance_scale=1.01)),
    "ddim eta 1, strength 0.6": ("ddim", 0.6, 4, dict(eta=1.0)),
    "ddim eta 0.5, strength 1": ("ddim", 1.0, 4, dict(eta=0.5)),
    "ddim trailing": ("ddim-trailing", 0.6, 4, {}),
    "dpm++ trailing": ("dpm++-trailing", 0.6, 4, {}),
    "long prompts, guidance 2": ("ddim", 0.6, 4, dict(prompt=LONG, negative_prompt=LONG[::-1], guidance_scale=2.0)),
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_img2img_options_equal_diffusers_per_frame(parts, clip, case):
    """Options beyond the scheduler matrix above (a single step, the guidance threshold with a negative prompt,
    DDIM's eta noise per frame, trailing spacing, truncated prompts), 3 frames in batches of 2, alignment none.
    Reference kind: diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionPipeline run on each frame alone."""
    name, strength, steps, kw = OPTION_CASES[case]
    make = {**SCHEDULERS, "ddim": lambda: DDIMScheduler(**SD, clip_sample=False),
            "ddim-trailing": lambda: DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing"),
            "dpm++-trailing": lambda: DPMSolverMultistepScheduler(**SD, timestep_spacing="trailing")}[name]
    want = []
    for f in range(len(clip)):
        ref = (StableDiffusionImg2ImgPipeline if strength < 1 else StableDiffusionPipeline)(
            **parts, scheduler=make(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref.scheduler = make()
        ref.set_progress_bar_config(disable=True)
        call = dict(dict(prompt="", guidance_scale=1.0), **kw, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(SEED + f))
        image = dict(image=(clip[f:f + 1] + 1) / 2, strength=strength) if strength < 1 else dict(height=32, width=32)
        want.append(ref(**image, **call).images)
    pipe = VideoPipeline(parts["unet"], make(), vae=parts["vae"], text_encoder=parts["text_encoder"],
                         tokenizer=parts["tokenizer"])
    got = pipe(clip, options=SamplingOptions(num_inference_steps=steps, strength=strength, seed=SEED, batch_size=2,
                                             **kw)).frames
    torch.testing.assert_close((got + 1) / 2, torch.cat(want), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("noise_level, kw", [(0, {}), (350, dict(eta=1.0)),
                                             (20, dict(prompt="a", negative_prompt="b", guidance_scale=1.01))],
                         ids=["noise 0", "noise 350 (the default bound), ddim eta 1", "guidance 1.01"])
def test_upscaler_options_equal_diffusers_per_frame(parts, noise_level, kw):
    """The sd_upscaler convention at the ends of the noise-level range, with DDIM's eta and at the guidance
    threshold, 3 frames in batches of 2. Reference kind: diffusers' StableDiffusionUpscalePipeline run on each
    frame alone with that frame's seed."""
    from diffusers import StableDiffusionUpscalePipeline

    unet, vae = tiny.cond_unet(7, class_embed=True), tiny.vae(down=3)
    vae.register_to_config(scaling_factor=0.08333)
    make = lambda: DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)  # noqa: E731
    low = DDPMScheduler(beta_schedule="scaled_linear")
    lr = tiny.textured_clip(3, 16, shift=(1.0, 0.5))
    ref = StableDiffusionUpscalePipeline(vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                         unet=unet, low_res_scheduler=low, scheduler=make())
    ref.set_progress_bar_config(disable=True)
    call = dict(dict(prompt="", guidance_scale=1.0), **kw)
    want = torch.cat([ref(image=(lr[f:f + 1] + 1) / 2, num_inference_steps=3, noise_level=noise_level, output_type="pt",
                          generator=torch.Generator().manual_seed(SEED + f), **call).images for f in range(3)])
    pipe = VideoPipeline(unet, make(), vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                         low_res_scheduler=low, scale=4)
    got = pipe(lr, options=SamplingOptions(num_inference_steps=3, seed=SEED, batch_size=2, noise_level=noise_level,
                                           **kw)).frames
    torch.testing.assert_close((got + 1) / 2, want, atol=1e-5, rtol=0)
