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


def _model_job(tmp_path):
    """A tiny model, a 3-frame clip and a 2-step job whose work folder holds a finished run's state."""
    from pipelines.config import load_config
    from pipelines.video_io import to_uint8, write_video

    model = tiny.save_residual_sr(tmp_path / "m", scale=2)
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 24, shift=(0.8, 0.4))), 10)

    def run(path=model):
        from pipelines.job import run_clip

        cfg = load_config(None, [f"model.path={path}", "sampling.num_inference_steps=2", "runtime.threads=1",
                                 "alignment.mode=fusion"])
        return run_clip(cfg, clip, tmp_path / "out.mp4", workdir=tmp_path / "work", overwrite=True,
                        log=lambda m: None, progress=False)

    run()
    assert (tmp_path / "work" / "state.safetensors").exists()
    return model, run


@pytest.mark.parametrize("change", ["unet weights", "vsr_config.json", "scheduler config"])
def test_a_model_changed_in_place_is_refused(tmp_path, change):
    """The fingerprint held the model's path, not its files: weights retrained (or a config edited) in the same
    folder resumed the old model's saved state under the new model, a mix of the two."""
    import json

    from safetensors.torch import load_file, save_file

    model, run = _model_job(tmp_path)
    if change == "unet weights":
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({k: v * 1.5 for k, v in load_file(weights).items()}, weights)
    elif change == "vsr_config.json":
        (model / "vsr_config.json").write_text(json.dumps({"scale": 2, "residual_scale": 0.3}))
    else:
        sched = model / "scheduler" / "scheduler_config.json"
        sched.write_text(json.dumps({**json.loads(sched.read_text()), "beta_schedule": "linear"}))
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        run()


def test_the_same_model_folder_by_another_path_resumes(tmp_path, monkeypatch):
    """Relative, absolute or a copy elsewhere: the same files make the same job (the path string refused it)."""
    import shutil

    model, run = _model_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    run("m")
    shutil.copytree(model, tmp_path / "copy")
    run(tmp_path / "copy")


def test_the_fingerprint_follows_the_raft_weights_contents(tmp_path, monkeypatch):
    """flow.raft_weights counted as a path: new weights in the same file resumed the old flows' state."""
    from omegaconf import OmegaConf

    from pipelines.config import JobConfig
    from pipelines.job import fingerprint

    frames = tiny.textured_clip(2, 8)
    weights = tmp_path / "raft.pth"
    weights.write_bytes(b"first weights")
    pipe = VideoPipeline(tiny.pixel_unet(6, (8, 16)), tiny.ddpm_v(), scale=2, residual_scale=0.1)

    def key(path, method="raft"):
        cfg = OmegaConf.structured(JobConfig)  # not validated: flow.method=raft needs torchvision to load
        cfg.flow.method, cfg.flow.raft_weights = method, str(path)
        return fingerprint(cfg, pipe, lambda a, b: frames[a:b], 2)

    first = key(weights)
    monkeypatch.chdir(tmp_path)
    assert key("raft.pth") == first  # the same file by another path
    weights.write_bytes(b"other weights")
    assert key(weights) != first
    assert key(weights, "dis") == key(tmp_path / "elsewhere.pth", "dis")  # unused without flow.method=raft


def test_input_keys_that_select_the_same_frames_resume(tmp_path):
    """input.strict, or input.end written out, selected the same frames but refused the work folder."""
    from pipelines.config import load_config
    from pipelines.job import run_clip
    from pipelines.video_io import to_uint8, write_video

    model = tiny.save_residual_sr(tmp_path / "m", scale=2)
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 24, shift=(0.8, 0.4))), 10)

    def run(*over):
        cfg = load_config(None, [f"model.path={model}", "sampling.num_inference_steps=2", "runtime.threads=1", *over])
        run_clip(cfg, clip, tmp_path / "out.mp4", workdir=tmp_path / "work", overwrite=True, log=lambda m: None,
                 progress=False)

    run()
    run("input.strict=true", "input.end=3")
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        run("input.start=1")  # other frames


def test_settings_without_effect_resume_the_work_folder(tmp_path):
    """scheduler.eta under DDPM (only DDIM's step takes it), alignment.tcm_* without the TCM, noise_level outside
    the sd_upscaler convention or VAE options without a VAE, changed between a stop and the restart, refused the
    work folder ("different configuration") though nothing sampled differs. A setting with effect still does."""
    from pipelines.config import load_config
    from pipelines.job import run_clip
    from pipelines.video_io import to_uint8, write_video

    model = tiny.save_residual_sr(tmp_path / "m", scale=2, channels=(8, 16))  # a DDPM scheduler, no VAE
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 24, shift=(0.8, 0.4))), 10)

    def run(*over):
        cfg = load_config(None, [f"model.path={model}", "sampling.num_inference_steps=2", "runtime.threads=1",
                                 "alignment.mode=fusion", *over])
        run_clip(cfg, clip, tmp_path / "out.mp4", workdir=tmp_path / "work", overwrite=True, log=lambda m: None,
                 progress=False)

    run("scheduler.eta=0")
    assert (tmp_path / "work" / "state.safetensors").exists()
    run("scheduler.eta=0.5", "alignment.tcm_start=0.5", "sampling.noise_level=100", "model.vae_tiling=true")
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        run("alignment.weight=0.7")  # the fusion's own weight


def test_one_pass_max_and_files_above_without_effect_resume_the_work_folder(tmp_path):
    """runtime.one_pass_max under runtime.mode=windows, and runtime.files_above on a clip that runs in windows,
    changed between a stop and the restart, refused the work folder though they decide nothing there. Where
    files_above decides whether a one pass keeps its samples in files, it still does: a checkpoint of the other
    kind is not read back right."""
    from pipelines.config import load_config
    from pipelines.job import run_clip
    from pipelines.video_io import to_uint8, write_video

    model = tiny.save_residual_sr(tmp_path / "m", scale=2, channels=(8, 16))
    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 24, shift=(0.8, 0.4))), 10)

    def run(work, *over):
        cfg = load_config(None, [f"model.path={model}", "sampling.num_inference_steps=2", "runtime.threads=1",
                                 "alignment.mode=fusion", *over])
        return run_clip(cfg, clip, tmp_path / "out.mp4", workdir=tmp_path / work, overwrite=True,
                        log=lambda m: None, progress=False)

    windows = ("runtime.mode=windows", "runtime.window=2", "runtime.overlap=1")
    assert run("windows", *windows)["mode"] == "windows"
    run("windows", *windows, "runtime.one_pass_max=2", "runtime.files_above=0")
    assert run("memory")["state_in_files"] is False
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        run("memory", "runtime.files_above=0")  # the same one pass, its samples in files


def test_the_fingerprint_follows_files_above_and_one_pass_max_only_where_they_decide(tmp_path):
    """runtime.one_pass_max counts only under runtime.mode=auto; runtime.files_above only where a one pass could
    keep its samples in files (not in windows, nor with a DPM-Solver or a chain shorter than the clip)."""
    from pipelines.config import load_config
    from pipelines.job import fingerprint

    frames = tiny.textured_clip(3, 8)
    unet = tiny.pixel_unet(6, (8, 16))
    ddpm = VideoPipeline(unet, tiny.ddpm_v(), scale=2, residual_scale=0.1)
    dpm = VideoPipeline(unet, DPMSolverMultistepScheduler.from_config(tiny.ddpm_v().config), scale=2,
                        residual_scale=0.1)

    def key(pipe, *over):
        cfg = load_config(None, [f"model.path={tmp_path / 'model'}", "alignment.mode=fusion", *over])
        return fingerprint(cfg, pipe, lambda a, b: frames[a:b], 3)

    for mode in ("one_pass", "windows"):
        assert key(ddpm, f"runtime.mode={mode}", "runtime.one_pass_max=2") == key(ddpm, f"runtime.mode={mode}")
    assert key(ddpm, "runtime.one_pass_max=2") != key(ddpm)  # auto
    windows = ("runtime.mode=windows", "runtime.window=2", "runtime.overlap=1")
    assert key(ddpm, *windows, "runtime.files_above=0") == key(ddpm, *windows)
    assert key(dpm, "runtime.files_above=0") == key(dpm)
    assert key(ddpm, "schedule.chain_length=2", "runtime.files_above=0") == key(ddpm, "schedule.chain_length=2")
    assert key(ddpm, "runtime.files_above=0") != key(ddpm)  # 3 frames in files, or in memory
    one = ("runtime.mode=windows", "runtime.window=3", "runtime.overlap=1")  # one window holds the clip: one pass
    assert key(ddpm, *one, "runtime.files_above=0") != key(ddpm, *one)


def test_the_fingerprint_counts_a_setting_without_effect_as_its_default(tmp_path):
    """What the warnings call without effect (pipelines.config.inert_settings) is hashed as the schema's default;
    what has effect still tells work folders apart, and so does schedule.chain_length without alignment: it
    decides whether a long one pass keeps its samples in files."""
    import diffusers

    from pipelines.config import load_config
    from pipelines.job import fingerprint

    frames = tiny.textured_clip(2, 8)
    unet = tiny.pixel_unet(6, (8, 16))
    ddpm = VideoPipeline(unet, tiny.ddpm_v(), scale=2, residual_scale=0.1)
    ddim = VideoPipeline(unet, diffusers.DDIMScheduler.from_config(tiny.ddpm_v().config), scale=2,
                         residual_scale=0.1)

    def key(pipe, *over):
        cfg = load_config(None, [f"model.path={tmp_path / 'model'}", *over])  # no such folder: hashed by its path
        return fingerprint(cfg, pipe, lambda a, b: frames[a:b], 2)

    fusion, tcm = "alignment.mode=fusion", "alignment.mode=tcm"
    assert key(ddpm, "scheduler.eta=0.5") == key(ddpm)
    assert key(ddim, "scheduler.eta=0.5") != key(ddim)
    assert key(ddpm, fusion, "alignment.tcm_start=0.5", "alignment.tcm_scale=2") == key(ddpm, fusion)
    assert key(ddpm, tcm, "alignment.tcm_start=0.5") != key(ddpm, tcm)
    assert key(ddpm, fusion, "alignment.weight=0.7") != key(ddpm, fusion)
    assert key(ddpm, "flow.method=farneback", "flow.dis_preset=fast") == key(ddpm, "flow.method=farneback")
    assert key(ddpm, "flow.dis_preset=fast") != key(ddpm)
    assert key(ddpm, "sampling.negative_prompt=blur", "sampling.noise_level=100", "model.vae_slicing=true") == key(ddpm)
    assert key(ddpm, "schedule.direction=forward", "schedule.passes=3") == key(ddpm)  # alignment.mode none
    assert key(ddpm, "schedule.chain_length=2") != key(ddpm)


def _hub_cache(tmp_path, monkeypatch, repo="bisweep-test/tiny-vsr"):
    """An offline Hugging Face cache holding ``repo`` at one commit (refs/main -> snapshots/<commit>/, a tiny
    model), as from_pretrained finds it without the network; returns a function that adds a commit with other
    weights and moves refs/main to it."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf" / "hub"
    folder = cache / f"models--{repo.replace('/', '--')}"
    for key, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))  # read once, when the hub client was imported
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    def commit(sha, residual_scale):
        tiny.save_residual_sr(folder / "snapshots" / sha, scale=2, residual_scale=residual_scale, channels=(8, 16))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(sha)

    commit("a" * 40, 0.1)
    return repo, lambda: commit("b" * 40, 0.3)


def _hub_job(tmp_path, repo):
    from pipelines.config import load_config
    from pipelines.job import run_clip
    from pipelines.video_io import to_uint8, write_video

    clip = tmp_path / "in.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 24, shift=(0.8, 0.4))), 10)

    def run():
        cfg = load_config(None, [f"model.path={repo}", "sampling.num_inference_steps=2", "runtime.threads=1",
                                 "alignment.mode=fusion"])
        return run_clip(cfg, clip, tmp_path / "out.mp4", workdir=tmp_path / "work", overwrite=True,
                        log=lambda m: None, progress=False)

    return run


def test_a_hub_model_updated_between_a_stop_and_the_restart_is_refused(tmp_path, monkeypatch):
    """A hub id counted by its name: once the repository (refs/main) moved to another commit, the restart
    resumed the old weights' saved state under the new ones. The same commit still resumes."""
    repo, update = _hub_cache(tmp_path, monkeypatch)
    run = _hub_job(tmp_path, repo)
    assert run()["model_path"] == repo  # loaded from the cache, offline
    assert (tmp_path / "work" / "state.safetensors").exists()
    run()  # nothing changed: resumes
    update()
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        run()


def test_a_hub_model_updated_while_it_loads_is_refused(tmp_path, monkeypatch):
    """Online, the load itself may fetch a newer commit than the cache held when the work folder was checked."""
    from pipelines import job

    repo, update = _hub_cache(tmp_path, monkeypatch)
    run = _hub_job(tmp_path, repo)
    run()
    load = job.load_model
    monkeypatch.setattr(job, "load_model", lambda *a: (update(), load(*a))[1])
    with pytest.raises(WorkdirMismatch, match="different configuration"):
        run()
