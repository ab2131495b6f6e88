"""Model calls batched ahead of the sweep (pipelines.sampler._Ahead) and the "auto" batch sizes.

Reference kind: the sampler itself with ``batch_size=1`` (every frame evaluated at its own turn, the
loop as it was before the look-ahead), run with a model that evaluates each frame on its own, so
that any difference is the loop's and not floating-point rounding of batched convolutions.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import tiny
from pipelines.align import Alignment, Fusion
from pipelines.config import ConfigError, load_config
from pipelines.flow import FlowConfig, compute_clip_flows
from pipelines.sampler import img2img_timesteps, sample_frames
from pipelines.tcm import TCMAlignment
from pipelines.video_pipeline import auto_batch
from pipelines.windows import Anchored

F, STEPS = 7, 4


class PerFrameModel:
    """A fixed random convolution applied frame by frame; records the batch size of every call and
    the frames' ``hint`` (the neighbour-dependent input an alignment may pass)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 6, 3, 3, generator=g) * 0.2
        self.calls: list[int] = []
        self.pending: list[int] = []
        self.evaluated = self.visited = 0

    def visit(self, *_):
        self.visited += 1

    def __call__(self, x, t, concat=None, hint=None):
        self.calls.append(len(x))
        self.pending.append(self.evaluated - self.visited)  # evaluated earlier, turn not yet come
        self.evaluated += len(x)
        outs = []
        for k in range(len(x)):
            inp = torch.cat([x[k:k + 1], concat[k:k + 1]], 1)
            out = torch.tanh(torch.nn.functional.conv2d(inp, self.w, padding=1)) * (1 + float(t) / 1000)
            if hint is not None:
                out = out + 0.5 * hint[k:k + 1]
            outs.append(out)
        return torch.cat(outs)


class Hinted(Fusion):
    """An alignment whose *model input* depends on the neighbour's x0 from this sweep (like the TCM)."""

    conditions_model = True

    def model_kwargs(self, nb, t):
        if nb is None or nb.x0 is None:
            return {}
        return dict(hint=nb.x0 * nb.present.view(-1, 1, 1, 1))


@pytest.fixture(scope="module")
def clip():
    frames = tiny.textured_clip(F, 16, shift=(1.0, 0.5))
    return frames, compute_clip_flows(frames, FlowConfig())


def run(clip, scheduler, alignment, batch, chain=None):
    frames, flows = clip
    model = PerFrameModel()
    timesteps = img2img_timesteps(scheduler, STEPS, 1.0)
    latents = torch.randn(frames.shape, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(10 + f) for f in range(F)]
    out = sample_frames(model, scheduler, latents, timesteps, generators=gens, concat=frames, alignment=alignment,
                        flows=flows, batch_size=batch, chain_length=chain, callback=model.visit)
    # evaluated just in time: a call comes when fewer than a batch of evaluated frames wait for their turn
    # (none at all in the exact sweep, where every position is one frame)
    assert max(model.pending) < batch and (chain is not None or max(model.pending) == 0)
    return out, model.calls


@pytest.mark.parametrize("make_scheduler", [
    tiny.ddpm_v,  # stochastic, stepped per batch with each frame's generator
    lambda: DDIMScheduler.from_config(tiny.ddpm_v().config),
    lambda: DPMSolverMultistepScheduler.from_config(tiny.ddpm_v().config),  # stepped after the sweep
], ids=["ddpm", "ddim", "dpm++"])
def test_fusion_evaluated_ahead_is_the_sweep_bit_for_bit(clip, make_scheduler):
    one, calls_one = run(clip, make_scheduler(), Fusion(0.7), batch=1)
    ahead, calls_ahead = run(clip, make_scheduler(), Fusion(0.7), batch=3)
    assert torch.equal(one, ahead)
    assert calls_one == [1] * (F * STEPS)
    assert calls_ahead == [3, 3, 1] * STEPS  # 7 frames, batches of 3 along each sweep
    # the sweep still matters: fusion changes the result, so the equality above is not vacuous
    none, _ = run(clip, make_scheduler(), Alignment(), batch=1)
    assert not torch.allclose(none, one, atol=1e-3)


def test_chains_evaluated_ahead_are_bit_for_bit(clip):
    one, _ = run(clip, tiny.ddpm_v(), Fusion(0.7), batch=1, chain=3)
    ahead, calls = run(clip, tiny.ddpm_v(), Fusion(0.7), batch=4, chain=3)
    assert torch.equal(one, ahead)
    assert max(calls) == 4 and sum(calls) == F * STEPS


def test_a_neighbour_conditioned_model_is_never_evaluated_ahead(clip):
    one, _ = run(clip, tiny.ddpm_v(), Hinted(0.7), batch=1)
    batched, calls = run(clip, tiny.ddpm_v(), Hinted(0.7), batch=4)
    assert calls == [1] * (F * STEPS)  # the exact sweep: one frame per call
    assert torch.equal(one, batched)
    # evaluated ahead, the hint would be missing or stale: the result differs
    unhinted, _ = run(clip, tiny.ddpm_v(), Fusion(0.7), batch=1)
    assert not torch.allclose(unhinted, one, atol=1e-3)


def test_tcm_conditions_the_model_only_inside_its_window():
    tcm = TCMAlignment(start=0.5)
    states = []
    for s in range(4):
        tcm.begin_step(s, 4)
        states.append(tcm.conditions_model)
    assert states == [False, False, True, True]  # steps without the TCM may be evaluated ahead
    anchored = Anchored(tcm, {}, 0.5)  # long clips' windows wrap the alignment
    anchored.begin_step(0, 4)
    assert not anchored.conditions_model
    anchored.begin_step(2, 4)
    assert anchored.conditions_model and not Anchored(Fusion(0.5), {}, 0.5).conditions_model


def test_auto_batch_sizes():
    assert auto_batch("cpu", 64 * 64) == 16  # latent UNet inputs
    assert auto_batch("cpu", 128 * 128) == 4
    assert auto_batch("cpu", 256 * 256) == 1  # pixel UNet, VAE decoder outputs
    assert auto_batch("cpu", 1024 * 1024) == 1
    assert auto_batch("cpu", 8 * 8) == 16
    assert auto_batch(torch.device("cuda"), 256 * 256) == 8  # no GPU needed to name one


def test_batch_size_zero_is_auto_and_negative_is_an_error():
    assert load_config(None, ["sampling.batch_size=0"]).sampling.batch_size == 0
    with pytest.raises(ConfigError, match="sampling.batch_size must be >= 0"):
        load_config(None, ["sampling.batch_size=-1"])
    with pytest.raises(ConfigError, match="sampling.decode_batch_size must be >= 0"):
        load_config(None, ["sampling.decode_batch_size=-2"])
