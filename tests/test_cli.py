"""The CLI end to end on tiny models and clips: outputs, report, padding, overwrite, and every bad input
(exit 2, one line on stderr, nothing written)."""
import hashlib
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import run_video
import tiny
from pipelines import interrupts
from pipelines.config import load_config
from pipelines.flow import ClipFlows
from pipelines.video_io import read_clip, to_uint8, write_video
from pipelines.video_pipeline import VideoPipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["sampling.num_inference_steps=2", "sampling.strength=1.0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far faster on one thread when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny.save_residual_sr(d / "model", scale=2)
    # a model whose input sides must be multiples of 4: 4-level UNet (multiple 8) at scale 2
    model4 = d / "model4"
    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=6, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
                norm_num_groups=8).save_pretrained(model4 / "unet")
    tiny.ddpm_v().save_pretrained(model4 / "scheduler")
    (model4 / "vsr_config.json").write_text(json.dumps({"scale": 2, "residual_scale": 0.1}))

    clip = tiny.textured_clip(4, 32)
    write_video(d / "gt.mp4", to_uint8(clip), fps=12)
    low = torch.nn.functional.interpolate(clip, size=(16, 16), mode="area")
    write_video(d / "clip.mp4", to_uint8(low), fps=12)
    write_video(d / "gt3.mp4", to_uint8(clip[:3]), fps=12)
    write_video(d / "gt_small.mp4", to_uint8(low), fps=12)
    odd = to_uint8(tiny.textured_clip(3, 22)[..., :18, :])  # 18 x 22
    frames = d / "odd"
    frames.mkdir()
    for i, f in enumerate(odd):
        cv2.imwrite(str(frames / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return d


def cli(capsys, *argv):
    rc = run_video.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_success_writes_video_report_config_frames_and_comparison(data, tmp_path, capsys):
    src = data / "clip.mp4"
    before = digest(src)
    out = tmp_path / "new" / "dir" / "sr.mp4"
    rc, stdout, err = cli(capsys, "--input", src, "--output", out, "--reference", data / "gt.mp4",
                          f"model.path={data / 'model'}", *FAST, f"output.frames_dir={tmp_path / 'png'}",
                          f"output.side_by_side={tmp_path / 'cmp.mp4'}")
    assert rc == 0, err
    assert "alignment:\n  mode: fusion" in stdout  # the merged config is printed
    assert "denoising" in err and "100%" in err and "writing" in stdout  # progress bar, log lines
    assert digest(src) == before  # the input is never modified

    video = read_clip(out)
    assert video.frames.shape == (4, 32, 32, 3) and video.fps == pytest.approx(12)
    assert read_clip(tmp_path / "cmp.mp4").frames.shape == (4, 32, 64, 3)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"frame_{i:05d}.png" for i in range(4)]

    saved = load_config(out.with_suffix(".yaml"))  # the merged config, reusable as --config
    assert saved.model.path == str(data / "model") and saved.sampling.num_inference_steps == 2

    rep = json.loads(out.with_suffix(".json").read_text())
    assert (rep["frames"], rep["input_size"], rep["output_size"], rep["fps"]) == (4, [16, 16], [32, 32], 12.0)
    assert rep["model_kind"] == "residual_sr" and rep["device"] == "cpu" and rep["steps_run"] == 2
    assert rep["config"]["sampling"]["strength"] == 1.0
    t = rep["timings"]
    for key in ("total", "model", "flow", "align", "scheduler", "decode", "io", "load", "import"):
        assert t[key] >= 0, key
    assert t["model"] > 0 and t["flow"] > 0 and t["total"] >= t["model"] + t["load"]
    assert rep["peak_memory"]["host_max_rss_mb"] > 0
    for key in ("warp_error_noref", "warp_error_noref_input", "warp_error_ref"):
        assert 0 <= rep[key] < 1, key
    # PSNR and SSIM against scikit-image (reference kind: code not written here) on the written PNG frames
    # (the report scores the float output; uint8 rounding moves PSNR by < 0.01 dB here)
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    png = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
                    for p in sorted((tmp_path / "png").glob("*.png"))]).astype(np.float64) / 255
    gt = read_clip(data / "gt.mp4").frames.astype(np.float64) / 255
    sk_psnr = np.mean([peak_signal_noise_ratio(g, o, data_range=1.0) for g, o in zip(gt, png)])
    luma = lambda x: x @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    sk_ssim = np.mean([structural_similarity(luma(g), luma(o), gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0) for g, o in zip(gt, png)])
    assert rep["psnr"] == pytest.approx(sk_psnr, abs=0.02) and rep["ssim"] == pytest.approx(sk_ssim, abs=0.005)
    assert rep["psnr"] != pytest.approx(rep["psnr_bicubic"], abs=1e-3)
    # the report's consistency figures are those of the written frames (not of the input, nor of the
    # reference): recomputed here on the PNG frames with the reference's flows
    from pipelines import metrics
    from pipelines.config import flow_config
    from pipelines.flow import compute_clip_flows

    out_t, gt_t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() * 2 - 1 for x in (png, gt))
    ref = compute_clip_flows(gt_t, flow_config(saved))
    assert rep["warp_error_ref"] == pytest.approx(metrics.warp_error(out_t, ref.to_prev, ref.valid_prev), rel=1e-3)
    assert rep["warp_error_ref_gt"] == pytest.approx(metrics.warp_error(gt_t, ref.to_prev, ref.valid_prev), rel=1e-3)
    assert rep["sharpness_ratio"] == pytest.approx(metrics.sharpness(out_t) / metrics.sharpness(gt_t), rel=1e-3)
    assert rep["warp_error_noref"] != pytest.approx(rep["warp_error_noref_input"], rel=0.1)  # 3.2e-3, 2.3e-3


def test_odd_sizes_are_padded_and_cropped_back(data, tmp_path, capsys, monkeypatch):
    """18x22 frames, a model that needs multiples of 4: exactly 36x44 out. Also: the default config (found
    under the repo root) and output path (outputs/<input stem>_<config stem>.mp4 in the cwd)."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "--input", data / "odd", f"model.path={data / 'model4'}", *FAST)
    assert rc == 0, err
    out = tmp_path / "outputs" / "odd_default.mp4"
    assert read_clip(out).frames.shape == (3, 36, 44, 3)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert (rep["input_multiple"], rep["output_size"], rep["fps"]) == (4, [36, 44], 20.0)  # images: default fps
    assert rep["timings"]["flow"] > 0 and 0 <= rep["warp_error_noref"] < 1  # the sampler's flows, cropped



def test_killed_runs_png_folder_is_removed_by_the_next_run(data, tmp_path, capsys):
    """A killed run leaves its PNG frames in a temporary sibling of output.frames_dir (a copy of every
    frame); the next run removes it, as it does the video's, and keeps a live process's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".png.tmp-{dead}-abcd"
    stale.mkdir()
    (stale / "frame_00000.png").write_bytes(b"a frame")
    live = tmp_path / f".png.tmp-{os.getppid()}-efgh"  # this test's parent process: alive
    live.mkdir()
    rc, out, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "o.mp4",
                       f"model.path={data / 'model'}", *FAST, f"output.frames_dir={tmp_path / 'png'}")
    assert rc == 0, err
    assert not stale.exists() and live.exists()
    assert f"removed {stale}, left behind by an interrupted earlier run" in out + err
    assert len(list((tmp_path / "png").glob("frame_*.png"))) == 4

def test_overwrite(data, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    base = ["--config", "configs/independent.yaml", "--input", data / "clip.mp4", "--output", out,
            f"model.path={data / 'model'}", *FAST]
    assert cli(capsys, *base)[0] == 0
    kept = digest(out)
    rc, _, err = cli(capsys, *base, "sampling.seed=5")
    assert rc == 2 and err.strip() == f"error: --output {out} exists (use --overwrite to replace it)"
    assert digest(out) == kept
    rc, _, err = cli(capsys, *base, "sampling.seed=5", "--overwrite")
    assert rc == 0, err
    saved = json.loads(out.with_suffix(".json").read_text())["config"]
    assert digest(out) != kept and saved["sampling"]["seed"] == 5 and saved["alignment"]["mode"] == "none"



@pytest.mark.parametrize("stride", [10 ** 8, 10 ** 400], ids=["1e8", "1e400"])
def test_a_stride_beyond_the_clip_samples_its_first_frame(data, tmp_path, capsys, stride):
    """input.stride=10**8 made the output rate (12 fps / stride) round to 0 in the writer, 10**400 overflowed a
    float: exit 1 'internal: ZeroDivisionError' / 'OverflowError'. Like stride 1000, it takes the first frame."""
    out = tmp_path / "o.mp4"
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", out, f"model.path={data / 'model'}", *FAST,
                     f"input.stride={stride}")
    assert rc == 0, err
    assert len(read_clip(out).frames) == 1

def _corrupt(d):
    (d / "bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return d / "bad.mp4"


def _empty_dir(d):
    (d / "empty").mkdir()
    return d / "empty"


def _mixed_dir(d):
    (d / "mixed").mkdir()
    cv2.imwrite(str(d / "mixed" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(d / "mixed" / "b.png"), np.zeros((8, 10, 3), np.uint8))
    return d / "mixed"


def _foreign_dir(d):
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("keep me")
    return d / "notes"


def _config(text):
    def make(d):
        (d / "job.yaml").write_text(text)
        return ["--config", d / "job.yaml"]
    return make


# (name, a function of a scratch folder returning extra argv (later flags win), expected part of stderr)
BAD = [
    ("missing input", lambda d: ["--input", d / "nope.mp4"], "nope.mp4: no such file or directory"),
    ("corrupt input", lambda d: ["--input", _corrupt(d)], "cannot open video"),
    ("empty folder", lambda d: ["--input", _empty_dir(d)], "holds no images"),
    ("start beyond the end", lambda d: ["input.start=100"], "start=100 is beyond the last frame"),
    ("mixed sizes", lambda d: ["--input", _mixed_dir(d)], "all frames must be the same size"),
    ("yaml syntax", _config("sampling:\n  strength: [0.5\n"), "config: "),
    ("unknown key in yaml", _config("sampling:\n  strenght: 0.5\n"), "unknown key sampling.strenght"),
    ("unknown key override", lambda d: ["sampling.strenght=0.5"], "unknown key sampling.strenght"),
    ("wrong type", lambda d: ["sampling.num_inference_steps=abc"], "could not be converted to Integer"),
    ("strength 0", lambda d: ["sampling.strength=0"], "sampling.strength must be in (0, 1], got 0.0"),
    ("strength 1.5", lambda d: ["sampling.strength=1.5"], "sampling.strength must be in (0, 1], got 1.5"),
    ("steps 0", lambda d: ["sampling.num_inference_steps=0"], "sampling.num_inference_steps must be >= 1"),
    ("missing model", lambda d: [f"model.path={d / 'no_model'}"], "no such folder"),
    ("tcm without controlnet", lambda d: ["alignment.mode=tcm"], "needs a model with a controlnet/ folder"),
    ("cuda without cuda", lambda d: ["model.device=cuda"], "CUDA is not available"),
    ("half on cpu", lambda d: ["model.device=cpu", "model.dtype=float16"], "needs a CUDA device"),
    ("device type without its plugin", lambda d: ["model.device=npu"], "not a device type this torch build knows"),
    ("output under a file", lambda d: ["--output", _corrupt(d) / "sub" / "o.mp4"], "is not a directory"),
    ("output is the input", lambda d: ["--output", d.parent / "data" / "clip.mp4"], "same file as --input"),
    ("output type", lambda d: ["--output", d / "out" / "o.txt"], "unsupported video type"),
    ("reference frames", lambda d: ["--reference", d.parent / "data" / "gt3.mp4"],
     "--reference has 3 frames, output has 4"),
    ("reference size", lambda d: ["--reference", d.parent / "data" / "gt_small.mp4"],
     "--reference frames are 16x16, output frames are 32x32"),
    ("frames_dir over other files", lambda d: [f"output.frames_dir={_foreign_dir(d)}"], "holds other files"),
    ("frames_dir holding the input", lambda d: [f"output.frames_dir={d.parent / 'data'}"], "would be deleted"),
    ("bad flag", lambda d: ["--frobnicate"], "unrecognized arguments"),
    # found by a hostile-input probe: each must fail up front with one line
    ("frames too small for flow (resize)", lambda d: ["input.resize=0.01"], "that flow.method=dis needs"),
    ("frames too small for flow (scale)", lambda d: ["flow.scale=0.05"], "that flow.method=dis needs"),
    ("steps above training steps", lambda d: ["sampling.num_inference_steps=1001"],
     "exceeds the 1000 training timesteps"),
    ("seed out of range", lambda d: ["sampling.seed=100000000000000000000"], "sampling.seed"),
    ("malformed vsr_config.json", lambda d: [f"model.path={_broken_model(d)}"], "is not valid JSON"),
    ("workdir is a file", lambda d: ["--workdir", _corrupt(d)], "is not a folder"),
    ("corrupt run.json", lambda d: ["--workdir", _bad_workdir(d)], "run.json is unreadable"),
    ("output under /proc", lambda d: ["--output", "/proc/o.mp4"], "cannot write files in /proc"),
    ("local-looking model path", lambda d: ["model.path=weights/nope"], "no such folder"),
    ("empty input", lambda d: ["--input", ""], "--input is empty"),
    ("empty output", lambda d: ["--output", ""], "--output is empty"),
    # found by a second probe: each was an internal error (or a crash) after the model loaded
    ("fps infinite", lambda d: ["output.fps=inf"], "output.fps must be null or in [0.01, 1000]"),
    ("fps too small", lambda d: ["output.fps=1e-9"], "output.fps must be null or in [0.01, 1000]"),
    ("resize huge", lambda d: ["input.resize=1000"], "input.resize must be null or in (0, 16]"),
    ("threads huge", lambda d: ["runtime.threads=100000"], "runtime.threads must be in [0, 1024]"),
    ("workdir under a file", lambda d: ["--workdir", _corrupt(d) / "wd"], "is not a directory"),
    ("output is a folder", lambda d: ["--output", d], "is a directory; give a video file name"),
    ("missing list of clips", lambda d: ["--input", d / "clips.txt", "--output", d / "outs"],
     "clips.txt: no such file or directory"),
    ("preview decoder missing", lambda d: [f"model.path={_folders(d, 'unet', 'controlnet')}", "alignment.mode=tcm",
                                           "alignment.tcm_decoder=preview"], "needs a model with a preview_decoder/"),
    # found by a third probe: each ran (or failed with exit 1 after loading) instead of a one-line error
    ("mistyped vae subfolder", lambda d: ["model.vae_subfolder=vea"], "model.vae_subfolder=vea: "),
    ("latent model without its vae", lambda d: [f"model.path={_stablevsr_without(d, 'vae')}"],
     "the UNet has 7 input and 4 output channels, so it is not a pixel-space (RGB) model"),
    ("text encoder without tokenizer", lambda d: [f"model.path={_stablevsr_without(d, 'tokenizer')}"],
     "has a text_encoder/ text encoder but no tokenizer/ tokenizer subfolder"),
    ("text-conditioned unet without text encoder",
     lambda d: [f"model.path={_stablevsr_without(d, 'text_encoder', 'tokenizer')}"],
     "the UNet is text-conditioned (UNet2DConditionModel) but there is no text_encoder/"),
    ("raft without torchvision", lambda d: ["flow.method=raft", f"flow.raft_weights={_corrupt(d)}"],
     "flow.method=raft needs torchvision"),
    ("tcm window holding no step", lambda d: [f"model.path={_stablevsr_without(d)}", "alignment.mode=tcm",
                                              "alignment.tcm_start=0.4", "alignment.tcm_end=0.6"],
     "holds none of the 2 steps run"),
    ("folder of videos and an image", lambda d: ["--input", _videos_and_image(d), "--output", d / "outs"],
     "holds 1 video(s) (clip.mp4...) and 1 image(s)"),
    ("workdir over other files", lambda d: ["--workdir", _foreign_dir(d)], "holds other files and is not a work"),
    # found by a probe with models of other layouts (diffusers-built, tiny): each was exit 1 or ran wrong
    ("scheduler the maths does not support", lambda d: [f"model.path={_sd_like(d, sched='pndm')}"],
     "scheduler PNDMScheduler is not supported"),
    ("stochastic DPM-Solver", lambda d: [f"model.path={_sd_like(d, sched='sde')}"],
     "DPM-Solver algorithm_type 'sde-dpmsolver++' is not supported"),
    ("SDXL-style added conditioning", lambda d: [f"model.path={_sd_like(d, unet='sdxl')}"],
     "addition_embed_type=text_time"),
    ("guidance-distilled UNet", lambda d: [f"model.path={_sd_like(d, unet='lcm')}"], "guidance-distilled"),
    ("learned variance", lambda d: [f"model.path={_sd_like(d, unet='variance')}"], "predicts 8 channels"),
    ("latent UNet without its vae", lambda d: [f"model.path={_sd_like(d, vae=False, unet='plain4')}"],
     "not a pixel-space (RGB) model"),
    ("VAE with a shift_factor", lambda d: [f"model.path={_sd_like(d, shift=0.3)}"], "shift_factor"),
    ("class-labelled upscaler under the StableVSR convention",
     lambda d: [f"model.path={_upscaler(d)}", "model.convention=stablevsr"], "use model.convention=sd_upscaler"),
    ("noise level beyond the schedule", lambda d: [f"model.path={_upscaler(d, index=1000)}",
                                                    "sampling.noise_level=1000"],
     "sampling.noise_level=1000 must be in [0, 999]"),
    # diffusers' StableDiffusionUpscalePipeline refuses noise_level above its max_noise_level (model_index.json's,
    # 350 when it sets none); these ran
    ("noise level above the model's max_noise_level", lambda d: [f"model.path={_upscaler(d, index=120)}",
                                                                 "sampling.noise_level=121"],
     "sampling.noise_level=121 must be in [0, 120] for "),
    ("noise level above diffusers' default max_noise_level", lambda d: [f"model.path={_upscaler(d)}",
                                                                        "sampling.noise_level=351"],
     "must be in [0, 350] for "),
    # found by a config-surface probe: each was an internal error (exit 1) or ran with a meaningless value
    ("config file that is one number", _config("3\n"), "expected a mapping of sections at the top level"),
    ("DDIM eta above 1", lambda d: ["scheduler.kind=ddim", "scheduler.eta=3"], "scheduler.eta must be in [0, 1]"),
    ("unset mark", lambda d: ["sampling.strength=???"], "sampling.strength: '???' marks a value as unset"),
    ("empty value in a config file", _config("sampling:\n  prompt:\n"),
     "config: sampling.prompt: the value is empty (null in YAML)"),
    ("null override", lambda d: ["sampling.prompt=null"], "config: sampling.prompt: the value is null"),
    ("boolean from an interpolation", lambda d: ["runtime.threads=2", "sampling.back_projection=${runtime.threads}"],
     "config: sampling.back_projection must be true or false, got 2 from ${runtime.threads}"),
    ("interpolation of a missing key", _config("sampling:\n  back_projection: ${nope.x}\n"),
     "config: sampling.back_projection: Interpolation key 'nope.x' not found"),
    ("override value that is not YAML", lambda d: ["sampling.prompt='x"], "the value is not valid YAML"),
    ("ControlNet of another scale", lambda d: [f"model.path={_other_controlnet(d)}", "alignment.mode=tcm"],
     "takes its RGB condition down x8, but this model's condition is x4"),
]


def _sd_like(d, sched="ddim", unet="cond", vae=True, shift=None):
    """A tiny SD-layout img2img model (unet/, vae/, text_encoder/, tokenizer/, scheduler/), built with
    diffusers, with the named scheduler or UNet variant."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UNet2DConditionModel,
                           UNet2DModel)

    path = d / "sd"
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    torch.manual_seed(0)
    extra = {"sdxl": dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=80),
             "lcm": dict(time_cond_proj_dim=16)}
    if unet == "plain4":
        model = UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                            layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                            up_block_types=("UpBlock2D",) * 2, norm_num_groups=32)
    elif unet in extra:
        model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                     layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                                     **extra[unet])
    else:
        model = tiny.cond_unet(4, 8 if unet == "variance" else 4)
    model.save_pretrained(path / "unet")
    if vae:
        v = tiny.vae()
        if shift is not None:
            v.register_to_config(scaling_factor=0.5, shift_factor=shift)
        v.save_pretrained(path / "vae")
    if unet != "plain4":
        enc, tok = tiny.clip_parts(d / "_tok")
        enc.save_pretrained(path / "text_encoder")
        tok.save_pretrained(path / "tokenizer")
    made = {"ddim": lambda: DDIMScheduler(**sd, clip_sample=False),
            "pndm": lambda: PNDMScheduler(**sd, skip_prk_steps=True),
            "sde": lambda: DPMSolverMultistepScheduler(**sd, algorithm_type="sde-dpmsolver++")}[sched]()
    made.save_pretrained(path / "scheduler")
    return path


def _upscaler(d, index=None):
    """A tiny SD x4 upscaler layout: a 7-channel UNet with noise-level labels, no ControlNet; with ``index``, a
    model_index.json registering that max_noise_level (as diffusers' save_pretrained writes it)."""
    from diffusers import DDPMScheduler

    path = d / "x4"
    if index is not None:
        path.mkdir()
        (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline",
                                                           "max_noise_level": index}))
    tiny.cond_unet(7, class_embed=True).save_pretrained(path / "unet")
    v = tiny.vae(down=3)
    v.register_to_config(scaling_factor=0.08333)
    v.save_pretrained(path / "vae")
    enc, tok = tiny.clip_parts(d / "_tok")
    enc.save_pretrained(path / "text_encoder")
    tok.save_pretrained(path / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_pretrained(path / "scheduler")
    return path


def _other_controlnet(d):
    """StableVSR's layout (x4) with a ControlNet whose conditioning embedding goes down x8."""
    import shutil

    from diffusers import ControlNetModel

    path = tiny.save_stablevsr_layout(d / "stablevsr")
    shutil.rmtree(path / "controlnet")
    ControlNetModel.from_unet(tiny.cond_unet(in_channels=7), conditioning_embedding_out_channels=(16, 32, 32, 32)
                              ).save_pretrained(path / "controlnet")
    return path


def _stablevsr_without(d, *drop):
    import shutil

    path = tiny.save_stablevsr_layout(d / "stablevsr")
    for name in drop:
        shutil.rmtree(path / name)
    return path


def _videos_and_image(d):
    import shutil

    (d / "mix").mkdir()
    shutil.copy(d.parent / "data" / "clip.mp4", d / "mix" / "clip.mp4")
    cv2.imwrite(str(d / "mix" / "thumb.png"), np.zeros((8, 8, 3), np.uint8))
    return d / "mix"


def _folders(d, *names):
    for name in names:
        (d / "parts" / name).mkdir(parents=True, exist_ok=True)
    return d / "parts"


def _broken_model(d):
    import shutil

    shutil.copytree(d.parent / "data" / "model", d / "broken")
    (d / "broken" / "vsr_config.json").write_text('{"scale": 2,')
    return d / "broken"


def _bad_workdir(d):
    (d / "work").mkdir()
    (d / "work" / "run.json").write_text("{not json")
    return d / "work"


@pytest.mark.parametrize("make, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(data, tmp_path, capsys, monkeypatch, make, expected):
    if "cuda" in expected.lower() and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if "torchvision" in expected and importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    monkeypatch.chdir(tmp_path)  # a default output path would land here
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    data_link = tmp_path / "data"
    data_link.symlink_to(data)  # so cases can name the shared clips as scratch/../data
    before = {p: digest(p) for p in data.rglob("*") if p.is_file()}
    argv = ["--input", data / "clip.mp4", "--output", tmp_path / "out" / "o.mp4", f"model.path={data / 'model'}",
            *FAST, *make(scratch)]
    capsys.readouterr()  # building a case's model prints save_pretrained's progress bars
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()
    assert {p: digest(p) for p in data.rglob("*") if p.is_file()} == before


def test_internal_error_is_one_line_exit_1(data, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(VideoPipeline, "__call__", boom)
    argv = ["--input", data / "clip.mp4", "--output", tmp_path / "o.mp4", f"model.path={data / 'model'}", *FAST]
    rc, _, err = cli(capsys, *argv)
    assert rc == 1 and err.splitlines()[-1] == "error: internal: RuntimeError: boom second line"
    assert not (tmp_path / "o.mp4").exists()
    with pytest.raises(RuntimeError, match="boom"):
        run_video.main([str(a) for a in argv] + ["--debug"])



def test_output_that_appears_during_the_run_is_kept_exit_2(data, tmp_path, capsys, monkeypatch):
    """Another process creating --output mid-run (no --overwrite): its file is kept, and the run ends with
    one line and exit 2, not as an internal error."""
    out = tmp_path / "o.mp4"
    sample = VideoPipeline.__call__

    def racing(self, *args, **kwargs):
        out.write_bytes(b"someone else's")
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(VideoPipeline, "__call__", racing)
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", out, f"model.path={data / 'model'}", *FAST)
    assert rc == 2
    assert err.splitlines()[-1] == (f"error: {out} appeared while this run was writing it; kept that file "
                                    "(use --overwrite to replace it)")
    assert out.read_bytes() == b"someone else's" and not list(tmp_path.glob(".o*tmp-*"))

def test_subprocess_bad_input_exit_code_and_single_line(data, tmp_path):
    """A real process: corrupt video (ffmpeg's own chatter must stay off stderr)."""
    bad = _corrupt(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run_video.py"), "--input", str(bad), "--output",
                           str(tmp_path / "out" / "o.mp4"), f"model.path={data / 'model'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "cannot open video" in proc.stderr
    assert "model:" in proc.stdout  # the merged config came first
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("reader", ["goes away", "closed from the start"])
def test_a_reader_that_goes_away_ends_the_messages_not_the_job(data, tmp_path, reader):
    """`run_video.py ... 2>&1 | head -1`: the first message after head left was "internal: BrokenPipeError"
    (exit 1, nothing written, the error itself lost); the job now finishes and writes its outputs. And
    `>&- 2>&-` (streams closed before the start) still runs, as before the fix (its first version failed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "run_video.py"), "--input", str(data / "clip.mp4"), "--output",
               str(tmp_path / "o.mp4"), f"model.path={data / 'model'}", *FAST]
    if reader == "goes away":
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                                env=env)
        assert proc.stdout.readline().startswith("model:")
        proc.stdout.close()  # as head does after its first line
        assert proc.wait(timeout=120) == 0
    else:
        import shlex

        shell = " ".join(shlex.quote(str(c)) for c in command) + " >&- 2>&-"
        assert subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, timeout=120).returncode == 0
    assert (tmp_path / "o.mp4").exists() and json.loads((tmp_path / "o.json").read_text())["frames"] == 4


def test_subprocess_unreachable_hub_model_is_one_line(data, tmp_path):
    """A hub id that cannot be fetched (offline): exit 2 and only the error line; the hub client's
    deprecation warning and retry messages stay off stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "run_video.py"), "--input", str(data / "clip.mp4"),
                           "--output", str(tmp_path / "o.mp4"), "model.path=someone/not-cached-here"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot load model 'someone/not-cached-here' from the Hugging Face hub")
    assert not (tmp_path / "o.mp4").exists()


def test_library_chatter_while_loading_stays_off_stderr(data, tmp_path):
    """The hub client's retry messages (its logger) and warnings while a model loads do not reach stderr:
    a model that then fails to load is one line. A real process (pytest would swallow both in-process),
    with from_pretrained replaced by a stub that does what huggingface_hub does offline."""
    script = tmp_path / "offline.py"
    script.write_text(f"""
import logging, sys, warnings
sys.path.insert(0, {str(ROOT)!r})
import run_video
from pipelines.loading import ModelLoadError
from pipelines.video_pipeline import VideoPipeline

def offline(*args, **kwargs):
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 1/5].")
    warnings.warn("The `local_dir_use_symlinks` argument is deprecated", UserWarning)
    raise ModelLoadError("cannot load model 'someone/model' from the Hugging Face hub: offline")

VideoPipeline.from_pretrained = offline
sys.exit(run_video.main(["--input", {str(data / "clip.mp4")!r}, "--output", {str(tmp_path / "o.mp4")!r},
                         "model.path=someone/model"]))
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr == "error: cannot load model 'someone/model' from the Hugging Face hub: offline\n", proc.stderr


def test_workdir_with_only_hidden_files_or_lost_found_is_accepted(data, tmp_path, capsys):
    """A fresh mount (lost+found) or a folder with a .DS_Store is not "a folder of other files"."""
    wd = tmp_path / "wd"
    (wd / "lost+found").mkdir(parents=True)
    (wd / ".DS_Store").write_bytes(b"finder")
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "o.mp4",
                     f"model.path={data / 'model'}", *FAST, "--workdir", wd)
    assert rc == 0, err
    assert (wd / "run.json").exists() and (wd / ".DS_Store").read_bytes() == b"finder"

def test_internal_error_names_opencv_once(data, tmp_path, capsys, monkeypatch):
    """OpenCV's exception class is called 'error': the line must not read 'error: internal: error: ...'."""
    def boom(*args, **kwargs):
        raise cv2.error("bad thing")

    monkeypatch.setattr(VideoPipeline, "__call__", boom)
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "o.mp4",
                     f"model.path={data / 'model'}", *FAST)
    assert rc == 1 and err.splitlines()[-1] == "error: internal: cv2.error: bad thing"


def test_fingerprint_follows_the_decoded_frames():
    from pipelines.job import fingerprint

    cfg = load_config(ROOT / "configs" / "default.yaml")
    pipe = VideoPipeline(tiny.pixel_unet(6, (8, 16)), tiny.ddpm_v(), scale=2, residual_scale=0.1)
    frames = tiny.textured_clip(3, 8)
    edited = frames.clone()
    edited[1, 0, 3, 3] += 0.01  # one frame overwritten in place (a path/size/mtime check can miss this)
    same = fingerprint(cfg, pipe, lambda a, b: frames[a:b].clone(), 3)
    assert fingerprint(cfg, pipe, lambda a, b: frames[a:b], 3) == same
    assert fingerprint(cfg, pipe, lambda a, b: edited[a:b], 3) != same
    # how fast and how often a run checkpoints may change on resume; what it samples may not
    faster = load_config(ROOT / "configs" / "default.yaml", ["runtime.threads=7", "runtime.checkpoint_every=3"])
    assert fingerprint(faster, pipe, lambda a, b: frames[a:b], 3) == same
    other = load_config(ROOT / "configs" / "default.yaml", ["runtime.window=9"])
    assert fingerprint(other, pipe, lambda a, b: frames[a:b], 3) != same


def test_clips_with_the_same_stem_get_distinct_outputs():
    from pipelines.many import output_names

    names = output_names([Path("x/a.mp4"), Path("x/a.mov"), Path("x/b.mp4"), Path("y/a.mp4")])
    assert names[2] == "b" and len(set(names)) == 4 and names[0].startswith("a_") and names[1] == "a_mov"


def test_damaged_state_file_is_refused_not_resumed(tmp_path):
    from pipelines.checkpoint import Checkpointer, WorkdirMismatch

    ck = Checkpointer(tmp_path / "w", "key")
    ck.state_file.write_bytes(b"\x00" * 64)
    with pytest.raises(WorkdirMismatch, match="damaged"):
        ck.load([torch.Generator()], tiny.ddpm_v(), "cpu")


@pytest.mark.parametrize("argv, code, forbidden, err", [
    (["--help"], 0, ("torch", "diffusers", "transformers"), ""),
    (["--no-such-flag"], 2, ("torch", "diffusers", "transformers"), "error: unrecognized arguments"),
    (["sampling.num_inference_steps=0"], 2, ("torch", "diffusers", "transformers"),
     "error: config: sampling.num_inference_steps must be >= 1"),
    (["sampling.steps=3"], 2, ("torch", "diffusers", "transformers"), "error: config: unknown key sampling.steps"),
    # the model path is checked by the job (torch), before the model is loaded (diffusers)
    (["model.path=weights/nope"], 2, ("diffusers", "transformers", "torch._dynamo"),
     "error: config: model.path=weights/nope: no such folder"),
])
def test_help_and_early_errors_skip_the_heavy_imports(tmp_path, argv, code, forbidden, err):
    """--help, a bad command line and a config error return without importing torch (1-2 s here) or diffusers
    (which imports torch._dynamo and every diffusers model: seconds more); they took 2-12 s before."""
    modules = tmp_path / "modules.json"
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import atexit, json, runpy, sys
sys.path.insert(0, {str(ROOT)!r})
atexit.register(lambda: open({str(modules)!r}, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = [{str(ROOT / "run_video.py")!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    proc = subprocess.run([sys.executable, str(probe), "--output", str(tmp_path / "o.mp4"), *argv],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == code and proc.stderr.startswith(err) and proc.stderr.count("\n") == (1 if err else 0), \
        proc.stderr
    loaded = set(json.loads(modules.read_text()))
    assert not loaded & set(forbidden), sorted(loaded & set(forbidden))
    assert not list(tmp_path.glob("o.*"))


def test_ctrl_c_while_diffusers_imports_waits_for_the_import(tmp_path):
    """A Ctrl-C that arrives while the job imports diffusers (seconds, in load_model) is held until the import
    ends, then stops the run as usual: one raised inside torch's import callbacks can abort the process. The
    probe sends SIGINT from inside the import of diffusers and marks whether the import went on after it."""
    marker = tmp_path / "import-went-on"
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            open({str(marker)!r}, "w").close()  # not reached when the KeyboardInterrupt is raised at once
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = [{str(ROOT / "run_video.py")!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    proc = subprocess.run([sys.executable, str(probe), "--output", str(tmp_path / "o.mp4")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", proc.stderr
    assert marker.exists()
    assert not list(tmp_path.glob("o.*"))


def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path):
    import signal
    import time

    # Ctrl-C from a terminal: the child gets the default SIGINT disposition even when the suite itself runs
    # in a background job (a non-interactive shell starts those with SIGINT ignored, and Python keeps that)
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_video.py"), "--output", str(tmp_path / "o.mp4")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.4)  # still starting: importing the libraries (torch: interrupts.import_held) or reading the config
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "error: interrupted\n", err


def test_sigterm_mid_run_leaves_nothing_behind(data, tmp_path):
    import signal

    out = tmp_path / "out" / "o.mp4"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_video.py"), "--input", str(data / "clip.mp4"),
                             "--output", str(out), f"model.path={data / 'model'}",
                             "sampling.num_inference_steps=200", "runtime.threads=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("sampling"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.splitlines()[-1] == "error: terminated", err
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_hub_model_without_network_is_one_line_naming_the_hub(data, tmp_path, capsys, monkeypatch):
    """A hub id whose download fails (as with no network) gives one line that says where it looked."""
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore detail")

    monkeypatch.setattr(diffusers.AutoModel, "from_pretrained", offline)
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "o.mp4",
                     "model.path=someone/some-model", *FAST)
    assert rc == 2 and err.count("\n") == 1 and "Hugging Face hub" in err and "network" in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_an_interrupt_that_a_library_wraps_in_another_error_is_still_exit_130(capsys, monkeypatch):
    # diffusers' lazy import once turned a Ctrl-C raised mid-import into a RuntimeError, which the CLI then
    # reported as an internal error (exit 1); the SIGINT handler's flag must win over the wrapped error
    def job(args):
        try:
            interrupts._on_sigint(2, None)  # what the signal would run
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to import diffusers.models.x: maximum recursion depth exceeded") from e

    monkeypatch.setattr(interrupts, "INTERRUPTED", False)
    args = run_video.parse_args([])
    assert run_video.guarded(job, args) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    monkeypatch.setattr(interrupts, "INTERRUPTED", False)  # without the interrupt the same error is internal
    assert run_video.guarded(lambda a: (_ for _ in ()).throw(RuntimeError("boom")), args) == 1
    assert capsys.readouterr().err == "error: internal: RuntimeError: boom\n"


def test_ctrl_c_stops_a_list_of_clips_not_just_the_current_one(tmp_path, capsys, monkeypatch):
    calls = []

    def interrupted_run(args):
        calls.append(args.input)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_video, "run", interrupted_run)
    clips = [tmp_path / f"c{i}.mp4" for i in range(3)]
    args = run_video.parse_args(["--output", str(tmp_path / "out")])
    assert run_video.guarded(lambda a: run_video.run_many(a, clips), args) == 130
    assert calls == [str(clips[0])] and capsys.readouterr().err == "error: interrupted\n"


def test_a_ctrl_c_whose_python_handler_fails_is_still_exit_130(capsys, monkeypatch):
    # CI saw the Python-level handler itself fail when the signal landed deep inside an import (a
    # RecursionError, wrapped by diffusers in a RuntimeError), so the handler's flag was never set; the
    # byte the C-level handler writes to the wakeup pipe still says a Ctrl-C arrived
    import signal

    if interrupts._WAKE is None:
        pytest.skip("this process has another signal wakeup fd")

    def failing_handler(signum, frame):
        raise RecursionError("maximum recursion depth exceeded")

    def job(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        except RecursionError as e:
            raise RuntimeError(f"Failed to import diffusers.models.x: {e}") from e
        return 0

    args = run_video.parse_args([])
    interrupts.interrupted()  # nothing pending
    monkeypatch.setattr(interrupts, "INTERRUPTED", False)
    old = signal.signal(signal.SIGINT, failing_handler)
    try:
        assert run_video.guarded(job, args) == 130
    finally:
        signal.signal(signal.SIGINT, old)
    assert capsys.readouterr().err == "error: interrupted\n"
    monkeypatch.setattr(interrupts, "INTERRUPTED", False)
    assert not interrupts.interrupted()  # the byte was consumed; the flag alone remembers


def test_a_ctrl_c_swallowed_while_the_libraries_loaded_ends_the_run_with_130(capsys, monkeypatch):
    # an import that catches the KeyboardInterrupt (a bare except) leaves the run going; the wakeup byte (or
    # the flag) still ends it with exit 130 before any work, instead of a later error from a half-imported library
    monkeypatch.setattr(interrupts, "INTERRUPTED", True)
    monkeypatch.setattr(run_video, "run", lambda args: pytest.fail("the job ran after Ctrl-C"))
    assert run_video.main(["--output", "never.mp4"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_non_square_pixels_are_kept(data, tmp_path, capsys):
    """A clip with 2:1 pixels (64x48 stored, shown 128x48) came out with square pixels, stretched to 4:3;
    the output (and the side-by-side video, whose halves share those pixels) now carries the input's pixel
    aspect ratio. The input is written with PyAV directly."""
    from fractions import Fraction

    import av

    src = tmp_path / "sar.mp4"
    with av.open(str(src), "w") as out:
        s = out.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 32, 16, "yuv420p"
        s.codec_context.sample_aspect_ratio = Fraction(2, 1)
        for i, f in enumerate(to_uint8(tiny.textured_clip(4, 32))[:, :16]):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    rc, _, err = cli(capsys, "--input", src, "--output", tmp_path / "o.mp4", f"model.path={data / 'model'}", *FAST,
                     f"output.side_by_side={tmp_path / 'sbs.mp4'}")
    assert rc == 0, err
    with av.open(str(tmp_path / "o.mp4")) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.width, cc.height, cc.sample_aspect_ratio) == (64, 32, Fraction(2, 1))
    with av.open(str(tmp_path / "sbs.mp4")) as c:
        assert c.streams.video[0].codec_context.sample_aspect_ratio == Fraction(2, 1)


def test_model_variant_picks_the_variant_weights_where_a_component_has_them(data, tmp_path, capsys):
    """``model.variant=fp16`` loads ``*.fp16.safetensors`` (as diffusers' ``variant=`` does): a folder holding
    plain weights A and fp16 variant weights B runs B with the option (the same frames as a folder of B
    alone) and A without it; components without the variant (the StableVSR layout's VAE, text encoder and
    ControlNet here) keep their plain weights. A folder of variant weights only, without the option,
    is one line naming the option (was diffusers' "no file named diffusion_pytorch_model.bin")."""
    import shutil

    a = UNet2DModel.from_pretrained(data / "model" / "unet")
    b = UNet2DModel.from_pretrained(data / "model" / "unet")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    both, only_b, only_variant = tmp_path / "both", tmp_path / "only_b", tmp_path / "only_variant"
    for folder in (both, only_b, only_variant):
        shutil.copytree(data / "model", folder, ignore=shutil.ignore_patterns("unet"))
    a.save_pretrained(both / "unet")
    b.half().save_pretrained(both / "unet", variant="fp16")  # half() is in place: b is float16 from here on
    b.save_pretrained(only_b / "unet")
    b.save_pretrained(only_variant / "unet", variant="fp16")

    def frames(model, *extra):
        out = tmp_path / f"{model.name}{len(extra)}"
        rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", out / "o.mp4", f"model.path={model}",
                         *FAST, "alignment.mode=none", f"output.frames_dir={out / 'png'}", *extra)
        assert rc == 0, err
        return read_clip(out / "png").frames

    with_variant = frames(both, "model.variant=fp16")
    assert np.array_equal(with_variant, frames(only_b))
    assert not np.array_equal(with_variant, frames(both))
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "x.mp4",
                     f"model.path={only_variant}", *FAST)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "set model.variant=fp16" in err, err
    assert np.array_equal(frames(only_variant, "model.variant=fp16"), with_variant)

    latent = tiny.save_stablevsr_layout(tmp_path / "stablevsr")  # the variant for the UNet alone
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(latent / "unet").half().save_pretrained(latent / "unet", variant="fp16")
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "l.mp4", f"model.path={latent}",
                     *FAST, "alignment.mode=tcm", "model.variant=fp16")
    assert rc == 0, err
    rc, _, err = cli(capsys, "--output", tmp_path / "y.mp4", "model.variant=fp16/../x")
    assert rc == 2 and "model.variant must be" in err
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "z.mp4", f"model.path={both}", *FAST,
                     "model.variant=fp61")  # a variant no component has: asked for and not given
    assert rc == 2 and "no component" in err


def test_settings_that_contradict_the_model_or_do_nothing(data, tmp_path, capsys):
    """A prompt for a model without a text encoder, or a latent-upscaler convention for a pixel model, ran
    as if not given: exit 2 now. Keys the user set that this model and mode leave without effect (eta under
    DDPM, fusion keys without fusion) are named in warnings, on stderr and in the report."""
    base = ["--input", data / "clip.mp4", f"model.path={data / 'model'}", *FAST]
    for bad, words in (("sampling.prompt=a cat", "need a text-conditioned model"),
                       ("model.convention=stablevsr", "applies to latent upscalers")):
        rc, _, err = cli(capsys, *base, "--output", tmp_path / "x.mp4", bad)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "o.mp4", "alignment.mode=none", "alignment.weight=0.9",
                     "scheduler.eta=0.5")
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: config:")]
    assert len(warned) == 2 and "alignment.weight=0.9" in warned[0] and "scheduler.eta=0.5" in warned[1]
    report = json.loads((tmp_path / "o.json").read_text())
    assert [f"warning: {w}" for w in report["warnings"]] == warned
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "p.mp4", "alignment.mode=none")  # default.yaml's weight
    assert rc == 0 and "warning" not in err


def test_window_and_checkpoint_settings_without_effect_are_named(data, tmp_path, capsys):
    """runtime.window, overlap and anchor_weight on a clip that runs in one pass, and runtime.checkpoint_every
    without --workdir, did nothing without a word, unlike the other inert keys: named now, on stderr and in the
    report; not on a run that uses them."""
    base = ["--input", data / "clip.mp4", f"model.path={data / 'model'}", *FAST]
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "o.mp4", "runtime.window=3", "runtime.overlap=1",
                     "runtime.anchor_weight=0.5", "runtime.checkpoint_every=2")
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: config:")]
    assert [w.split("=")[0] for w in warned] == ["warning: config: runtime." + k for k in (
        "overlap", "anchor_weight", "window", "checkpoint_every")], warned
    assert "the 4 frame(s) run in one pass (runtime.mode=auto" in warned[0] and "--workdir" in warned[3]
    assert [f"warning: {w}" for w in json.loads((tmp_path / "o.json").read_text())["warnings"]] == warned
    # windows that hold the clip: the window made it one pass, the overlap did nothing
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "p.mp4", "runtime.mode=windows", "runtime.window=6",
                     "runtime.overlap=1")
    assert rc == 0 and err.count("warning: config:") == 1 and "runtime.overlap=1 has no effect" in err, err
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "q.mp4", "--workdir", tmp_path / "work",
                     "runtime.mode=windows", "runtime.window=3", "runtime.overlap=1", "runtime.checkpoint_every=2")
    assert rc == 0 and "warning: config:" not in err, err


def test_one_pass_max_and_files_above_without_effect_are_named(data, tmp_path, capsys):
    """runtime.one_pass_max under runtime.mode one_pass or windows (only auto chooses by it), and
    runtime.files_above on a clip that runs in windows or whose one-pass state cannot live in files (DPM-Solver),
    did nothing without a word: named now, on stderr and in the report; not on a run they decide."""
    base = ["--input", data / "clip.mp4", f"model.path={data / 'model'}", *FAST]

    def warned(name, *extra):
        rc, _, err = cli(capsys, *base, "--output", tmp_path / f"{name}.mp4", *extra)
        assert rc == 0, err
        lines = [line for line in err.splitlines() if line.startswith("warning: config:")]
        assert [f"warning: {w}" for w in json.loads((tmp_path / f"{name}.json").read_text())["warnings"]] == lines
        return lines

    assert warned("o", "runtime.mode=one_pass", "runtime.one_pass_max=2") == [
        "warning: config: runtime.one_pass_max=2 has no effect: runtime.mode is one_pass; only auto chooses one pass "
        "or windows by it"]
    assert warned("p", "runtime.mode=windows", "runtime.window=3", "runtime.overlap=1", "runtime.one_pass_max=2",
                  "runtime.files_above=0") == [
        "warning: config: runtime.one_pass_max=2 has no effect: runtime.mode is windows; only auto chooses one pass "
        "or windows by it",
        "warning: config: runtime.files_above=0 has no effect: the 4 frame(s) run in windows of runtime.window=3, "
        "and it applies to one pass"]
    lines = warned("q", "scheduler.kind=dpm++", "runtime.files_above=0")
    assert len(lines) == 1 and lines[0].startswith(
        "warning: config: runtime.files_above=0 has no effect: one pass keeps its samples in memory at any value: "
        "file-backed one-pass state needs a DDPM or DDIM scheduler"), lines
    # where they decide: auto gives windows above one_pass_max=2; the state of 4 frames > 0 goes into files
    assert warned("r", "runtime.one_pass_max=2", "runtime.window=3", "runtime.overlap=1") == []
    assert warned("s", "runtime.files_above=0") == []
    assert warned("t", "runtime.mode=windows", "runtime.window=6", "runtime.files_above=0") == []  # one window
    kept = {name: json.loads((tmp_path / f"{name}.json").read_text())["state_in_files"] for name in "pqst"}
    assert kept == {"p": False, "q": False, "s": True, "t": True}


def test_a_window_that_holds_the_clip_under_mode_auto_is_not_called_without_effect(data, tmp_path, capsys):
    """Under runtime.mode=auto, a clip longer than runtime.one_pass_max but not than runtime.window runs in one
    pass because of the window: the warning blamed one_pass_max and called the window without effect, though a
    smaller window gives windows. Now the window is named as the reason, and the overlap and one_pass_max (one
    pass either way: by it, or windows of which one holds the clip) warned about."""
    base = ["--input", data / "clip.mp4", f"model.path={data / 'model'}", *FAST]
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "o.mp4", "runtime.one_pass_max=2", "runtime.window=6",
                     "runtime.overlap=1")
    assert rc == 0, err
    warned = sorted(line for line in err.splitlines() if line.startswith("warning: config:"))
    why = "has no effect: runtime.window=6 holds all 4 frame(s): one pass"
    assert len(warned) == 2 and warned[0].startswith(f"warning: config: runtime.one_pass_max=2 {why}") \
        and warned[1].startswith(f"warning: config: runtime.overlap=1 {why}"), warned
    # the same clip within one_pass_max: the window is without effect, and the reason is the limit
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "p.mp4", "runtime.one_pass_max=4", "runtime.window=6")
    assert rc == 0 and "runtime.window=6 has no effect: the 4 frame(s) run in one pass (runtime.mode=auto" in err, err

def _run_with_workdir(capsys, data, tmp_path, *extra, name="o"):
    return cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / f"{name}.mp4", "--workdir",
               tmp_path / "work", f"model.path={data / 'model'}", *FAST, *extra)


def test_a_run_stopped_while_committing_is_finished_by_the_same_command(data, tmp_path, capsys, monkeypatch):
    """Stopped between committing the video and the report, the same command was refused ("o.mp4 exists,
    use --overwrite"): the work folder now records what its run was committing, and the rerun finishes it.
    Once finished, the same command is refused again as before."""
    from pipelines import video_io

    real = video_io.PendingText.commit

    def stop_at_the_report(self, *args, **kwargs):
        if self.path.name == "o.json":
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(video_io.PendingText, "commit", stop_at_the_report)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 130 and (tmp_path / "o.mp4").exists() and not (tmp_path / "o.json").exists()
    monkeypatch.undo()
    rc, out, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 0, err
    assert "finishing the outputs" in out and json.loads((tmp_path / "o.json").read_text())["frames"] == 4
    rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 2 and "exists (use --overwrite" in err


@pytest.mark.parametrize("name", ["o.mp4", "png", "o.json"])
def test_a_run_stopped_right_after_moving_an_output_into_place_is_finished_too(data, tmp_path, capsys, monkeypatch,
                                                                                 name):
    """Stopped in the instant after an output was moved into place and before the work folder recorded it, the
    same command was refused ("exists, use --overwrite"); the record is now written just before the move."""
    from pipelines import video_io, video_writer

    real = video_writer.commit

    def stop_after(tmp, path, *args, **kwargs):
        real(tmp, path, *args, **kwargs)
        if Path(path).name == name:
            raise KeyboardInterrupt

    def stop_after_moving_the_folder(self, *args, **kwargs):
        real_close(self, *args, **kwargs)
        raise KeyboardInterrupt

    extra = [f"output.frames_dir={tmp_path / 'png'}"]
    if name == "png":
        real_close = video_io.FrameFolderWriter.close
        monkeypatch.setattr(video_io.FrameFolderWriter, "close", stop_after_moving_the_folder)
    else:
        monkeypatch.setattr(video_writer, "commit", stop_after)
        monkeypatch.setattr(video_io, "commit", stop_after)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, *extra)
    assert rc == 130 and (tmp_path / name).exists(), err
    monkeypatch.undo()
    rc, out, err = _run_with_workdir(capsys, data, tmp_path, *extra)
    assert rc == 0, err
    assert "finishing the outputs" in out and json.loads((tmp_path / "o.json").read_text())["frames"] == 4
    assert len(list((tmp_path / "png").iterdir())) == 4


def test_a_second_stop_while_committing_keeps_the_first_runs_record(data, tmp_path, capsys, monkeypatch):
    """Stopped after the config copy was in place, then the rerun stopped after the video: the second run's
    record replaced the first's, and the third run was refused ("o.yaml exists, use --overwrite")."""
    from pipelines import video_io, video_writer

    real = video_writer.commit

    def stop_after(name):
        def commit(tmp, path, *args, **kwargs):
            real(tmp, path, *args, **kwargs)
            if Path(path).name == name:
                raise KeyboardInterrupt
        return commit

    for name in ("o.yaml", "o.mp4"):
        monkeypatch.setattr(video_writer, "commit", stop_after(name))
        monkeypatch.setattr(video_io, "commit", stop_after(name))
        rc, _, err = _run_with_workdir(capsys, data, tmp_path)
        assert rc == 130 and (tmp_path / name).exists(), err
        monkeypatch.undo()
    rc, out, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 0 and "finishing the outputs" in out, err


def test_a_work_folder_from_an_earlier_version_is_refused(data, tmp_path, capsys, monkeypatch):
    """A folder checkpointed before latent upscalers stopped being padded was resumed with samples of the
    padded size: exit 1 ("Sizes of tensors must match") or, for windows, a wrong-size output. The fingerprint
    holds a state version, and a resumed state of another shape is refused as well."""
    from pipelines import job

    rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 0, err
    monkeypatch.setattr(job, "STATE_VERSION", job.STATE_VERSION + 1)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, "--overwrite")
    assert rc == 2 and "an earlier version of this program" in err, err


def test_a_saved_state_of_another_shape_is_refused(tmp_path):
    import tiny
    from pipelines.checkpoint import Checkpointer, WorkdirMismatch
    from pipelines.video_pipeline import SamplingOptions, VideoPipeline

    pipe = VideoPipeline.from_pretrained(tiny.save_residual_sr(tmp_path / "m", scale=2))
    opts = SamplingOptions(num_inference_steps=2)
    pipe(tiny.textured_clip(2, 8), options=opts, checkpoint=Checkpointer(tmp_path / "w", "key"))
    with pytest.raises(WorkdirMismatch, match=r"its samples are \(2, 3, 16, 16\), this run's \(2, 3, 20, 20\)"):
        pipe(tiny.textured_clip(2, 10), options=opts, checkpoint=Checkpointer(tmp_path / "w", "key"))


@pytest.mark.parametrize("full_at", ["o.json", "sbs.mp4", "sbs seal"])
def test_a_full_disk_while_the_outputs_are_made_keeps_every_earlier_output(data, tmp_path, capsys, monkeypatch,
                                                                            full_at):
    """With --overwrite, a full disk while the report (or the side-by-side video) was written left the new
    video (and config copy) beside the old report: each output was moved into place as soon as it was
    made. Now all are made first and moved in a row. The line names the file and the full disk, and is
    not called internal (exit 1)."""
    import errno

    from pipelines import video_io, video_writer

    old = {name: f"earlier {name}".encode() for name in ("o.mp4", "o.json", "o.yaml", "sbs.mp4")}
    for name, body in old.items():
        (tmp_path / name).write_bytes(body)

    def full_open(path, mode="r", *args, **kwargs):  # the report's temporary: .o.tmp-<...>.json
        name = Path(path).name
        if "w" in mode and name.startswith(".o.tmp") and name.endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    def full_seal(path, *args, **kwargs):  # the side-by-side's temporary fails to be sealed
        if Path(path).name.startswith(".sbs.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_chmod(path, *args, **kwargs)

    if full_at == "o.json":
        monkeypatch.setattr(video_io, "open", full_open, raising=False)
    elif full_at == "sbs seal":
        real_chmod = os.chmod
        monkeypatch.setattr(video_writer.os, "chmod", full_seal)
    else:
        real = video_writer.VideoWriter.finish

        def full_finish(self):
            if self.path.name == full_at:
                self.abort()
                raise video_writer.WriteError(f"{self.tmp}: closing the video failed ([Errno 28] No space left "
                                              "on device)")
            return real(self)
        monkeypatch.setattr(video_writer.VideoWriter, "finish", full_finish)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, "--overwrite", f"output.side_by_side={tmp_path / 'sbs.mp4'}")
    assert rc == 1 and "No space left on device" in err and "internal" not in err, err
    assert f"{tmp_path}/" in err and Path(full_at.split()[0]).stem in err.strip().splitlines()[-1]  # the file
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in old) == ["work"]  # no temporaries


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(data, tmp_path, capsys,
                                                                                  monkeypatch):
    """safetensors' own error ("I/O error ... os error 28") came out as "internal: SafetensorError" without
    a path."""
    from pipelines import checkpoint

    real, calls = checkpoint.save_file, []

    def full_on_the_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_on_the_second)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and "state.tmp: saving the checkpoint failed" in last and "the previous one is kept" in last
    assert "internal" not in last and (tmp_path / "work" / "state.safetensors").exists()
    monkeypatch.undo()
    rc, _, err = _run_with_workdir(capsys, data, tmp_path)  # resumes from the kept checkpoint
    assert rc == 0, err


def test_the_work_folder_and_the_outputs_get_the_permissions_the_umask_allows(data, tmp_path, capsys):
    """The checkpoints (state.safetensors, a finished window's frames) came out 0600, as safetensors writes its
    files, and the file-backed state 0644 whatever the umask: every file a run leaves now has 0666 less the
    umask, what open() gives."""
    old = os.umask(0o002)
    try:
        for name, extra in (("files", ["runtime.files_above=0"]),
                            ("windows", ["runtime.mode=windows", "runtime.window=3", "runtime.overlap=1"])):
            rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / f"{name}.mp4", "--workdir",
                             tmp_path / f"work_{name}", f"model.path={data / 'model'}", *FAST, *extra)
            assert rc == 0, err
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"state.safetensors", "window0000.safetensors", "x0.bin", "files.mp4", "windows.json"} <= \
        {p.name for p in files}
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o664} == {}


def test_sigterm_while_the_outputs_move_into_place_waits_for_the_moves(data, tmp_path, capsys, monkeypatch):
    """A SIGTERM between the video's move and the report's left a new video beside an old report (without a
    work folder nothing finishes it): the moves now complete first, then the run ends with exit 143."""
    import signal

    from pipelines import video_writer

    for name in ("o.mp4", "o.json", "o.yaml"):
        (tmp_path / name).write_text("earlier")
    real = video_writer.commit

    def terminated_after_the_video(tmp, path, *args, **kwargs):
        real(tmp, path, *args, **kwargs)
        if Path(path).name == "o.mp4":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(video_writer, "commit", terminated_after_the_video)
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "o.mp4", "--overwrite",
                     f"model.path={data / 'model'}", *FAST)
    assert rc == 143 and "terminated" in err
    assert json.loads((tmp_path / "o.json").read_text())["frames"] == 4 and "model:" in (tmp_path / "o.yaml").read_text()


@pytest.mark.parametrize("damage", ["files", "windows"])
def test_a_damaged_saved_state_is_refused_not_resumed_from_zeros(data, tmp_path, capsys, damage):
    """One pass with its samples in files: a truncated x0.bin resumed from zeros (every frame wrong, exit 0);
    windows: a truncated finished-window file was "internal: SafetensorError" (exit 1). Both exit 2 now."""
    extra = ["runtime.files_above=0"] if damage == "files" else ["runtime.mode=windows", "runtime.window=2",
                                                                 "runtime.overlap=1"]
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, *extra)
    assert rc == 0, err
    victim = tmp_path / "work" / ("state/x0.bin" if damage == "files" else "window0000.safetensors")
    os.truncate(victim, 100)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, *extra, "--overwrite")
    last = err.strip().splitlines()[-1]  # after the progress bar: the damage shows when the sampling resumes
    assert rc == 2 and last.startswith("error: work folder") and victim.name in last, err


def test_a_work_folder_in_use_or_overlapping_an_output_is_refused(data, tmp_path, capsys):
    """Two runs on one work folder crashed one of them (exit 1, a FileNotFoundError on state.tmp); a work folder
    that is an output (or holds or sits in one) sampled everything and then failed, or had its checkpoints
    deleted with the PNG folder."""
    import fcntl

    (tmp_path / "work").mkdir()
    held = os.open(tmp_path / "work", os.O_RDONLY | os.O_DIRECTORY)  # as another run holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    finally:
        os.close(held)
    assert rc == 2 and "in use by another run" in err and os.listdir(tmp_path / "work") == []
    for workdir, extra in ((tmp_path / "o.mp4", []), (tmp_path / "png", [f"output.frames_dir={tmp_path / 'png'}"]),
                           (tmp_path / "png" / "w", [f"output.frames_dir={tmp_path / 'png'}"]),
                           (tmp_path, [])):
        rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "o.mp4", "--workdir", workdir,
                         f"model.path={data / 'model'}", *FAST, *extra)
        assert rc == 2 and "overlaps" in err, err


def test_a_file_that_appeared_is_kept_and_a_refused_run_writes_no_work_folder(data, tmp_path, capsys, monkeypatch):
    """The work folder names only what its run committed, as committed: a file another program put at --output
    while the run wrote it is kept by the rerun too (the first version listed every intended output and
    replaced it). A run refused before sampling leaves no work folder behind (exit 2 writes nothing)."""
    from pipelines import video_writer

    real = video_writer.commit

    def someone_else_first(tmp, path, *args, **kwargs):
        if path.name == "o.mp4":
            path.write_bytes(b"another program's file")
        return real(tmp, path, *args, **kwargs)

    monkeypatch.setattr(video_writer, "commit", someone_else_first)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 2 and "appeared while this run was writing it" in err
    monkeypatch.setattr(video_writer, "commit", real)
    rc, _, err = _run_with_workdir(capsys, data, tmp_path)
    assert rc == 2 and "exists (use --overwrite" in err
    assert (tmp_path / "o.mp4").read_bytes() == b"another program's file"
    rc, _, err = cli(capsys, "--input", data / "clip.mp4", "--output", tmp_path / "p.mp4", "--workdir",
                     tmp_path / "fresh" / "deep" / "wd", f"model.path={data / 'model'}", *FAST, "sampling.prompt=a cat")
    assert rc == 2 and not (tmp_path / "fresh").exists()  # nor the folders above it that the run made


def test_resuming_with_other_threads_is_named(data, tmp_path, capsys):
    """A run resumed with another thread count (the default depends on the machine) is no longer bit-identical
    to an uninterrupted one (10 of 16 frames differed); that was silent."""
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, "runtime.threads=1", "sampling.prompt=x")  # refused
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, "runtime.threads=2")  # nothing saved to resume yet
    assert rc == 0 and "warning" not in err
    rc, _, err = _run_with_workdir(capsys, data, tmp_path, "runtime.threads=1", "--overwrite")
    assert rc == 0 and "warning: resuming with threads 1 where the run began with 2" in err
    torch.set_num_threads(1)


def test_the_old_frames_folder_goes_aside_under_a_temporary_name(tmp_path, monkeypatch):
    """Replacing output.frames_dir moves the old folder aside first; a run killed before deleting it left
    '.png.old-XXXX' for good (the sweep of dead runs' temporaries did not know that name)."""
    from pipelines import video_io
    from pipelines.video_writer import _owner_tag

    video_io.write_frames(tmp_path / "png", np.zeros((1, 4, 4, 3), np.uint8))
    monkeypatch.setattr(video_io.shutil, "rmtree", lambda *a, **k: None)  # "killed" before the old one went
    video_io.write_frames(tmp_path / "png", np.ones((1, 4, 4, 3), np.uint8))
    left = [p.name for p in tmp_path.iterdir() if p.name != "png"]
    assert len(left) == 1 and left[0].startswith(f".png.tmp-{_owner_tag()}-"), left


def test_sigterm_while_the_libraries_load_is_one_line_and_143(data, tmp_path):
    """SIGTERM before torch and diffusers finished importing killed the process without a word (the
    default action); it is recorded and the run ends with exit 143 and its line once the imports are done.
    The signal is sent right after the CLI's signal set-up, where a real one lands most often."""
    code = ("import os, runpy, signal, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]; "
            "from pipelines import interrupts; interrupts.watch(); os.kill(os.getpid(), signal.SIGTERM); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "run_video.py"), "--input",
                          str(data / "clip.mp4"), "--output", str(tmp_path / "o.mp4"), f"model.path={data / 'model'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 143 and res.stderr == "error: terminated\n", (res.returncode, res.stderr)
    assert os.listdir(tmp_path) == []
    # a program that only imports the module keeps SIGTERM's default action (the recording handler stayed)
    code = ("import signal, sys; sys.path.insert(0, sys.argv[1]); import run_video; "
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    assert subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                          cwd=tmp_path).stdout.split()[-1] == "True"


def test_a_frame_size_whose_decoding_cannot_fit_is_refused_up_front(data, tmp_path, capsys, monkeypatch):
    """A latent model's VAE decodes whole output frames (about 0.9 GB per output megapixel with the shipped
    one): a size beyond the machine's memory ended in an out-of-memory kill after all the sampling. Refused
    before sampling now (exit 2, naming the remedies); above what is free, a warning. The machine's memory is
    faked here; the estimate itself is checked against the kernel's count in test_latent_model."""
    from pipelines import job

    model = tiny.save_stablevsr_layout(tmp_path / "stablevsr")
    base = ["--input", data / "clip.mp4", f"model.path={model}", *FAST, "alignment.mode=none"]
    monkeypatch.setattr(job, "memory_limits", lambda device: (1000, 1000))
    rc, out, err = cli(capsys, *base, "--output", tmp_path / "a.mp4")
    assert rc == 2 and "needs about" in err and "input.resize" in err and "sampling 4 frames" not in out, err
    monkeypatch.setattr(job, "memory_limits", lambda device: (2 ** 40, 1000))
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "b.mp4")
    assert rc == 0 and "warning: decoding 1 64x64 output frame at once" in err, err  # the auto batch shrank
    rc, _, err = cli(capsys, *base, "--output", tmp_path / "c.mp4", "model.vae_tiling=true")  # tiles bound it
    assert rc == 0 and "warning" not in err, err


def test_an_automatic_decode_batch_shrinks_to_the_free_memory(monkeypatch):
    """On a GPU the automatic decode batch is 8 frames, which at 4K (~30 GiB a frame with the shipped VAE)
    would not fit an 80 GB card: the automatic batch now takes what fits in 80 % of the free memory; a batch
    the user set is kept, with a warning; one frame beyond the card's memory is refused."""
    from types import SimpleNamespace

    from pipelines import job
    from pipelines.config import ConfigError

    per_frame = 1000
    pipe = SimpleNamespace(decode_memory=lambda pixels, batch: per_frame * batch)
    gpu = torch.device("cuda")
    monkeypatch.setattr(job, "memory_limits", lambda device: (10 * per_frame, 3.5 * per_frame))
    assert job._decode_fits(pipe, (2160, 3840), 0, gpu) == (2, [])
    batch, warnings = job._decode_fits(pipe, (2160, 3840), 4, gpu)
    assert batch == 4 and "decoding 4 3840x2160 output frames" in warnings[0]
    monkeypatch.setattr(job, "memory_limits", lambda device: (0.5 * per_frame, 0.5 * per_frame))
    with pytest.raises(ConfigError, match="needs about"):
        job._decode_fits(pipe, (2160, 3840), 0, gpu)


def test_the_memory_check_reads_the_processs_cgroup_limit(tmp_path):
    """A container's limit is the memory a run has, not the host's: the cgroup of /proc/self/cgroup, v2 or v1
    (the first version read only the root v2 file, which a container's limit never is)."""
    from pipelines.job import _cgroup_memory

    (tmp_path / "proc").write_text("0::/box/run\n")
    v2 = tmp_path / "root" / "box" / "run"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("1073741824\n")
    assert _cgroup_memory(tmp_path / "proc", tmp_path / "root") == (4 << 30, 1 << 30)
    (v2 / "memory.max").write_text("max\n")
    assert _cgroup_memory(tmp_path / "proc", tmp_path / "root") == (None, None)
    (tmp_path / "proc").write_text("4:memory:/docker/abc\n0::/\n")
    v1 = tmp_path / "root" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2147483648\n")
    (v1 / "memory.usage_in_bytes").write_text("5\n")
    assert _cgroup_memory(tmp_path / "proc", tmp_path / "root") == (2 << 30, 5)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert _cgroup_memory(tmp_path / "proc", tmp_path / "root") == (None, None)


def test_the_variant_falls_back_whatever_the_loader_says_and_shards_name_it(tmp_path):
    """The fallback to plain weights matched only a local folder's wording ("no file named"); the hub says
    "does not appear to have a file named", so a hub model with a component lacking the variant failed. A
    folder of sharded variant files hinted at variant "fp16-00001-of-00002"."""
    from pipelines.loading import _from_pretrained, _variants_only

    def hub_like(path, subfolder, variant=None, **kw):
        if variant:
            raise OSError(f"{path} does not appear to have a file named diffusion_pytorch_model.{variant}.safetensors")
        return "plain"

    assert _from_pretrained(hub_like, "someone/model", "controlnet", "fp16") == "plain"

    def broken(path, subfolder, variant=None, **kw):
        raise OSError(f"variant={variant} broken")

    with pytest.raises(OSError, match="variant=fp16"):  # both fail: the variant's error is the one reported
        _from_pretrained(broken, "someone/model", "unet", "fp16")
    for name in ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                 "diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "config.json"):
        (tmp_path / name).write_text("")
    assert _variants_only(tmp_path) == ["fp16"]


def test_help_names_the_many_clip_inputs_and_the_output_folder(capsys):
    # README: --input may also be a folder of video files or a .txt list of clips, --output then a folder;
    # --help named only a video, GIF, image or folder of images
    with pytest.raises(SystemExit) as e:
        run_video.parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "folder of videos or .txt list of clips" in out and "a folder for many clips" in out
