"""Chains: lockstep-batched sweeps (issue 8)."""
import torch
from diffusers import DDIMScheduler

import tiny
from pipelines.align import Fusion
from pipelines.denoiser import Denoiser
from pipelines.flow import FlowConfig, compute_clip_flows
from pipelines.sampler import img2img_timesteps, initial_noise
from pipelines.sweep import chain_starts, plan_sweep, step_directions
from pipelines.video_pipeline import SamplingOptions, VideoPipeline
from schedulers import approx_x0, model_output_for_x0


def pipe_ddim():
    return VideoPipeline(tiny.pixel_unet(6), DDIMScheduler.from_config(tiny.ddpm_v().config), scale=2,
                         residual_scale=0.1)


def test_chain_length_n_is_the_exact_sweep_bit_for_bit():
    clip = tiny.textured_clip(6, 16)
    pipe = VideoPipeline(tiny.pixel_unet(6), tiny.ddpm_v(), scale=2, residual_scale=0.1)
    # one batch size throughout: fusion's model calls are batched ahead of the sweep (pipelines.sampler),
    # and a batch of another size may round differently
    opts = dict(num_inference_steps=4, seed=3, batch_size=4)
    exact = pipe(clip, options=SamplingOptions(**opts), alignment=Fusion(0.6)).frames
    chained = pipe(clip, options=SamplingOptions(**opts, chain_length=6), alignment=Fusion(0.6)).frames
    longer = pipe(clip, options=SamplingOptions(**opts, chain_length=50), alignment=Fusion(0.6)).frames
    assert torch.equal(exact, chained) and torch.equal(exact, longer)


def test_seams_move_every_step():
    log = []
    pipe_ddim()(tiny.textured_clip(8, 16), options=SamplingOptions(num_inference_steps=4, chain_length=4),
                alignment=Fusion(), chain_log=log)
    assert log == [[0, 4], [0, 2, 6], [0, 4], [0, 2, 6]]
    assert chain_starts(10, 4, 1) == [0, 2, 6] and chain_starts(10, 4, 2) == [0, 4, 8]
    # a chain start aligns to the neighbouring chain's x0 from the previous step
    visits = plan_sweep(8, 1, chain_length=4, step=1)
    first = {v.frame: v for v in visits[0]}
    assert first[2].neighbour == 1 and not first[2].fresh and first[0].neighbour is None
    assert all(v.fresh for p in visits[1:] for v in p)


def sequential_reference(pipe, clip, steps, L, fusion):
    """Chains run one after another, one frame per model call, with the same alignment inputs:
    a chain start reads its neighbour's x0 from a snapshot taken at the start of the step."""
    sched = pipe.scheduler
    timesteps = img2img_timesteps(sched, steps, 1.0)
    F = len(clip)
    gens = [torch.Generator().manual_seed(f) for f in range(F)]
    cond = pipe.conditioning_frames(clip)
    flows = compute_clip_flows(cond, FlowConfig())
    x = initial_noise((F, 3, *cond.shape[-2:]), gens, "cpu", torch.float32) * sched.init_noise_sigma
    den = Denoiser(pipe.unet, sched)
    x0_buf, out_buf = torch.zeros_like(x), torch.zeros_like(x)
    from pipelines.align import Neighbours

    for s, (t, d) in enumerate(zip(timesteps, step_directions(len(timesteps)))):
        snapshot = x0_buf.clone()
        starts = chain_starts(F, L, s)
        for a, b in zip(starts, starts[1:] + [F]):
            chain = list(range(a, b))[::d]
            for k, f in enumerate(chain):
                n = chain[k - 1] if k > 0 else f - d
                src = x0_buf if k > 0 else snapshot
                ok = 0 <= n < F and (k > 0 or s > 0)
                flow = flows.to_prev[f:f + 1] if n < f else flows.to_next[f:f + 1]
                mask = (flows.valid_prev if n < f else flows.valid_next)[f:f + 1] * float(ok)
                nb = Neighbours(torch.tensor([f]), torch.tensor([n if ok else -1]), torch.tensor([ok]),
                                src[n if ok else f][None].clone(), flow, mask)
                out = den(x[f:f + 1], t, concat=cond[f:f + 1])
                x0 = fusion.fuse(approx_x0(sched, out, t, x[f:f + 1]), nb, t)
                x0_buf[f] = x0[0]
                out_buf[f] = model_output_for_x0(sched, x0, t, x[f:f + 1])[0]
        x = sched.step(out_buf, t, x, generator=gens).prev_sample
    return cond + pipe.residual_scale * x


@torch.no_grad()
def test_lockstep_equals_sequential_chains():
    clip = tiny.textured_clip(7, 16, shift=(1.0, 0.5))
    pipe = pipe_ddim()
    got = pipe(clip, options=SamplingOptions(num_inference_steps=4, seed=0, chain_length=3, batch_size=8),
               alignment=Fusion(0.7, space="sample")).frames
    want = sequential_reference(pipe, clip, 4, 3, Fusion(0.7, space="sample")).clamp(-1, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    exact = pipe(clip, options=SamplingOptions(num_inference_steps=4, seed=0), alignment=Fusion(0.7, space="sample")).frames
    assert (exact - got).abs().max() > 1e-3  # chains are a different (approximate) sweep


def test_none_alignment_batches_all_frames(monkeypatch):
    pipe = pipe_ddim()
    sizes = []
    real = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: (sizes.append(x.shape[0]), real(x, *a, **k))[1])
    pipe(tiny.textured_clip(5, 16), options=SamplingOptions(num_inference_steps=2, batch_size=3))
    assert sizes == [3, 2, 3, 2]
