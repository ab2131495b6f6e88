"""The latent model's training scripts run (a couple of steps on tiny models, no ../shared data) and
export folders that load through the real loader and sample."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _saved(run: Path, name: str) -> Path:
    """A run folder's last saved weights of ``name`` (the checkpoint that state.json names)."""
    return run / json.loads((run / "state.json").read_text())["checkpoint"] / f"last_{name}.safetensors"


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    v = tiny.vae(down=3)
    v.register_to_config(scaling_factor=0.7)
    v.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory, tiny_vae):
    from training import train_latent_unet

    tmp = tmp_path_factory.mktemp("unet")
    train_latent_unet.main(["--vae", str(tiny_vae), "--run", str(tmp / "run"), "--out", str(tmp / "model"),
                            "--steps", "2", "--every", "1", "--batch", "2", "--crop", "32", "--blocks", "32,32,32",
                            "--no-shared", "--threads", "1"])
    return tmp


def test_latent_unet_training_resumes_and_exports_a_loadable_stablevsr_layout(latent_model, tiny_vae, monkeypatch):
    from pipelines.video_pipeline import SamplingOptions, VideoPipeline
    from training import train_latent_unet

    run = latent_model / "run"
    assert json.loads((run / "state.json").read_text())["step"] == 2
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 3
    seen, real = [], train_latent_unet.hr_lr_batch
    monkeypatch.setattr(train_latent_unet, "hr_lr_batch", lambda *a, **k: (seen.append(a[4:]), real(*a, **k))[1])
    train_latent_unet.main(["--vae", str(tiny_vae), "--run", str(run), "--out", str(latent_model / "model"),
                            "--steps", "3", "--every", "1", "--batch", "2", "--crop", "32", "--blocks", "32,32,32",
                            "--no-shared", "--threads", "1", "--jpeg", "0.5"])
    assert seen and set(seen) == {(0.5,)}  # the flag reaches the batches
    monkeypatch.undo()
    assert json.loads((run / "state.json").read_text())["step"] == 3  # resumed, one more step
    pipe = VideoPipeline.from_pretrained(latent_model / "model")
    # The logged sampled validation is what the exported model gives through the loader a user runs
    # (10 steps, seed 0, frames on their own, no back-projection), not the one-call x0 figure.
    import csv
    from training.train_vae import image_pool, psnr, validation_frames
    last = list(csv.DictReader((run / "log.csv").open()))[-1]
    hr, lr = train_latent_unet.validation_crops(validation_frames(None, image_pool()[1])[0])
    sampled = psnr(pipe(lr, options=SamplingOptions(num_inference_steps=10, seed=0)).frames.clamp(-1, 1), hr)
    assert float(last["val_sampled_db"]) == pytest.approx(sampled, abs=2e-3)
    assert abs(float(last["val_sampled_db"]) - float(last["val_psnr_db"])) > 0.01
    assert pipe.kind == "upscale" and pipe.scale == 4 and pipe.upscale_convention() == "stablevsr"
    assert pipe.unet.config.in_channels == 7 and pipe.unet.class_embedding is None
    out = pipe(tiny.textured_clip(2, 8), options=SamplingOptions(num_inference_steps=2)).frames
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_one_tcm_training_step_and_the_result_runs_through_the_stablevsr_config(latent_model, tmp_path):
    """train_tcm.py: one step on the tiny latent model (synthetic pairs with known flow); the exported
    folder (controlnet/ added) runs through configs/stablevsr.yaml (alignment tcm) end to end."""
    from pipelines.config import load_config
    from pipelines.job import run_clip
    from pipelines.video_io import to_uint8, write_video
    from training import train_tcm

    out = tmp_path / "with_tcm"
    train_tcm.main(["--model", str(latent_model / "model"), "--run", str(tmp_path / "run"), "--out", str(out),
                    "--steps", "1", "--every", "1", "--batch", "2", "--crop", "64", "--no-shared", "--threads", "1"])
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 1
    header, row = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert header == "step,loss,seconds,val_gain_db" and row.startswith("1,")
    assert abs(float(row.split(",")[3])) < 1.0  # validated (one step from zero convolutions: near 0 dB)
    assert (tmp_path / "run" / "tcm-loss.png").stat().st_size > 1000
    clip = tmp_path / "lr.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(3, 16, shift=(0.5, 0.0))), 10)
    cfg = load_config(ROOT / "configs" / "stablevsr.yaml", [f"model.path={out}", "sampling.num_inference_steps=2",
                                                              "runtime.threads=1"])
    rep = run_clip(cfg, clip, tmp_path / "sr.mp4", log=lambda m: None, progress=False)
    assert rep["model_kind"] == "upscale" and rep["output_size"] == [64, 64] and rep["timings"]["vae"] > 0


def test_tcm_validation_gain_is_zero_for_zero_convolutions_and_measures_the_condition(latent_model):
    """train_tcm's held-out figure 10 log10(MSE_without / MSE_with): exactly 0 dB for a fresh
    ``ControlNetModel.from_unet`` (its output convolutions are zero), and for a ControlNet with non-zero
    outputs it is not (a formula comparing the prediction with itself, or ignoring the ControlNet, gives 0)."""
    import numpy as np
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines.flow import FlowConfig
    from training import train_tcm
    from training.latent_parts import empty_prompt_embedding

    m = latent_model / "model"
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae").eval()
    emb = empty_prompt_embedding(CLIPTextModel.from_pretrained(m, subfolder="text_encoder"),
                                 CLIPTokenizer.from_pretrained(m, subfolder="tokenizer"))
    alphas = DDPMScheduler.from_pretrained(m, subfolder="scheduler").alphas_cumprod
    frozen = train_tcm.Frozen(unet, vae, vae, emb, alphas)
    photos = [tiny.textured_clip(1, 64)[0] for _ in range(2)]
    val = train_tcm.sample_pairs([], photos, np.random.default_rng(0), 2, 64, FlowConfig())
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
    assert train_tcm.condition_gain_db(frozen, cn, val, "cpu") == 0.0
    torch.manual_seed(0)
    for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
        torch.nn.init.normal_(block.weight, std=0.05)
    assert abs(train_tcm.condition_gain_db(frozen, cn, val, "cpu")) > 1e-3


def test_tcm_chain_training_conditions_on_a_neighbour_predicted_with_the_tcm(latent_model, tmp_path):
    """train_tcm.py --chain: synthetic chains follow their known flows (frame j+1 is frame j warped by
    flows[:, j]); the last frame's condition comes from a middle frame predicted *with* the ControlNet, so it
    changes when the ControlNet's outputs do (the pair path's condition cannot); one training step runs."""
    import numpy as np
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines.flow import FlowConfig, warp
    from training import train_tcm
    from training.latent_parts import empty_prompt_embedding

    m = latent_model / "model"
    photos = [tiny.textured_clip(1, 64)[0] for _ in range(2)]
    hr, lr, flows = train_tcm.sample_triples([], photos, np.random.default_rng(0), 2, 64, FlowConfig())
    assert hr.shape == (2, 3, 3, 64, 64) and lr.shape == (2, 3, 3, 16, 16) and flows.shape == (2, 2, 2, 64, 64)
    torch.testing.assert_close(hr[:, 2], warp(hr[:, 1], flows[:, 1], padding_mode="border"))
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae").eval()
    emb = empty_prompt_embedding(CLIPTextModel.from_pretrained(m, subfolder="text_encoder"),
                                 CLIPTokenizer.from_pretrained(m, subfolder="tokenizer"))
    frozen = train_tcm.Frozen(unet, vae, vae, emb, DDPMScheduler.from_pretrained(m, subfolder="scheduler").alphas_cumprod)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
    t = torch.tensor([500, 700])
    inp, zero_cond, target = frozen.chain_inputs((hr, lr, flows), t, torch.Generator().manual_seed(1), cn)
    assert inp.shape == (2, 7, 16, 16) and zero_cond.shape == (2, 3, 64, 64) and target.shape == (2, 4, 16, 16)
    torch.manual_seed(0)
    for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
        torch.nn.init.normal_(block.weight, std=0.05)
    inp2, cond, target2 = frozen.chain_inputs((hr, lr, flows), t, torch.Generator().manual_seed(1), cn)
    assert torch.equal(inp2, inp) and torch.equal(target2, target) and not torch.allclose(cond, zero_cond)
    train_tcm.main(["--model", str(m), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--chain",
                    "--steps", "1", "--every", "1", "--batch", "2", "--crop", "64", "--no-shared", "--threads", "1"])
    assert (tmp_path / "out" / "controlnet" / "diffusion_pytorch_model.safetensors").exists()


def test_preview_decoder_trains_and_replaces_the_vae_for_the_tcm_condition(latent_model, tmp_path, monkeypatch):
    """train_preview.py runs (two steps) and exports an AutoencoderTiny; placed in the model's
    preview_decoder/ folder it loads with the model, and alignment.tcm_decoder=preview decodes the TCM
    condition with it (the VAE decoder then only decodes the final frames)."""
    import shutil

    from pipelines.tcm import TCMAlignment
    from pipelines.video_pipeline import SamplingOptions, VideoPipeline
    from training import train_preview, train_tcm

    train_preview.main(["--model", str(latent_model / "model"), "--run", str(tmp_path / "prev"), "--steps", "2",
                        "--every", "2", "--batch", "2", "--crop", "32", "--no-shared", "--threads", "1"])
    model = tmp_path / "m"
    train_tcm.main(["--model", str(latent_model / "model"), "--run", str(tmp_path / "tcm"), "--out", str(model),
                    "--decoder", str(tmp_path / "prev" / "export"), "--steps", "1", "--every", "1", "--batch", "1",
                    "--crop", "64", "--no-shared", "--threads", "1"])
    assert (tmp_path / "prev" / "preview-loss.png").stat().st_size > 1000
    shutil.copytree(tmp_path / "prev" / "export", model / "preview_decoder")
    pipe = VideoPipeline.from_pretrained(model)
    assert pipe.preview is not None and pipe.controlnet is not None
    vae_calls, conds = [], []
    real, real_cn = pipe.vae.decode, pipe.controlnet.forward
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: (vae_calls.append(len(a[0])), real(*a, **k))[1])
    monkeypatch.setattr(pipe.controlnet, "forward",
                        lambda *a, **k: (conds.append(k["controlnet_cond"].clone()), real_cn(*a, **k))[1])
    clip = tiny.textured_clip(3, 8, shift=(0.5, 0.0))
    opts = SamplingOptions(num_inference_steps=2)
    pipe(clip, options=opts, alignment=TCMAlignment(decoder="preview"))
    assert vae_calls == [3]  # only the final decode of the 3 frames
    from_preview, conds[:], vae_calls[:] = list(conds), [], []
    pipe(clip, options=opts, alignment=TCMAlignment(decoder="vae"))
    assert vae_calls == [1, 1, 1, 1, 3]  # 2 steps x 2 conditions, then the final frames
    assert len(conds) == len(from_preview) == 4 and (conds[0] - from_preview[0]).abs().max() > 1e-3


def test_vae_decoder_only_fine_tune_starts_from_the_export_and_keeps_the_latents(tiny_vae, tmp_path):
    """train_vae.py --init <export> --decoder-only: the run starts from the exported weights (its
    architecture too), trains only the decoder (the encoder, so every latent a UNet was trained on, is
    bit-for-bit unchanged) and keeps the export's scaling_factor; --minutes ends a run after its first
    step at the latest, still saved and exported."""
    from diffusers import AutoencoderKL
    from training import train_vae

    common = ["--init", str(tiny_vae), "--decoder-only", "--every", "100", "--batch", "2", "--crop", "32",
              "--lr", "1e-1", "--threads", "1", "--no-shared"]
    timed = tmp_path / "timed"
    train_vae.main([*common, "--run", str(timed), "--out", str(timed / "export"), "--steps", "50", "--minutes", "1e-6"])
    assert json.loads((timed / "state.json").read_text())["step"] == 1
    assert (timed / "export" / "config.json").exists()

    out = tmp_path / "export"
    train_vae.main([*common, "--run", str(tmp_path / "run"), "--out", str(out), "--steps", "1"])
    before, after = AutoencoderKL.from_pretrained(tiny_vae), AutoencoderKL.from_pretrained(out)
    assert after.config.scaling_factor == pytest.approx(0.7)
    b, a = before.state_dict(), after.state_dict()
    enc = [k for k in b if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in b if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in dec)  # the decoder moved (EMA of one step)
    # A fine-tune's EMA has no warm-up: after one step it is init + (1 - 0.999) (raw - init), not the raw
    # step (a warm-up would weigh the first step 0.9 and throw the trained start away).
    from safetensors.torch import load_file
    raw = load_file(_saved(tmp_path / "run", "model"))
    moved = [k for k in dec if not torch.equal(raw[k], b[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(a[k] - b[k], 1e-3 * (raw[k] - b[k]), rtol=1e-3, atol=1e-7)


def test_vae_whole_fine_tune_with_an_anchor_keeps_the_latents_close_and_the_scaling_factor(tiny_vae, tmp_path):
    """train_vae.py --init <export> --anchor W (whole VAE, encoder included): the loss adds W times the MSE
    between the scaled latents and the init's, so after the same steps the latents of a fixed input have
    moved far less than in the same fine-tune without it, and the export keeps the init's scaling_factor
    (the UNet's convention); without an anchor the factor is measured again."""
    from diffusers import AutoencoderKL
    from training import train_vae

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    base = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        z0 = base.encode(x).latent_dist.mean
    drift, sf = {}, {}
    for w in ("0", "1e4"):
        out = tmp_path / f"export{w}"
        train_vae.main(["--init", str(tiny_vae), "--anchor", w, "--deterministic", "--every", "100", "--batch", "2",
                        "--crop", "32", "--lr", "1e-2", "--threads", "1", "--steps", "8", "--ema", "0", "--no-shared",
                        "--run", str(tmp_path / f"run{w}"), "--out", str(out)])
        vae = AutoencoderKL.from_pretrained(out)
        with torch.no_grad():
            drift[w] = float((vae.encode(x).latent_dist.mean - z0).pow(2).mean().sqrt())
        sf[w] = vae.config.scaling_factor
        assert any(not torch.equal(vae.state_dict()[k], base.state_dict()[k]) for k in base.state_dict()
                   if k.startswith("encoder."))  # the encoder is trained in both
    assert drift["1e4"] < 0.6 * drift["0"], drift  # 0.42x here; without the anchor term the runs are equal
    assert sf["1e4"] == pytest.approx(0.7)
    assert sf["0"] != pytest.approx(0.7)
    with pytest.raises(SystemExit) as stop:  # an anchor with nothing to anchor to is a usage error
        train_vae.main(["--anchor", "1", "--run", str(tmp_path / "none")])
    assert stop.value.code == 2


def test_vae_anchored_run_resumed_midway_equals_the_uninterrupted_run(tiny_vae, tmp_path, monkeypatch):
    """A resumed ``--anchor`` run still anchors to its ``--init`` weights (the reference is built from the
    init before the checkpoint is restored): a 4-step run stopped after step 2 and resumed ends with the
    same weights as the 4 steps in one go. Reference kind: the same script run without interruption. A
    reference rebuilt from the resumed weights would anchor steps 3-4 elsewhere, and the weights would differ."""
    from safetensors.torch import load_file
    from training import common as training_common, train_vae

    args = ["--init", str(tiny_vae), "--anchor", "1e3", "--deterministic", "--every", "100", "--batch", "2",
            "--crop", "32", "--lr", "1e-2", "--threads", "1", "--steps", "4", "--ema", "0", "--no-shared"]
    train_vae.main([*args, "--run", str(tmp_path / "once"), "--out", str(tmp_path / "once-export")])
    finished = training_common.Run.finished
    with monkeypatch.context() as m:  # the first session stops after step 2, as if its time were up
        m.setattr(training_common.Run, "finished", lambda self, steps, minutes: self.step >= 2)
        train_vae.main([*args, "--run", str(tmp_path / "split"), "--out", str(tmp_path / "split-export")])
    assert training_common.Run.finished is finished
    assert json.loads((tmp_path / "split" / "state.json").read_text())["step"] == 2
    train_vae.main([*args, "--run", str(tmp_path / "split"), "--out", str(tmp_path / "split-export")])
    assert json.loads((tmp_path / "split" / "state.json").read_text())["step"] == 4
    once = load_file(_saved(tmp_path / "once", "model"))
    split = load_file(_saved(tmp_path / "split", "model"))
    init = load_file(tiny_vae / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(once[k], init[k]) for k in once if k.startswith("encoder."))  # the encoder trained
    for k in once:
        torch.testing.assert_close(split[k], once[k], rtol=1e-5, atol=1e-6)


def test_vae_val_clip_is_left_out_of_training_and_validates(tiny_vae, tmp_path, monkeypatch, capsys):
    """train_vae.py --val-clip NAME: that clip of ../shared/clips/train is read for validation only (the
    others and the photos still train), and the run says so."""
    import numpy as np
    from pipelines.video_io import write_video
    from training import train_vae

    shared = tmp_path / "train"
    (shared / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("kept.mp4", 16), ("held.mp4", 24)):
        write_video(shared / name, rng.integers(0, 255, (n, 32, 48, 3), dtype=np.uint8), fps=8, audio_from=None)
    monkeypatch.setattr(train_vae, "SHARED_TRAIN", shared)

    pool, used = train_vae.shared_pool(exclude="held.mp4")
    assert used == ["kept.mp4:2"] and len(pool) == 2 and pool[0].shape == (3, 32, 48)
    singles, pairs = train_vae.clip_frames(shared / "held.mp4"), train_vae.clip_frames(shared / "held.mp4", span=2)
    assert len(singles) == len(pairs) == 3 and pairs[0].shape == (2, 3, 32, 48)  # frames 0+1, 8+9, 16+17
    assert all(torch.equal(p[0], f) for p, f in zip(pairs, singles)) and not torch.equal(pairs[0][1], singles[0])
    triples = train_vae.clip_frames(shared / "held.mp4", span=3)  # frames 0-2, 8-10, 16-18 (train_tcm --chain)
    assert len(triples) == 3 and triples[0].shape == (3, 3, 32, 48)
    assert all(torch.equal(t[:2], p) for t, p in zip(triples, pairs)) and not torch.equal(triples[0][2], pairs[0][1])
    train_vae.main(["--init", str(tiny_vae), "--val-clip", "held.mp4", "--steps", "1", "--every", "1",
                    "--batch", "2", "--crop", "32", "--threads", "1", "--run", str(tmp_path / "run"),
                    "--out", str(tmp_path / "export"), "--color-jitter", "1.0"])
    out = capsys.readouterr().out
    assert "from " + str(shared) + " (kept.mp4:2)" in out and "validation: 3 frames of held.mp4" in out
    assert "colour-jittered copies" in out
    from training import train_latent_unet  # the UNet's --val-clip: the same split

    train_latent_unet.main(["--vae", str(tiny_vae), "--val-clip", "held.mp4", "--steps", "1", "--every", "1",
                            "--batch", "2", "--crop", "32", "--blocks", "32,32,32", "--threads", "1",
                            "--run", str(tmp_path / "unet"), "--out", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert "from " + str(shared) + " (kept.mp4:2)" in out  # the folder it read and each clip, as train_vae says
    assert "validation: 3 frames of held.mp4 (left out of training)" in out
    from training.common import TrainError

    with pytest.raises(TrainError, match="--val-clip absent.mp4: no such clip in"):
        train_vae.main(["--init", str(tiny_vae), "--val-clip", "absent.mp4", "--steps", "1",
                        "--run", str(tmp_path / "run2"), "--out", str(tmp_path / "export2")])


def test_color_jitter_turns_hue_and_scales_saturation_keeping_luma():
    """Reference kind: closed form. In YIQ, a hue turn of pi negates the chroma (I, Q): grey stays grey,
    pure red's chroma flips; a saturation gain s scales chroma by s; luma Y never changes."""
    import math

    import numpy as np
    from training import train_vae

    yiq = train_vae.YIQ
    np.testing.assert_allclose(train_vae.color_matrix(0.0, 1.0), np.eye(3), atol=1e-12)
    red = np.array([1.0, 0.0, 0.0])
    for hue, sat in ((math.pi, 1.0), (0.7, 1.6), (-2.0, 0.5)):
        out = yiq @ train_vae.color_matrix(hue, sat) @ red
        y, i, q = yiq @ red
        c, s_ = math.cos(hue), math.sin(hue)
        np.testing.assert_allclose(out, [y, sat * (c * i - s_ * q), sat * (s_ * i + c * q)], atol=1e-12)
    grey = torch.full((3, 4, 4), 0.2)
    torch.testing.assert_close(train_vae.color_jitter(grey, np.random.default_rng(0)), grey, atol=1e-6, rtol=0)
    # pixels stay in [-1, 1] and the crops' colour changes with probability jitter
    pool = [torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    plain = train_vae.sample_crops(pool, np.random.default_rng(3), 4, 16)
    same = train_vae.sample_crops(pool, np.random.default_rng(3), 4, 16, jitter=0.0)
    jittered = train_vae.sample_crops(pool, np.random.default_rng(3), 4, 16, jitter=1.0)
    assert torch.equal(plain, same)
    assert jittered.abs().max() <= 1 and not torch.allclose(jittered, plain, atol=1e-2)


def test_vae_from_scratch_takes_its_norm_groups(tmp_path):
    """--norm-groups reaches the exported AutoencoderKL (8 groups keep 4 channels per group in a
    32-channel stage; 32 groups there normalise every channel alone and grey out uniform colours)."""
    from diffusers import AutoencoderKL
    from training import train_vae

    train_vae.main(["--blocks", "8,16,16", "--layers", "1", "--no-mid-attention", "--norm-groups", "4",
                    "--steps", "1", "--every", "1", "--batch", "2", "--crop", "32", "--threads", "1",
                    "--color-jitter", "0.5", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    vae = AutoencoderKL.from_pretrained(tmp_path / "export")
    assert vae.config.norm_num_groups == 4 and vae.encoder.conv_norm_out.num_groups == 4
    assert tuple(vae.config.block_out_channels) == (8, 16, 16)


def test_run_cosine_decays_the_learning_rate_from_1_to_0_over_the_steps(tmp_path):
    """Run.cosine (train_vae's schedule, train_tcm --cosine): closed form 0.5 + 0.5 cos(pi step / steps),
    also after resuming mid-run; a resumed log drops the rows written after the last save."""
    import math

    from training.common import Run

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    (tmp_path / "run").mkdir()
    run = Run(tmp_path / "run", {"model": model}, opt, ["step"])
    assert run.cosine(4, 0.0) == 1.0
    run.step = 1
    assert run.cosine(4, 0.0) == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))
    run.step = 2
    run.writer.writerows([[1], [2]])
    run.save()
    run.close()
    with (tmp_path / "run" / "log.csv").open("a") as log:  # a run stopped after step 3, its rows on disk
        log.write("3\n4")  # ... the last one cut short
    resumed = Run(tmp_path / "run", {"model": model}, opt, ["step"])
    assert resumed.step == 2 and resumed.cosine(4, 0.0) == pytest.approx(0.5)
    assert (tmp_path / "run" / "log.csv").read_text().splitlines() == ["step", "1", "2"]  # rows after the save dropped
    resumed.step = 4
    assert resumed.cosine(4, 0.0) == pytest.approx(0.0, abs=1e-12)
    resumed.close()


def test_jpeg_degrade_compresses_the_low_res_crops_only_and_keeps_their_colours():
    """hr_lr_batch(jpeg=p) (train_latent_unet --jpeg): with p = 0 the clean antialiased downscale as before;
    with p = 1 every low-res crop is JPEG-compressed (lossy, reproducible per seed), the ground truth is
    untouched, and colours survive the RGB/BGR round trip (a red frame stays red). Reference kinds: the
    closed-form downscale path, and OpenCV's JPEG codec."""
    import numpy as np
    from pipelines.degradation import downscale
    from training.latent_parts import hr_lr_batch, jpeg_degrade
    from training.train_vae import psnr

    g = torch.Generator().manual_seed(0)
    pool = [torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=192, mode="bicubic",
                                            align_corners=False)[0].clamp(0, 1) * 2 - 1]
    hr0, lr0 = hr_lr_batch(pool, np.random.default_rng(1), 4, 128)
    hr1, lr1 = hr_lr_batch(pool, np.random.default_rng(1), 4, 128, jpeg=1.0)
    _, again = hr_lr_batch(pool, np.random.default_rng(1), 4, 128, jpeg=1.0)
    assert torch.equal(hr0, hr1) and torch.equal(lr0, downscale(hr0, 4).clamp(-1, 1))
    assert torch.equal(lr1, again) and lr1.abs().max() <= 1
    db = float(psnr(lr1, lr0))
    assert 20 < db < 45, db  # 25.5 dB here: compressed (quality 30-90, saturated colours), not destroyed
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    out = jpeg_degrade(red, np.random.default_rng(0), 1.0)
    assert out[0, 0].mean() > 0.8 and out[0, 2].mean() < -0.8
    assert torch.equal(jpeg_degrade(red, np.random.default_rng(0), 0.0), red)


# ----------------------------------------------------------------------------- bad input and run folders
# found by a hunt on the training scripts: each was a traceback (or silent data loss) before


def _foreign(d: Path) -> Path:
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("keep me")
    return d / "notes"


def _run_of(d: Path, state: str | None, script: str = "train_tcm") -> Path:
    run = d / "oldrun"
    run.mkdir()
    if state is not None:
        (run / "state.json").write_text(state.replace("SCRIPT", script))
    return run


TRAIN_BAD = [
    ("every 0", lambda d: ["--every", "0"], "--every must be >= 1, got 0"),
    ("batch 0", lambda d: ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("crop 7", lambda d: ["--crop", "7"], "--crop must be a multiple of 16, got 7"),
    ("device name", lambda d: ["--device", "gpu"], "--device 'gpu' is not a device name"),
    ("missing init", lambda d: ["--init", str(d / "nope")], "--init " + "{d}/nope: no such folder"),
    ("run is a file", lambda d: ["--run", str(_corrupt_file(d))], "is a file; give a folder"),
    ("out is the run", lambda d: ["--out", str(d / "run")], "overlaps --run"),
    ("out holds the run", lambda d: ["--out", str(d)], "overlaps --run"),
    ("out is the init", lambda d: ["--init", str(_vae_copy(d)), "--out", str(d / "vae")], "overlaps --init"),
    ("out over other files", lambda d: ["--out", str(_foreign(d))], "holds other files and is not an exported model"),
    ("out over a folder of models", lambda d: ["--out", str(_models_parent(d))],
     "holds other files and is not an exported model"),
    ("run over other files", lambda d: ["--run", str(_foreign_run(d))], "holds other files (checkpoint-500..."),
    ("run of another script", lambda d: ["--run", str(_run_of(d, '{"step": 1, "script": "SCRIPT"}'))],
     "is a train_tcm run, not a train_vae one"),
    ("damaged state.json", lambda d: ["--run", str(_run_of(d, "{not json"))], "state.json is damaged"),
    ("missing checkpoint", lambda d: ["--run", str(_run_of(d, '{"step": 3, "checkpoint": "checkpoint-00000003"}'))],
     "checkpoint-00000003/last_model.safetensors is missing"),
]


def _models_parent(d: Path) -> Path:
    """A user's folder holding a model below it (an export there would delete the whole folder)."""
    (d / "models" / "vae-a").mkdir(parents=True)
    (d / "models" / "vae-a" / "config.json").write_text("{}")
    (d / "models" / "notes.txt").write_text("keep me")
    return d / "models"


def _foreign_run(d: Path) -> Path:
    """Another tool's training folder: its checkpoint, log and weights must survive."""
    (d / "exp" / "checkpoint-500").mkdir(parents=True)
    (d / "exp" / "checkpoint-500" / "model.safetensors").write_bytes(b"weights")
    (d / "exp" / "log.csv").write_text("epoch,loss\n")
    (d / "exp" / "last_best.safetensors").write_bytes(b"best")
    return d / "exp"


def _corrupt_file(d: Path) -> Path:
    (d / "afile").write_text("x")
    return d / "afile"


def _vae_copy(d: Path) -> Path:
    tiny.vae(down=3).save_pretrained(d / "vae")
    return d / "vae"


@pytest.mark.parametrize("make, expected", [b[1:] for b in TRAIN_BAD], ids=[b[0] for b in TRAIN_BAD])
def test_training_bad_input_is_one_line_exit_2(tmp_path, capsys, make, expected):
    """train_vae.py through its entry point: one line on stderr naming the problem, exit 2, and the
    folders it was given left as they were."""
    from training import train_vae
    from training.common import entry

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    extra = make(scratch)
    capsys.readouterr()
    before = {q: q.read_bytes() for q in scratch.rglob("*") if q.is_file()}
    argv = ["--run", str(scratch / "run"), "--steps", "1", "--batch", "2", "--crop", "32", "--no-shared",
            "--threads", "1", *extra]
    with pytest.raises(SystemExit) as exc:
        entry(lambda: train_vae.main(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected.format(d=scratch) in err, err
    assert {q: q.read_bytes() for q in scratch.rglob("*") if q.is_file()} == before


def test_a_run_folder_of_another_model_is_refused_in_one_line(tmp_path):
    """Resuming with options that build another architecture (other layer shapes): a TrainError naming
    the run, not a multi-kilobyte load_state_dict dump."""
    from training.common import Run, TrainError

    small = torch.nn.Linear(2, 2)
    run = Run(tmp_path / "run", {"model": small}, torch.optim.AdamW(small.parameters()), ["step"])
    run.step = 1
    run.save()
    run.close()
    big = torch.nn.Linear(3, 3)
    with pytest.raises(TrainError, match="holds a different model than these options build") as e:
        Run(tmp_path / "run", {"model": big}, torch.optim.AdamW(big.parameters()), ["step"])
    assert "\n" not in str(e.value)


def test_a_save_cut_short_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save interrupted after the new weights were written but before state.json named them: the
    resumed run starts from the previous checkpoint's step *and* weights (before: step 1, step 2's weights)."""
    from training import common
    from training.common import Run

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "run").mkdir()
    run = Run(tmp_path / "run", {"model": model}, opt, ["step"])
    run.step = 1
    run.save()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    run.step = 2

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_optimizer", killed)  # the weights are on disk, the optimizer is not
    with pytest.raises(KeyboardInterrupt):
        run.save()
    monkeypatch.undo()
    run.close()
    fresh = torch.nn.Linear(2, 2)
    resumed = Run(tmp_path / "run", {"model": fresh}, torch.optim.AdamW(fresh.parameters()), ["step"])
    assert resumed.step == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    resumed.step = 2
    resumed.save()  # the cut-short folder is replaced, and the old checkpoint removed once the new one is named
    assert sorted(q.name for q in (tmp_path / "run").iterdir() if q.is_dir()) == ["checkpoint-00000002"]
    resumed.close()


def test_checkpoints_and_exports_get_the_permissions_the_umask_allows(tmp_path):
    """A run's checkpoint (last_*.safetensors) and an exported model (diffusion_pytorch_model.safetensors) came
    out 0600, as safetensors writes its files: now 0666 less the umask, what open() gives."""
    from training.common import Run, replace_dir

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "run").mkdir()
    old = os.umask(0o002)
    try:
        run = Run(tmp_path / "run", {"model": model}, opt, ["step"])
        run.step = 1
        run.save()
        run.close()
        tiny.vae().save_pretrained(tmp_path / "export.tmp")
        replace_dir(tmp_path / "export.tmp", tmp_path / "export")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"last_model.safetensors", "last_opt.safetensors", "diffusion_pytorch_model.safetensors"} <= \
        {p.name for p in files}
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o664} == {}


def test_a_timed_session_stopped_early_continues_its_budget(tmp_path):
    """--minutes M: the learning-rate schedule runs over the time budget. A session stopped after 2 of 10
    minutes, resumed with the same --minutes, goes on at 20 % of its schedule (it restarted at 0 before);
    another --minutes, or a budget already used up, starts a new one. A log.csv without a checkpoint
    (a run killed before its first save) is not appended to."""
    import time

    from training.common import Run

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text("step\n1\n2\n3\n")  # rows of a run killed before saving
    run = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=10)
    run.t_session = time.time() - 120  # two minutes into the budget
    run.step = 5
    run.save()
    run.close()
    assert (tmp_path / "run" / "log.csv").read_text() == "step\n"
    same = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=10)
    assert same.progress(10 ** 9, 10) == pytest.approx(0.2, abs=0.01)
    same.close()
    other = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=5)
    assert other.progress(10 ** 9, 5) == pytest.approx(0.0, abs=0.01)
    other.t_session = time.time() - 700  # a session that used its whole budget (10 min) and more
    other.minutes = 10
    other.save()
    other.close()
    again = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=10)
    assert again.progress(10 ** 9, 10) == pytest.approx(0.0, abs=0.01)
    again.t_session = time.time() - 360  # 6 of 10 minutes, then the run reaches its --steps: it ended as planned
    again.step = 20
    again.save()
    assert again.finished(20, 10)
    again.close()
    longer = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=10)  # --steps raised: a new budget
    assert longer.progress(10 ** 9, 10) == pytest.approx(0.0, abs=0.01)
    longer.t_session = time.time() - 120
    longer.save()  # killed after 2 minutes ...
    longer.close()
    unlimited = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=0)
    unlimited.save()  # ... then a session with no time limit
    unlimited.close()
    timed = Run(tmp_path / "run", {"model": model}, opt, ["step"], minutes=10)  # no stale 2-minute budget
    assert timed.progress(10 ** 9, 10) == pytest.approx(0.0, abs=0.01)
    timed.close()


def test_train_vsr_exports_into_its_run_folder_not_over_the_shipped_model(tmp_path, capsys):
    """train_vsr.py with no --out wrote weights/vsr-x4 (the shipped pixel model) and its loss plot; the
    export now goes to <run>/export and the shipped files stay as they are."""
    import hashlib

    from training import train_vsr

    shipped = {q: hashlib.sha256(q.read_bytes()).hexdigest() for q in (ROOT / "weights").rglob("*") if q.is_file()}
    train_vsr.main(["--run", str(tmp_path / "run"), "--steps", "1", "--every", "1", "--batch", "1", "--crop", "32",
                    "--threads", "1"])
    assert (tmp_path / "run" / "export" / "unet" / "config.json").exists()
    assert json.loads((tmp_path / "run" / "export" / "vsr_config.json").read_text())["train_steps"] == 1
    assert {q: hashlib.sha256(q.read_bytes()).hexdigest() for q in (ROOT / "weights").rglob("*") if q.is_file()} \
        == shipped
    assert "data: " in capsys.readouterr().out


def test_the_tiny_text_encoder_leaves_the_callers_random_stream_alone(tmp_path):
    """train_latent_unet built its text encoder with torch.manual_seed(0) after setup() had seeded --seed,
    so every --seed gave the same UNet initialisation; the encoder now seeds a forked stream."""
    from training.latent_parts import tiny_text_encoder

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    enc, _ = tiny_text_encoder(tmp_path / "tok")
    assert torch.equal(torch.rand(3), expected)
    enc2, _ = tiny_text_encoder(tmp_path / "tok2")  # and the encoder itself stays the seeded one
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), enc2.state_dict().values()))


def test_every_training_scripts_help_names_the_run_folder_layout_it_uses():
    # train_vae.py --help said "resumable from runs/<name>/last.*", a layout no script writes any more
    # (README: checkpoint-<step>/ and state.json in --run, the export in <run>/export)
    import ast

    for name in ("train_vsr", "train_vae", "train_latent_unet", "train_preview", "train_tcm"):
        doc = ast.get_docstring(ast.parse((ROOT / "training" / f"{name}.py").read_text()))
        assert "last.*" not in doc, name
