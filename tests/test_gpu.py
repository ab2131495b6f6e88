"""CUDA-only checks (skipped where no CUDA device is present; run them with benchmarks/gpu.sh).

* fp16 and bf16 against fp32 on one short clip for each model kind: PSNR >= 40 dB between them;
* every tensor a model sees is on the configured device;
* no device-to-host copy (a host sync) inside the sampler's per-frame loop.
"""
import copy
from contextlib import contextmanager

import pytest
import torch

import tiny
from pipelines.align import Fusion
from pipelines.metrics import psnr
from pipelines.tcm import TCMAlignment
from pipelines.video_pipeline import SamplingOptions, VideoPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"


def _pipes(tmp_path_factory, device=None):
    """(name, pipeline factory for a dtype, input clip, alignment factory) for each model kind on
    ``device`` (default: CUDA; tests/test_half_precision.py runs them on the CPU)."""
    device = device or DEVICE
    layout = tiny.save_stablevsr_layout(tmp_path_factory.mktemp("svsr"))
    sr = tiny.save_residual_sr(tmp_path_factory.mktemp("sr"), scale=2)
    enc, tok = tiny.clip_parts(tmp_path_factory.mktemp("clip"))

    def img2img(dtype):
        return VideoPipeline(tiny.cond_unet().to(device, dtype), tiny.ddpm_v(), vae=tiny.vae().to(device, dtype),
                             text_encoder=copy.deepcopy(enc).to(device, dtype), tokenizer=tok)  # (to() is in place)

    return [
        ("residual_sr", lambda dt: VideoPipeline.from_pretrained(sr, device=device, dtype=dt),
         tiny.textured_clip(4, 16), lambda: Fusion(0.3)),
        ("upscale+tcm", lambda dt: VideoPipeline.from_pretrained(layout, device=device, dtype=dt),
         tiny.textured_clip(4, 8), TCMAlignment),
        ("img2img", img2img, tiny.textured_clip(4, 32), lambda: Fusion(0.3)),
    ]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return _pipes(tmp_path_factory)


@contextmanager
def true_fp32():
    """fp32 without TF32: CUDA convolutions default to TF32 (a 10-bit mantissa, like fp16's), which would
    make the "fp32" reference itself a reduced-precision run."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def half_precision_scores(kinds, dtype) -> dict:
    """PSNR of each kind's ``dtype`` run against its fp32 run, and of a second fp32 run against the first."""
    opts = SamplingOptions(num_inference_steps=4, seed=3)
    scores = {}
    for name, make, clip, align in kinds:  # every kind is measured before any assertion
        with true_fp32():
            ref = make(torch.float32)(clip, options=opts, alignment=align()).frames
            again = make(torch.float32)(clip, options=opts, alignment=align()).frames
        got = make(dtype)(clip, options=opts, alignment=align()).frames
        scores[name] = round(float(psnr(got.float(), ref.float())), 2)
        # a diagnosis as well as a check: fp32 twice on the device must agree (else the gap is not precision)
        scores[f"{name} fp32 repeat"] = round(float(psnr(again.float(), ref.float())), 2)
    return scores


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_fp32(kinds, dtype):
    scores = half_precision_scores(kinds, dtype)
    # a plain string: pytest shortens a dict's repr and hid the last kinds' figures on the H100 lease
    assert all(v >= 40 for v in scores.values()), "; ".join(f"{k}: {v}" for k, v in scores.items())


@torch.no_grad()
def test_every_model_input_is_on_the_configured_device(kinds):
    def inputs(mod, args, kw):
        """(model, argument, device) of each tensor input except the timestep (the sampler keeps
        timesteps on the host and diffusers moves them: positional argument 1 or ``timestep``)."""
        named = [(f"arg{i}", a) for i, a in enumerate(args) if i != 1]
        named += [(k, a) for k, a in kw.items() if k != "timestep"]
        return [(type(mod).__name__, k, a.device.type) for k, a in named if torch.is_tensor(a)]

    wrong, counts = {}, {}
    for name, make, clip, align in kinds:  # every kind is checked before any assertion
        pipe = make(torch.float32)
        seen = []
        hooks = [m.register_forward_pre_hook(lambda mod, args, kw: seen.extend(inputs(mod, args, kw)),
                                             with_kwargs=True) for m in (pipe.unet, pipe.controlnet) if m is not None]
        pipe(clip, options=SamplingOptions(num_inference_steps=2), alignment=align())
        for h in hooks:
            h.remove()
        counts[name] = len(seen)
        wrong[name] = sorted({s for s in seen if s[2] != "cuda"})
    assert all(counts.values()) and not any(wrong.values()), (counts, wrong)


@torch.no_grad()
def test_no_device_to_host_copy_inside_the_per_frame_loop(kinds, monkeypatch):
    """Profile only the sampler loop (not flow, encoding or decoding): no Memcpy DtoH events."""
    import pipelines.video_pipeline as vp
    from torch.profiler import ProfilerActivity, profile

    real = vp.sample_frames
    found = {}

    def profiled(*args, **kwargs):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = real(*args, **kwargs)
            torch.cuda.synchronize()
        found["dtoh"] = [e.name for e in prof.events() if "DtoH" in e.name or "Memcpy DtoH" in e.name]
        return out

    monkeypatch.setattr(vp, "sample_frames", profiled)
    copies = {}
    for name, make, clip, align in kinds:  # every kind is checked before any assertion
        make(torch.float32)(clip, options=SamplingOptions(num_inference_steps=2), alignment=align())
        copies[name] = len(found["dtoh"])
    assert not any(copies.values()), copies
