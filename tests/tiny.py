"""Tiny seeded diffusers components built from config, for CPU tests (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel, UNet2DModel


def clip_parts(tmp: Path):
    """A tiny CLIP text encoder (hidden size 32) and a byte-level tokenizer written to ``tmp``."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.latent_parts import tiny_text_encoder

    return tiny_text_encoder(tmp, hidden=32, max_length=16)


def vae(latent_channels=4, down=2):
    torch.manual_seed(0)
    blocks = (32, 64, 64)[:down]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=blocks,
                         down_block_types=("DownEncoderBlock2D",) * down, up_block_types=("UpDecoderBlock2D",) * down,
                         norm_num_groups=32, sample_size=32,
                         force_upcast=False).eval()  # float16 runs test the VAE in float16 too


def cond_unet(in_channels=4, out_channels=4, class_embed=False):
    torch.manual_seed(0)
    kw = dict(num_class_embeds=1000, class_embed_type=None) if class_embed else {}
    return UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=out_channels,
                                block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                norm_num_groups=32, **kw).eval()


def controlnet_for(unet):
    torch.manual_seed(1)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32))  # x4 below the control image, as in StableVSR
    with torch.no_grad():  # from_unet zero-initialises the output convs; make the TCM actually do something
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return cn.eval()


def pixel_unet(in_channels=3, channels=(32, 64)):
    """``channels``: the two blocks' widths; narrower ones (e.g. (8, 16)) run several times faster."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=in_channels, out_channels=3, block_out_channels=channels,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=min(32, channels[0])).eval()


def textured_clip(frames=4, size=32, shift=(1.0, 0.0), seed=0) -> torch.Tensor:
    """(F, 3, size, size) in [-1, 1]: a smooth random texture translating by ``shift`` px per frame."""
    import numpy as np
    import cv2

    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.uniform(-1, 1, (size * 2, size * 2, 3)).astype(np.float32), (0, 0), 2.0)
    big = big / np.abs(big).max()
    out = []
    for f in range(frames):
        m = np.float32([[1, 0, size / 2 - shift[0] * f], [0, 1, size / 2 - shift[1] * f]])
        out.append(cv2.warpAffine(big, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).clamp(-1, 1).contiguous()


def ddpm_v():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False)


def save_residual_sr(path: Path, scale=2, residual_scale=0.1, channels=(32, 64)) -> Path:
    """A tiny model in this project's shipped layout (unet/, scheduler/, vsr_config.json)."""
    pixel_unet(in_channels=6, channels=channels).save_pretrained(path / "unet")
    ddpm_v().save_pretrained(path / "scheduler")
    (path / "vsr_config.json").write_text(json.dumps({"scale": scale, "residual_scale": residual_scale}))
    return path


def save_stablevsr_layout(path: Path) -> Path:
    """Tiny components in StableVSR's exact layout: unet (7 input channels), vae, text_encoder,
    tokenizer, controlnet (the TCM) and a v-prediction DDPM scheduler, saved with save_pretrained."""
    from diffusers import DDPMScheduler

    unet = cond_unet(in_channels=7)
    unet.save_pretrained(path / "unet")
    vae(down=3).save_pretrained(path / "vae")  # /4 latent like the x4 upscaler's VAE
    enc, tok = clip_parts(path / "_tok_src")
    enc.save_pretrained(path / "text_encoder")
    tok.save_pretrained(path / "tokenizer")
    controlnet_for(unet).save_pretrained(path / "controlnet")
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_pretrained(path / "scheduler")
    return path
