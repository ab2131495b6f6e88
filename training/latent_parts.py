"""Pieces shared by the latent x4 model's training scripts (StableVSR layout, trained in-project).

* :func:`tiny_text_encoder`: a small CLIP text encoder and a byte-level tokenizer. StableVSR's prompt is
  always '', so the text embedding is a fixed input; the encoder only has to exist in the layout.
* :func:`unet_config`: the latent UNet (``UNet2DConditionModel``, 7 input channels = 4 latents + the
  low-res frame in [-1, 1], at the low-res size, no class embedding).
* :func:`scheduler`: DDPM, v-prediction, cosine schedule, trailing spacing.
* :func:`hr_lr_batch`: ground-truth crops and their x4 low-res frames from the training pool, optionally
  JPEG-compressed (:func:`jpeg_degrade`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

SCALE = 4


def tiny_text_encoder(folder: Path, hidden: int = 64, seed: int = 0, max_length: int = 8):
    """A seeded 2-layer CLIP text encoder and a byte-level CLIP tokenizer (files written to ``folder``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    with torch.random.fork_rng(devices=[]):  # its own seed; the caller's CPU stream (--seed) is left as it was
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would also reseed the accelerators')
        enc = CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                                           num_hidden_layers=2, vocab_size=len(vocab),
                                           max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                                           pad_token_id=1)).eval()
    return enc, tok


@torch.no_grad()
def empty_prompt_embedding(enc, tok) -> torch.Tensor:
    """(1, L, D): the embedding of '' the pipeline computes (padding to the tokenizer's max length)."""
    ids = tok("", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return enc(ids.input_ids.to(enc.device))[0]


def unet_config(blocks=(64, 128, 192), cross_attention_dim: int = 64) -> dict:
    return dict(
        sample_size=64, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=tuple(blocks),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")


def hr_lr_batch(pool, rng: np.random.Generator, batch: int, crop: int, jpeg: float = 0.0):
    """(hr, lr): ground-truth crops (B, 3, crop, crop) and their antialiased bicubic x4 downscales, in [-1, 1];
    with ``jpeg`` > 0 each low-res crop is JPEG-compressed with that probability (:func:`jpeg_degrade`)."""
    from pipelines.degradation import downscale
    from training.train_vae import sample_crops

    hr = sample_crops(pool, rng, batch, crop)
    lr = downscale(hr, SCALE).clamp(-1, 1)
    return hr, jpeg_degrade(lr, rng, jpeg) if jpeg > 0 else lr


def jpeg_degrade(lr: torch.Tensor, rng: np.random.Generator, probability: float,
                 quality: tuple[int, int] = (30, 90)) -> torch.Tensor:
    """Each frame of ``lr`` ((B, 3, h, w) in [-1, 1]), with ``probability``, JPEG-encoded by OpenCV at a
    quality drawn uniformly from ``quality`` (4:2:0 chroma) and decoded: the blocking, ringing and chroma
    loss of compressed clips, on which the model trained on clean downscales loses most of its gain
    (``benchmarks/compressed_input.py``). Frames are quantised to uint8 only when compressed."""
    import cv2
    from pipelines.video_io import to_tensor, to_uint8

    out = lr.clone()
    for i, rgb in enumerate(to_uint8(lr)):
        hit, q = rng.random() < probability, int(rng.integers(quality[0], quality[1] + 1))
        if not hit:
            continue
        _, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        out[i] = to_tensor(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)[None])[0]
    return out
