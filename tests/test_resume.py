"""Checkpoint/resume of the sampling loop: an interrupted run continues bit-identically."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import tiny
from pipelines.align import Fusion
from pipelines.checkpoint import Checkpointer, WorkdirMismatch
from pipelines.video_pipeline import SamplingOptions, VideoPipeline


class Crash(Exception):
    pass


@pytest.mark.parametrize("kind", ["ddpm", "dpm++"])
def test_interrupted_run_resumes_bit_identically(tmp_path, kind):
    sched = tiny.ddpm_v()
    if kind == "dpm++":  # multistep: the model-output history is part of the state
        sched = DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++")
    pipe = VideoPipeline(tiny.pixel_unet(6), sched, scale=2, residual_scale=0.1)
    clip = tiny.textured_clip(3, 16)
    opts = SamplingOptions(num_inference_steps=5, seed=9, chain_length=2)
    want = pipe(clip, options=opts, alignment=Fusion()).frames

    def crash(s, t, f, x0):
        if s == 3:
            raise Crash

    with pytest.raises(Crash):
        pipe(clip, options=opts, alignment=Fusion(), callback=crash, checkpoint=Checkpointer(tmp_path, "a"))
    ckpt = Checkpointer(tmp_path, "a")
    assert ckpt.state_file.exists()
    steps_seen = set()
    got = pipe(clip, options=opts, alignment=Fusion(), checkpoint=ckpt,
               callback=lambda s, t, f, x0: steps_seen.add(s)).frames
    assert steps_seen == {3, 4}  # steps 0-2 were restored, not recomputed
    assert torch.equal(got, want)


def test_workdir_of_another_configuration_is_refused(tmp_path):
    Checkpointer(tmp_path, "config-a")
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        Checkpointer(tmp_path, "config-b")
