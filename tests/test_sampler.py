"""The sampler against diffusers' own pipelines, and its video behaviour on synthetic clips."""
import pytest
import torch
from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionUpscalePipeline)

import tiny
from pipelines.align import Fusion
from pipelines.flow import FlowConfig, compute_clip_flows, warp
from pipelines.sampler import initial_noise
from pipelines.sweep import plan_sweep, step_directions
from pipelines.video_pipeline import SamplingOptions, VideoPipeline


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    enc, tok = tiny.clip_parts(tmp_path_factory.mktemp("clip"))
    return dict(unet=tiny.cond_unet(), vae=tiny.vae(), text_encoder=enc, tokenizer=tok)


def to01(x):
    return (x + 1) / 2


@pytest.mark.parametrize("strength", [0.6, 0.8])
def test_one_frame_matches_diffusers_img2img(sd_parts, strength):
    """Latent img2img path == StableDiffusionImg2ImgPipeline (same components, scheduler, seed, strength)."""
    frame = tiny.textured_clip(1, 32)
    sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1)
    ref = StableDiffusionImg2ImgPipeline(**sd_parts, scheduler=sched, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt="a wolf", image=to01(frame), strength=strength, num_inference_steps=5, guidance_scale=3.0,
               negative_prompt="", generator=torch.Generator().manual_seed(7), output_type="pt").images
    pipe = VideoPipeline(sd_parts["unet"], DDIMScheduler.from_config(sched.config), vae=sd_parts["vae"],
                         text_encoder=sd_parts["text_encoder"], tokenizer=sd_parts["tokenizer"])
    assert pipe.kind == "img2img"
    got = pipe(frame, options=SamplingOptions(num_inference_steps=5, strength=strength, seed=7, prompt="a wolf",
                                              guidance_scale=3.0)).frames
    torch.testing.assert_close(to01(got), want, atol=1e-5, rtol=0)


def test_one_frame_matches_diffusers_upscaler(sd_parts):
    """Concat-conditioned SR path == StableDiffusionUpscalePipeline (noise level as class label)."""
    unet = tiny.cond_unet(in_channels=7, class_embed=True)
    vae = tiny.vae(down=3)  # /4 latent, like the x4 upscaler
    lr = tiny.textured_clip(1, 16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction")
    low = tiny.ddpm_v().__class__()  # default DDPM: the upscaler's low-res noise schedule
    ref = StableDiffusionUpscalePipeline(vae=vae, text_encoder=sd_parts["text_encoder"],
                                         tokenizer=sd_parts["tokenizer"], unet=unet, low_res_scheduler=low,
                                         scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt="", image=to01(lr), num_inference_steps=4, guidance_scale=0.0, noise_level=20,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    pipe = VideoPipeline(unet, DDIMScheduler.from_config(sched.config), vae=vae, low_res_scheduler=low,
                         text_encoder=sd_parts["text_encoder"], tokenizer=sd_parts["tokenizer"], scale=4)
    assert pipe.kind == "upscale"
    got = pipe(lr, options=SamplingOptions(num_inference_steps=4, seed=3, noise_level=20)).frames
    assert got.shape == (1, 3, 64, 64)
    torch.testing.assert_close(to01(got), want, atol=1e-5, rtol=0)


def pixel_pipe(sched=None):
    return VideoPipeline(tiny.pixel_unet(6), sched or tiny.ddpm_v(), scale=2, residual_scale=0.1)


def test_none_equals_independent_single_frame_runs():
    clip = tiny.textured_clip(4, 16)
    opts = SamplingOptions(num_inference_steps=4, seed=11, batch_size=3)
    pipe = pixel_pipe()
    together = pipe(clip, options=opts).frames
    for f in range(4):
        alone = pipe(clip[f:f + 1], options=SamplingOptions(num_inference_steps=4, seed=11 + f)).frames
        torch.testing.assert_close(together[f:f + 1], alone, atol=1e-5, rtol=0)


def latent_warp_error(frames, flows):
    f = frames[1:]
    w = warp(frames[:-1], flows.to_prev[1:])
    m = flows.valid_prev[1:]
    return float(((f - w) ** 2 * m).sum() / (m.sum() * 3))


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_fusion_makes_consecutive_frames_agree(sd_parts, kind):
    """On a translating clip, fused outputs agree after warping far better than independent ones."""
    clip = tiny.textured_clip(5, 32, shift=(1.5, 0.5))
    if kind == "pixel":
        pipe, inp = pixel_pipe(), clip[:, :, ::2, ::2]  # SR x2 back to 32x32
    else:
        pipe = VideoPipeline(sd_parts["unet"], DDIMScheduler(clip_sample=False), vae=sd_parts["vae"],
                             text_encoder=sd_parts["text_encoder"], tokenizer=sd_parts["tokenizer"])
        inp = clip
    opts = SamplingOptions(num_inference_steps=6, strength=1.0, seed=0)
    flows = compute_clip_flows(clip, FlowConfig())
    errors = {}
    for name, alignment in [("none", None), ("fusion", Fusion(weight=0.9))]:
        last = {}
        out = pipe(inp, options=opts, alignment=alignment, callback=lambda s, t, f, x0: last.__setitem__(f, x0))
        x0 = torch.stack([last[f] for f in range(len(clip))])  # the last step's x0 (latents for the VAE path)
        errors[name] = (latent_warp_error(out.frames, flows), latent_warp_error(x0, flows.resized(x0.shape[-2:])))
    (pix_none, x0_none), (pix_fused, x0_fused) = errors["none"], errors["fusion"]
    # measured: pixel path 0.0086 -> 0.00026 (33x); latent path x0 >10x, decoded by a random VAE 3.2x
    assert x0_fused * 10 < x0_none, errors
    assert pix_fused * (10 if kind == "pixel" else 2.5) < pix_none, errors


def test_reversal_symmetry():
    """Deterministic scheduler: reversed clip + mirrored direction schedule = reversed output."""
    clip = tiny.textured_clip(4, 16, shift=(1.0, 0.0))
    pipe = pixel_pipe(DDIMScheduler.from_config(tiny.ddpm_v().config))
    opts = dict(num_inference_steps=4, noise="shared", seed=5)
    fwd = pipe(clip, options=SamplingOptions(**opts, start="forward"), alignment=Fusion(0.7)).frames
    rev = pipe(clip.flip(0), options=SamplingOptions(**opts, start="backward"), alignment=Fusion(0.7)).frames
    torch.testing.assert_close(rev.flip(0), fwd, atol=1e-4, rtol=0)
    # and the schedule matters: not mirroring it gives a different result
    other = pipe(clip.flip(0), options=SamplingOptions(**opts, start="forward"), alignment=Fusion(0.7)).frames
    assert (other.flip(0) - fwd).abs().max() > 1e-3


def test_seeded_runs_are_reproducible_and_seed_dependent():
    clip = tiny.textured_clip(3, 16)
    pipe = pixel_pipe()
    a = pipe(clip, options=SamplingOptions(num_inference_steps=3, seed=1), alignment=Fusion()).frames
    b = pipe(clip, options=SamplingOptions(num_inference_steps=3, seed=1), alignment=Fusion()).frames
    c = pipe(clip, options=SamplingOptions(num_inference_steps=3, seed=2), alignment=Fusion()).frames
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_callback_sees_every_frame_every_step_in_sweep_order():
    clip = tiny.textured_clip(3, 16)
    seen = []
    pixel_pipe()(clip, options=SamplingOptions(num_inference_steps=4, strength=0.5), alignment=Fusion(),
                 callback=lambda s, t, f, x0: seen.append((s, f, tuple(x0.shape))))
    assert [(s, f) for s, f, _ in seen] == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    assert seen[0][2] == (3, 32, 32)


@torch.no_grad()
@pytest.mark.parametrize("strength", [0.3, 0.7])
def test_strength_start_matches_diffusers_img2img(sd_parts, strength, monkeypatch):
    """The first model call (the starting noisy sample and its timestep) equals diffusers' img2img's
    (reference kind: diffusers' StableDiffusionImg2ImgPipeline), and so does every later timestep."""
    frame = tiny.textured_clip(1, 32)
    unet = sd_parts["unet"]
    calls = []
    real = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, t, *a, **k: (calls.append((x.clone(), int(t))),
                                                                 real(x, t, *a, **k))[1])
    sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref = StableDiffusionImg2ImgPipeline(**sd_parts, scheduler=sched, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref(prompt="", image=to01(frame), strength=strength, num_inference_steps=10, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5), output_type="pt")
    want, calls[:] = list(calls), []
    pipe = VideoPipeline(unet, DDIMScheduler.from_config(sched.config), vae=sd_parts["vae"],
                         text_encoder=sd_parts["text_encoder"], tokenizer=sd_parts["tokenizer"])
    pipe(frame, options=SamplingOptions(num_inference_steps=10, strength=strength, seed=5))
    assert [t for _, t in calls] == [t for _, t in want] and len(calls) == int(10 * strength)
    torch.testing.assert_close(calls[0][0], want[0][0], atol=1e-6, rtol=0)


def test_noise_modes_and_strength_errors():
    pipe = pixel_pipe()
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    shared = initial_noise((3, 2, 4, 4), gens, "cpu", torch.float32, "shared")
    assert torch.equal(shared[0], shared[2])
    # frame 0's own draw (torch's generator, seed 0) shared; independent frames draw from their own seeds
    assert torch.equal(shared[0], torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(0))[0])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    own = initial_noise((3, 2, 4, 4), gens, "cpu", torch.float32, "independent")
    assert torch.equal(own[0], shared[0]) and not torch.equal(own[1], own[0])
    assert torch.equal(own[2], torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(2))[0])
    with pytest.raises(ValueError, match="strength"):
        pipe(tiny.textured_clip(1, 16), options=SamplingOptions(strength=1.5))


def test_direction_schedule_semantics():
    assert step_directions(4) == [1, -1, 1, -1]
    assert step_directions(4, start="backward") == [-1, 1, -1, 1]
    assert step_directions(6, passes=2) == [1, 1, 1, -1, -1, -1]
    assert step_directions(3, passes=1) == [1, 1, 1]
    assert step_directions(3, "forward") == [1, 1, 1]
    first = plan_sweep(4, -1)
    assert [[v.frame for v in p] for p in first] == [[3], [2], [1], [0]]
    assert first[1][0].neighbour == 3 and first[0][0].neighbour is None


def test_stage_timer_nested_stages_are_exclusive():
    import time

    from pipelines.timing import StageTimer

    timer = StageTimer("cpu")
    start = time.perf_counter()
    with timer("align"):
        time.sleep(0.02)
        with timer("vae"):
            time.sleep(0.05)
    wall = time.perf_counter() - start
    assert 0.045 < timer.seconds["vae"] < 0.2 and 0.015 < timer.seconds["align"] < 0.045
    assert abs(timer.seconds["align"] + timer.seconds["vae"] - wall) < 0.01


def test_frame_space_fusion_aligns_whole_frames_of_residual_models():
    """Residual model x0 = (frame - base)/s: with weight 1, identity flow and a full mask, frame-space
    fusion copies the neighbour's whole frame (x0_n + base_n/s - base_i/s); sample space copies x0_n."""
    from pipelines.align import Neighbours

    pipe = pixel_pipe()
    clip = tiny.textured_clip(2, 8, shift=(2.0, 0.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 16, 16, generator=g)
    nb = Neighbours(torch.tensor([1]), torch.tensor([0]), torch.tensor([True]), x0[:1], torch.zeros(1, 2, 16, 16),
                    torch.ones(1, 1, 16, 16))
    frame = Fusion(1.0, space="frame")
    frame.bind(pipe, frames=clip)
    offset = pipe.conditioning_frames(clip) / pipe.residual_scale
    torch.testing.assert_close(frame.fuse(x0[1:], nb, 500), x0[:1] + offset[:1] - offset[1:])
    sample = Fusion(1.0, space="sample")
    sample.bind(pipe, frames=clip)
    torch.testing.assert_close(sample.fuse(x0[1:], nb, 500), x0[:1])


class _BlockVAE(torch.nn.Module):
    """A linear stand-in for a VAE: decode = nearest x4 upsample, encode mean = gain * 4x4 average pool +
    bias, so E(D(z)) = z exactly with the defaults and a lossy round trip otherwise."""

    def __init__(self, scaling_factor=1.5, gain=1.0, bias=0.0):
        super().__init__()
        self.config = type("Config", (), {"scaling_factor": scaling_factor})()
        self.dtype = torch.float32
        self.gain, self.bias = gain, bias

    def decode(self, z):
        return type("Out", (), {"sample": torch.nn.functional.interpolate(z, scale_factor=4, mode="nearest")})()

    def encode(self, x):
        dist = type("Dist", (), {"mean": self.gain * torch.nn.functional.avg_pool2d(x, 4) + self.bias})()
        return type("Out", (), {"latent_dist": dist})()


class _ZeroFlows:
    """Flows for ``pick``: zero flow, and one validity mask per neighbour index, given at the latent size
    (upsampled to ``size``)."""

    def __init__(self, mask):
        self.mask = mask

    def pick(self, frames, index, size):
        mask = torch.nn.functional.interpolate(self.mask[index], size=size, mode="nearest")
        return torch.zeros(len(frames), 2, *size), mask


def test_decoded_space_fusion_equals_latent_fusion_when_the_encoder_inverts_the_decoder():
    """Closed-form reference: x0' = x0 + s (E(X') - E(X)) with X' = X + w M (W(X_n) - X). With E(D(z)) = z,
    zero flow and a mask constant on each latent pixel's 4x4 block, that is x0 + w m (x0_n - x0), the latent
    fusion; where nothing is fused (absent neighbour, weight 0) x0 comes back unchanged, even through a lossy
    round trip (the difference of two encodings cancels it; encoding X' alone would not)."""
    from pipelines.align import DecodedFusion, Neighbours

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 6, 5, generator=g)
    mask = (torch.rand(2, 1, 6, 5, generator=g) > 0.3).float()
    pipe = type("Pipe", (), {"vae": _BlockVAE()})()
    nb = Neighbours(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([True, True]), x0[:2],
                    torch.zeros(2, 2, 6, 5), mask)
    fused = DecodedFusion(0.3)
    fused.bind(pipe, flows=_ZeroFlows(mask), size=(24, 20))
    torch.testing.assert_close(fused.fuse(x0[1:], nb, 500), Fusion(0.3).fuse(x0[1:], nb, 500), atol=1e-5, rtol=0)
    assert not torch.allclose(fused.fuse(x0[1:], nb, 500), x0[1:])
    lossy = type("Pipe", (), {"vae": _BlockVAE(gain=0.9, bias=0.05)})()
    nothing = DecodedFusion(0.0)
    nothing.bind(lossy, flows=_ZeroFlows(mask), size=(24, 20))
    assert torch.equal(nothing.fuse(x0[1:], nb, 500), x0[1:])
    absent = Neighbours(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([False, True]), x0[:2],
                        torch.zeros(2, 2, 6, 5), mask)
    fused.bind(lossy, flows=_ZeroFlows(mask), size=(24, 20))
    out = fused.fuse(x0[1:], absent, 500)
    assert torch.equal(out[0], x0[1]) and not torch.allclose(out[1], x0[2])


def test_decoded_space_fusion_is_refused_for_a_pixel_model():
    from pipelines.config import ConfigError, build_alignment, load_config

    cfg = load_config(None, ["alignment.mode=fusion", "alignment.space=decoded"])
    with pytest.raises(ConfigError, match="alignment.space=decoded .* needs a latent model"):
        build_alignment(cfg, pixel_pipe())
