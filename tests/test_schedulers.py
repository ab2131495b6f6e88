"""x0 / velocity / inverse maths against diffusers' own, unmodified schedulers."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from schedulers import approx_x0, check_scheduler, model_output_for_x0, model_output_shift, velocity

SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
KINDS = ["epsilon", "v_prediction", "sample"]


def make(cls, kind, steps=10):
    kw = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=kind)
    if cls in (DDPMScheduler, DDIMScheduler):
        kw["clip_sample"] = False
    s = cls(**kw)
    s.set_timesteps(steps)
    return s


def reference_x0(s, out, t, x):
    """diffusers' own x0 for the scheduler's current step (the step is taken on a copy's state)."""
    if isinstance(s, DPMSolverMultistepScheduler):  # step() does not return pred_original_sample
        if s.step_index is None:
            s._init_step_index(t)
        return s.convert_model_output(out, sample=x)
    return s.step(out, t, x).pred_original_sample


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("kind", KINDS)
def test_x0_matches_pred_original_sample_at_every_step(cls, kind):
    g = torch.Generator().manual_seed(0)
    s, ref = make(cls, kind), make(cls, kind)
    x = torch.randn(2, 4, 8, 8, generator=g) * float(s.init_noise_sigma)
    steps = list(s.timesteps)
    for i, t in enumerate(steps):  # first, middle and last timestep all covered
        out = torch.randn(x.shape, generator=g)
        ours = approx_x0(s, out, t, x)
        theirs = reference_x0(ref, out, t, x)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"step {i} t={t}")
        x = s.step(out, t, x).prev_sample
        if isinstance(ref, DPMSolverMultistepScheduler):
            ref.step(out, t, x)  # keep ref's internal counter in lockstep (its output is unused)


@pytest.mark.parametrize("kind", KINDS)
def test_x0_and_shift_rule_with_flow_sigmas_match_the_solvers_own(kind):
    """DPM-Solver with ``use_flow_sigmas`` (x_t = (1-k) x0 + k eps) was accepted and given the VP map: x0 off
    by 2.6 (v) or 1e4 (epsilon), and a fused x0 moved 0.11-0.14 where 0.1 was asked. Reference: diffusers'
    ``convert_model_output``, the x0 the solver steps with."""
    g = torch.Generator().manual_seed(3)
    s = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type=kind, use_flow_sigmas=True,
                                    flow_shift=3.0)
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in s.timesteps:
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        if s.step_index is None:
            s._init_step_index(t)
        theirs = s.convert_model_output(out, sample=x)
        torch.testing.assert_close(approx_x0(s, out, t, x), theirs, rtol=1e-6, atol=1e-6)  # float32 sigmas
        moved = s.convert_model_output(out + model_output_shift(s, torch.full_like(x, 0.1), t, x), sample=x)
        torch.testing.assert_close(moved - theirs, torch.full_like(x, 0.1), rtol=0, atol=1e-6)
        x = s.step(out, t, x).prev_sample


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_x0_to_model_output_to_x0(cls, kind):
    g = torch.Generator().manual_seed(1)
    s = make(cls, kind)
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64) * float(s.init_noise_sigma)
    for t in (s.timesteps[0], s.timesteps[len(s.timesteps) // 2], s.timesteps[-1]):
        x0 = torch.randn(x.shape, generator=g, dtype=torch.float64)
        back = approx_x0(s, model_output_for_x0(s, x0, t, x), t, x)
        torch.testing.assert_close(back, x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_modified_x0_reaches_unmodified_step(cls):
    """Handing the implied model output to scheduler.step makes it use the x0 we chose."""
    g = torch.Generator().manual_seed(2)
    s = make(cls, "v_prediction")
    t = s.timesteps[3]
    x = torch.randn(1, 3, 8, 8, generator=g) * float(s.init_noise_sigma)
    x0 = torch.randn(x.shape, generator=g)
    out = model_output_for_x0(s, x0, t, x)
    if cls is DPMSolverMultistepScheduler:
        s._init_step_index(t)
        torch.testing.assert_close(s.convert_model_output(out, sample=x), x0, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(s.step(out, t, x).pred_original_sample, x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_velocity_matches_get_velocity(cls):
    g = torch.Generator().manual_seed(3)
    s = make(cls, "v_prediction")
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(velocity(s, x0, noise, t), s.get_velocity(x0, noise, t))
    torch.testing.assert_close(velocity(s, x0, noise, 999), s.get_velocity(x0, noise, torch.tensor([999] * 4)))


def test_velocity_and_x0_are_inverse_maps():
    """x_t from diffusers' add_noise and v from its get_velocity (reference kind: code not written here);
    our approx_x0 must recover x0 from (x_t, v) at every t, and our velocity must equal get_velocity."""
    s = make(DDPMScheduler, "v_prediction")
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    for t in (0, 400, 999):
        ts = torch.tensor([t] * 3)
        x_t, v = s.add_noise(x0, eps, ts), s.get_velocity(x0, eps, ts)
        torch.testing.assert_close(approx_x0(s, v, t, x_t), x0)
        torch.testing.assert_close(velocity(s, x0, eps, t), v)
        # the step's own x0 agrees too
        s.set_timesteps(1000)
        torch.testing.assert_close(s.step(v, t, x_t).pred_original_sample, x0)


def test_clip_sample_mirrors_ddpm():
    s = DDPMScheduler(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
    s.set_timesteps(5)
    x = torch.zeros(1, 1, 2, 2)
    out = torch.tensor([[[[2.0, -2.0], [0.1, 0.2]]]])
    x0 = approx_x0(s, out, s.timesteps[0], x)
    assert torch.equal(x0, torch.tensor([[[[0.5, -0.5], [0.1, 0.2]]]]))  # clipped, the in-range values kept
    # the reference not written here: diffusers' own step computes the same clipped x0
    torch.testing.assert_close(x0, s.step(out, s.timesteps[0], x).pred_original_sample)


def test_unsupported_scheduler_error_names_supported_ones():
    with pytest.raises(ValueError, match="PNDMScheduler is not supported.*DDPMScheduler.*EulerDiscreteScheduler"):
        check_scheduler(PNDMScheduler())
    with pytest.raises(ValueError, match="thresholding"):
        check_scheduler(DDPMScheduler(thresholding=True))


def test_switching_the_scheduler_kind_does_not_turn_on_x0_clipping():
    """An SD checkpoint's PNDM config has no clip_sample; DDIMScheduler/DDPMScheduler.from_config would then
    clip latent x0 to [-1, 1] (their default), which diffusers' own Stable Diffusion pipelines turn off for
    such a checkpoint (reference: diffusers' StableDiffusionPipeline, which sets clip_sample=False on a
    scheduler config that does not say it). A config that asks for clipping keeps it. ``auto`` keeps the
    checkpoint's DPM-Solver algorithm (first-order dpmsolver: covered, test_parity); ``dpm++`` selects
    dpmsolver++."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    from pipelines.loading import make_scheduler

    sd = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                       skip_prk_steps=True).config
    assert "clip_sample" not in sd and DDIMScheduler.from_config(sd).config.clip_sample  # the trap
    for kind in ("ddim", "ddpm"):
        assert make_scheduler(sd, kind).config.clip_sample is False
    asks = DDIMScheduler(clip_sample=True).config
    assert make_scheduler(asks, "ddpm").config.clip_sample is True
    dpm = DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    first_order = {**dpm.config, "_class_name": type(dpm).__name__}  # as load_config reads it from disk
    assert make_scheduler(first_order, "auto").config.algorithm_type == "dpmsolver"
    assert make_scheduler(first_order, "dpm++").config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("variance", ["fixed_large_log", "learned", "learned_range"])
def test_ddpm_variances_that_cannot_run_are_refused_up_front(variance):
    """They were accepted and gave NaN frames (fixed_large_log) or a TypeError mid-run (learned: the UNet
    has no variance channels), as in diffusers' own pipeline."""
    with pytest.raises(ValueError, match=f"variance_type '{variance}'"):
        check_scheduler(DDPMScheduler(variance_type=variance))
    for ok in ("fixed_small", "fixed_small_log", "fixed_large"):
        check_scheduler(DDPMScheduler(variance_type=ok))


def test_a_checkpoint_with_such_a_variance_names_the_schedulers_that_replace_it(tmp_path):
    """The loader's hint offered scheduler.kind=ddpm, which keeps the checkpoint's variance type."""
    import tiny
    from pipelines.loading import ModelLoadError
    from pipelines.video_pipeline import VideoPipeline

    model = tiny.save_residual_sr(tmp_path / "m")
    DDPMScheduler(variance_type="learned_range").save_pretrained(model / "scheduler")
    with pytest.raises(ModelLoadError, match=r"scheduler.kind=ddim, dpm\+\+ or euler replaces"):
        VideoPipeline.from_pretrained(model)
    with pytest.raises(ModelLoadError, match="variance_type 'learned_range'"):
        VideoPipeline.from_pretrained(model, scheduler_kind="ddpm")
    assert type(VideoPipeline.from_pretrained(model, scheduler_kind="ddim").scheduler).__name__ == "DDIMScheduler"

