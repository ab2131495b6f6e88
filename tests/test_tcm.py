"""StableVSR's TCM alignment mode on tiny components with StableVSR's exact layout."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny
from pipelines.flow import FlowConfig, compute_clip_flows
from pipelines.tcm import TCMAlignment
from pipelines.video_pipeline import SamplingOptions, VideoPipeline


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return tiny.save_stablevsr_layout(tmp_path_factory.mktemp("stablevsr"))


@pytest.fixture(scope="module")
def pipe(layout):
    p = VideoPipeline.from_pretrained(layout)
    assert p.upscale_convention() == "stablevsr"  # a ControlNet and no class embedding
    return p


def test_layout_loads_through_real_loading_code(pipe):
    assert pipe.kind == "upscale" and pipe.scale == 4
    assert pipe.controlnet is not None and pipe.text_encoder is not None
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.in_channels == 7


def reference_warp(x, flow, align_corners=True):
    """Independent backward warp: sample x at p + flow(p) (pixel units normalised by (W-1, H-1), bilinear,
    zeros outside). ``align_corners=False`` is StableVSR's flow_warp as its util/flow_utils.py writes it."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) / (w - 1) * 2 - 1
    gy = (ys + flow[:, 1]) / (h - 1) * 2 - 1
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="zeros",
                         align_corners=align_corners)


def reference_stablevsr(pipe, lr, flows, steps, seed, scale, align_corners=True):
    """A plain StableVSR sampler following the facts of the original code (claudiom4sir/StableVSR,
    pipeline/stablevsr_pipeline.py; reference kind: a re-statement of code not written here):
    the low-res frame in [-1, 1] (VaeImageProcessor, do_normalize=True) concatenated without noise,
    no class labels for the UNet or the ControlNet, per-frame latents, ``scheduler.step`` right after
    each frame, its ``pred_original_sample`` decoded, warped onto the next frame of the sweep and fed
    to the TCM, and the frame order reversed every step."""
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(seed + f) for f in range(len(lr))]
    tok = pipe.tokenizer("", padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    emb = pipe.text_encoder(tok.input_ids)[0]
    latents = [torch.randn((1, 4, *lr.shape[-2:]), generator=g) * sched.init_noise_sigma for g in gens]
    order = list(range(len(lr)))
    for t in sched.timesteps:
        prev_x0, prev_f = None, None
        for f in order:
            inp = torch.cat([sched.scale_model_input(latents[f], t), lr[f:f + 1]], 1)
            extra = {}
            if prev_x0 is not None:
                rgb = pipe.vae.decode(prev_x0 / pipe.vae.config.scaling_factor).sample
                flow = flows.to_prev[f:f + 1] if prev_f < f else flows.to_next[f:f + 1]
                down, mid = pipe.controlnet(inp, t, encoder_hidden_states=emb, return_dict=False,
                                            controlnet_cond=reference_warp(rgb, flow, align_corners))
                extra = dict(down_block_additional_residuals=[d * scale for d in down],
                             mid_block_additional_residual=mid * scale)
            v = pipe.unet(inp, t, encoder_hidden_states=emb, **extra).sample
            step = sched.step(v, t, latents[f], generator=gens[f])
            latents[f], prev_x0, prev_f = step.prev_sample, step.pred_original_sample, f
        order.reverse()
    out = [pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample for x in latents]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
@pytest.mark.parametrize("warp_mode", ["exact", "stablevsr"])
def test_parity_with_plain_stablevsr_sampler(pipe, warp_mode):
    lr = tiny.textured_clip(3, 8, shift=(0.5, 0.25))
    cond = pipe.conditioning_frames(lr)
    flows = compute_clip_flows(cond, FlowConfig())
    want = reference_stablevsr(pipe, lr, flows, steps=3, seed=4, scale=0.8, align_corners=warp_mode == "exact")
    got = pipe(lr, options=SamplingOptions(num_inference_steps=3, seed=4), flows=flows,
               alignment=TCMAlignment(scale=0.8, warp_mode=warp_mode)).frames
    without = pipe(lr, options=SamplingOptions(num_inference_steps=3, seed=4), flows=flows).frames
    print("parity max diff", (got - want).abs().max().item(), "tcm effect", (without - got).abs().max().item())
    # float32 round-off (x0 coefficients, batched vs per-frame steps) amplified by the VAE decoder: measured 6e-5
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert (without - got).abs().max() > 100 * 2e-4  # the TCM really changes the result


@torch.no_grad()
def test_old_unit_range_would_fail_parity(pipe):
    """The [0, 1] low-res range the old config used is far from the original's [-1, 1]: the parity
    test above would catch it (measured max difference ~0.1 on this tiny model)."""
    lr = tiny.textured_clip(3, 8, shift=(0.5, 0.25))
    flows = compute_clip_flows(pipe.conditioning_frames(lr), FlowConfig())
    want = reference_stablevsr(pipe, lr, flows, steps=3, seed=4, scale=0.8)
    wrong = pipe((lr + 1) / 2, options=SamplingOptions(num_inference_steps=3, seed=4), flows=flows,
                 alignment=TCMAlignment(scale=0.8)).frames
    assert (wrong - want).abs().max() > 1e-2


def test_stablevsr_convention_passes_no_class_labels(layout, pipe, monkeypatch):
    """The StableVSR convention gives neither the UNet nor the ControlNet class labels and feeds the
    low-res frame unnoised; it refuses a UNet with a class embedding; sd_upscaler passes the noise level
    as the label and noises the frame."""
    seen = {"unet": [], "controlnet": []}
    for name in seen:
        module = getattr(pipe, name)
        fwd = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _n=name, _f=fwd, **k: (
            seen[_n].append((k.get("class_labels"), a[0][:, 4:] if _n == "unet" else None)), _f(*a, **k))[1])
    lr = tiny.textured_clip(2, 8, shift=(0.5, 0.0))
    pipe(lr, options=SamplingOptions(num_inference_steps=2, batch_size=1), alignment=TCMAlignment())
    assert seen["controlnet"] and all(labels is None for labels, _ in seen["controlnet"])
    assert len(seen["unet"]) == 4 and all(labels is None for labels, _ in seen["unet"])
    assert all(any(torch.equal(concat[0], f) for f in lr) for _, concat in seen["unet"])  # the frame as given
    monkeypatch.undo()
    unet = tiny.cond_unet(in_channels=7, class_embed=True)
    p = VideoPipeline(unet, tiny.ddpm_v(), vae=tiny.vae(down=3), scale=4, convention="stablevsr",
                      text_encoder=VideoPipeline.from_pretrained(layout).text_encoder,
                      tokenizer=VideoPipeline.from_pretrained(layout).tokenizer,
                      low_res_scheduler=tiny.ddpm_v().__class__())
    with pytest.raises(ValueError, match="class labels"):
        p(tiny.textured_clip(2, 8), options=SamplingOptions(num_inference_steps=1))
    seen = []
    real = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: (seen.append((k.get("class_labels"), a[0][:, 4:])),
                                                           real(*a, **k))[1])
    p.convention = "sd_upscaler"
    lr = tiny.textured_clip(2, 8)
    p(lr, options=SamplingOptions(num_inference_steps=1, noise_level=20))
    labels, concat = seen[-1]
    assert labels is not None and int(labels[0]) == 20 and (concat - lr).abs().max() > 1e-3


@torch.no_grad()
def test_one_frame_clip_runs_with_tcm(pipe):
    """A frame with no neighbour gets no TCM: a one-frame clip samples exactly as without alignment."""
    clip, opts = tiny.textured_clip(1, 8), SamplingOptions(num_inference_steps=2, seed=3)
    out = pipe(clip, options=opts, alignment=TCMAlignment())
    assert out.frames.shape == (1, 3, 32, 32) and torch.isfinite(out.frames).all()
    assert torch.equal(out.frames, pipe(clip, options=opts).frames)


@torch.no_grad()
def test_first_frame_of_each_sweep_gets_no_tcm(pipe, monkeypatch):
    calls = []
    real_unet, real_cn = pipe.unet.forward, pipe.controlnet.forward
    monkeypatch.setattr(pipe.controlnet, "forward", lambda *a, **k: (calls.append("tcm"), real_cn(*a, **k))[1])
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: (
        calls.append("unet+tcm" if "down_block_additional_residuals" in k else "unet"), real_unet(*a, **k))[1])
    tcm = TCMAlignment()
    seen = []
    pipe(tiny.textured_clip(3, 8), options=SamplingOptions(num_inference_steps=2), alignment=tcm,
         callback=lambda s, t, f, x0: seen.append(f))
    per_frame = [c for c in calls if c.startswith("unet")]
    assert seen == [0, 1, 2, 2, 1, 0]
    assert per_frame == ["unet", "unet+tcm", "unet+tcm"] * 2
    assert calls.count("tcm") == 4
    # each neighbour x0 decoded once per step: forward sweep decodes 0, 1; backward decodes 2, 1
    assert tcm.decoded_frames == [0, 1, 2, 1]


@torch.no_grad()
def test_masked_guidance_zeroes_occluded_condition_and_fusion_option(pipe, monkeypatch):
    from pipelines.align import Fusion

    lr = tiny.textured_clip(3, 8, shift=(2.0, 0.0))
    conds = []
    real_cn = pipe.controlnet.forward
    monkeypatch.setattr(pipe.controlnet, "forward",
                        lambda *a, **k: (conds.append(k["controlnet_cond"].clone()), real_cn(*a, **k))[1])
    opts = SamplingOptions(num_inference_steps=1, seed=1)
    res = pipe(lr, options=opts, alignment=TCMAlignment())
    plain = conds[0]
    conds.clear()
    pipe(lr, options=opts, alignment=TCMAlignment(masked=True))
    mask = res.flows.valid_prev[1:2]  # frame 1 aligned to frame 0 in the forward sweep
    assert 0 < mask.mean() < 1
    assert conds[0][mask.expand_as(conds[0]) == 0].abs().max() == 0
    torch.testing.assert_close(conds[0], plain * mask)
    base = pipe(lr, options=opts, alignment=TCMAlignment()).frames
    fused = pipe(lr, options=opts, alignment=TCMAlignment(fusion=Fusion(0.5))).frames
    assert (base - fused).abs().max() > 1e-3


def test_tcm_needs_a_controlnet():
    p = VideoPipeline(tiny.pixel_unet(6), tiny.ddpm_v(), scale=2, residual_scale=0.1)
    with pytest.raises(ValueError, match="controlnet"):
        p(tiny.textured_clip(2, 8), options=SamplingOptions(num_inference_steps=1), alignment=TCMAlignment())


def test_stablevsr_config_runs_end_to_end_on_tiny_layout(layout, tmp_path):
    """`run_video.py --config configs/stablevsr.yaml` on the tiny same-layout checkpoint (no download)."""
    import json

    from pipelines.video_io import read_clip, to_uint8, write_video
    from run_video import main

    clip = tmp_path / "lr.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 8)), 12)
    out = tmp_path / "sr.mp4"
    code = main(["--config", "configs/stablevsr.yaml", "--input", str(clip), "--output", str(out),
                 f"model.path={layout}", "sampling.num_inference_steps=2", "runtime.threads=1"])
    assert code == 0
    video = read_clip(out)
    assert video.frames.shape == (3, 32, 32, 3) and video.fps == 12
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model_kind"] == "upscale" and report["config"]["alignment"]["mode"] == "tcm"
    assert report["config"]["model"]["convention"] == "stablevsr" and report["timings"]["vae"] > 0
    assert report["config"]["alignment"]["tcm_warp"] == "stablevsr"


def test_stablevsr_config_samples_with_ddpm_whatever_class_the_checkpoint_names(layout, tmp_path):
    """Reference kind: the original's test.py (read, not run), which replaces the checkpoint's scheduler by
    ``DDPMScheduler.from_pretrained(model_id, subfolder='scheduler')``; the SD x4 upscaler StableVSR starts
    from stores a DDIMScheduler config, as far as we know. configs/stablevsr.yaml would run such a DDIM (kind
    auto): a checkpoint whose
    scheduler folder names DDIM must give the frames of one naming DDPM with the same numbers."""
    import shutil

    from diffusers import DDIMScheduler, DDPMScheduler

    from pipelines.video_io import read_clip, to_uint8, write_video
    from run_video import main

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    folders = {}
    for name, scheduler in (("ddim", ddim), ("ddpm", DDPMScheduler.from_config(ddim.config))):
        folders[name] = tmp_path / name
        shutil.copytree(layout, folders[name], ignore=shutil.ignore_patterns("scheduler"))
        scheduler.save_pretrained(folders[name] / "scheduler")
    clip = tmp_path / "lr.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 8)), 12)

    def frames(name, *extra):
        out = tmp_path / f"{name}{len(extra)}"
        code = main(["--config", "configs/stablevsr.yaml", "--input", str(clip), "--output", str(out / "o.mp4"),
                     f"model.path={folders[name]}", "sampling.num_inference_steps=3", "runtime.threads=1",
                     f"output.frames_dir={out / 'png'}", *extra])
        assert code == 0
        return read_clip(out / "png").frames

    want = frames("ddpm")
    np.testing.assert_array_equal(frames("ddim"), want)
    assert np.abs(frames("ddim", "scheduler.kind=auto").astype(int) - want).max() > 2  # DDIM really differs


def test_an_upscaler_takes_odd_sizes_unpadded_as_the_original_does(layout, tmp_path, capsys):
    """The job padded a 9x11 input to 10x12 for this tiny upscaler (to 16x16 for the shipped one, whose UNet
    downsamples 8x), which changes the border and the flow there; the original StableVSR and diffusers' upscale
    pipeline give UNet2DConditionModel any size (it upsamples to each skip's size). Reference kind: the library run on the unpadded frames (this
    project's); measured on the example clip cropped to 60x58 and 61x63, no padding was +0.03 dB."""
    from pipelines.video_io import read_clip, to_tensor, to_uint8, write_frames
    from run_video import main

    lr = to_uint8(tiny.textured_clip(3, 16))[:, :9, :11]
    write_frames(tmp_path / "lr", lr)
    code = main(["--config", "configs/stablevsr.yaml", "--input", str(tmp_path / "lr"), "--output",
                 str(tmp_path / "o.mp4"), f"model.path={layout}", "sampling.num_inference_steps=2",
                 "runtime.threads=1", "alignment.mode=none", f"output.frames_dir={tmp_path / 'png'}"])
    assert code == 0 and "padding" not in capsys.readouterr().out
    got = read_clip(tmp_path / "png").frames
    with torch.no_grad():
        want = to_uint8(VideoPipeline.from_pretrained(layout, scheduler_kind="ddpm")(
            to_tensor(lr), options=SamplingOptions(num_inference_steps=2, seed=42, batch_size=1)).frames)
    assert got.shape == (3, 36, 44, 3)
    np.testing.assert_array_equal(got, want)


@torch.no_grad()
def test_windows_one_frame_last_window_with_tcm_and_batched_none(pipe, monkeypatch):
    from pipelines.align import Alignment
    from pipelines.windows import sample_windowed

    lr = tiny.textured_clip(4, 8, shift=(0.5, 0.0))
    opts = SamplingOptions(num_inference_steps=2, batch_size=8)
    out = sample_windowed(pipe, lr, window=3, overlap=0, anchor_weight=0.8, make_alignment=TCMAlignment,
                          options=opts)  # windows (0, 3) and (3, 4): the last one has a single frame
    assert out.shape == (4, 32, 32, 3)
    # the lone frame has no neighbour in its window, so no TCM: it samples as with no alignment
    alone = sample_windowed(pipe, lr, window=3, overlap=0, anchor_weight=0.8, make_alignment=Alignment, options=opts)
    assert np.array_equal(out[3], alone[3]) and not np.array_equal(out[:3], alone[:3])  # the TCM acted before
    sizes = []
    real = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: (sizes.append(x.shape[0]), real(x, *a, **k))[1])
    sample_windowed(pipe, lr, window=3, overlap=1, anchor_weight=0.8, make_alignment=Alignment, options=opts)
    assert sizes == [3, 3, 2, 2]  # alignment none: each window's frames in one batch, anchors included


@torch.no_grad()
def test_tcm_guidance_window_skips_steps_like_stablevsr(pipe, monkeypatch):
    """tcm_start/tcm_end follow the original's controlnet_keep: step i of N keeps the TCM unless
    i / N < start or (i + 1) / N > end; skipped steps decode nothing."""
    calls = []
    real = pipe.controlnet.forward
    monkeypatch.setattr(pipe.controlnet, "forward", lambda *a, **k: (calls.append(int(a[1])), real(*a, **k))[1])
    seen_t = []
    tcm = TCMAlignment(end=0.5)
    pipe(tiny.textured_clip(3, 8), options=SamplingOptions(num_inference_steps=4), alignment=tcm,
         callback=lambda s, t, f, x0: seen_t.append(int(t)))
    first_two = sorted(set(seen_t[:6]), reverse=True)  # the timesteps of steps 0 and 1
    assert sorted(set(calls), reverse=True) == first_two and len(calls) == 4  # 2 frames x 2 steps
    assert tcm.decoded_frames == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="start < end"):
        TCMAlignment(start=0.6, end=0.5)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["tcm", "decoded"])
def test_decodes_during_sampling_keep_to_the_decode_batch(pipe, mode):
    """The TCM's conditions and decoded-space fusion decoded a whole sampling batch (fusion: twice that) per VAE
    call while the job's memory check allowed for sampling.decode_batch_size frames: a large frame could run out
    of memory mid-run. Now chunked, with the same frames (to float rounding)."""
    from pipelines.align import DecodedFusion

    sizes = []
    real = pipe.vae.decode

    def spy(z, *args, **kwargs):
        sizes.append(len(z))
        return real(z, *args, **kwargs)

    clip = tiny.textured_clip(4, 8, shift=(0.6, 0.3))
    make = TCMAlignment if mode == "tcm" else lambda: DecodedFusion(0.5)
    runs = {}
    pipe.vae.decode = spy
    try:
        for batch in (0, 1):
            sizes.clear()
            opts = SamplingOptions(num_inference_steps=2, batch_size=4, decode_batch_size=batch, seed=2,
                                   chain_length=2)  # two chains: two frames per batch
            runs[batch] = pipe(clip, options=opts, alignment=make()).frames
            during = sizes[:-4] if batch == 1 else sizes[:-1]  # the final decode: 4 calls of 1, or one of 4
            assert (max(during) == 1) if batch == 1 else (max(during) > 1), sizes
    finally:
        del pipe.vae.decode
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)
