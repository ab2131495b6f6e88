"""Train the preview decoder: a tiny decoder that mimics the VAE decoder, for the TCM condition only.

Decoding every neighbour's x0 at every step is the main cost of StableVSR's method. The preview is a
diffusers ``AutoencoderTiny`` (TAESD's architecture, 4x up here) whose decoder is trained to
reproduce ``vae.decode(z)`` from the same latents ``z`` (the unscaled posterior means of training
crops, and noisy versions of them, since the TCM decodes approximated x0 at every noise level).
Only its decoder is used (``alignment.tcm_decoder=preview``, loaded from the model's
``preview_decoder/`` folder). Seeded, resumable, CSV log and plot, CUDA when present; reports the preview's
PSNR against the VAE decoder on held-out wolf frames.

    nohup python training/train_preview.py --model weights/latent-x4 --threads 2 > runs/preview.log 2>&1 &
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize  # noqa: E402
from training.common import (Run, entry, local_folder, optimizer_step, parser, plot_log, prefetch,  # noqa: E402
                             replace_dir, setup, step_randomness)
from training import train_vae  # noqa: E402  (its SHARED_TRAIN, read when used)
from training.train_vae import image_pool, pool_to, psnr, sample_crops, shared_pool  # noqa: E402
from training.train_vsr import wolf_available  # noqa: E402


def preview_config(latent_channels: int = 4) -> dict:
    """A TAESD-style tiny autoencoder, 4x: three decoder stages (two 2x upsamplings), 32 channels."""
    return dict(latent_channels=latent_channels, encoder_block_out_channels=(16, 16, 16),
                decoder_block_out_channels=(32, 32, 32), num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))


@torch.no_grad()
def held_out_psnr(preview, vae, frames: torch.Tensor) -> float:
    """PSNR of the preview against the VAE decoder, decoding the same latents of held-out frames."""
    z = vae.encode(frames).latent_dist.mean
    return psnr(preview.decode(z).sample.clamp(-1, 1), vae.decode(z).sample.clamp(-1, 1))


def main(argv=None) -> None:
    p = parser(__doc__, ROOT / "training" / "checkpoints" / "preview-x4", 20_000, 16, 64, 1e-3)
    p.add_argument("--model", type=Path, default=ROOT / "weights" / "latent-x4", help="folder with vae/")
    p.add_argument("--no-shared", action="store_true", help="skip ../shared/clips/train (tests)")
    p.add_argument("--init", type=Path, default=None, help="a preview_decoder/ folder to continue from")
    args = p.parse_args(argv)

    local_folder(args.model, "--model")
    local_folder(args.model / "vae", "--model's vae/:")
    device = setup(args, model=args.model, init=local_folder(args.init, "--init"))
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").to(device).eval().requires_grad_(False)
    preview = (AutoencoderTiny.from_pretrained(args.init, torch_dtype=torch.float32) if args.init else
               AutoencoderTiny(**preview_config(vae.config.latent_channels))).to(device)
    opt = torch.optim.AdamW(preview.decoder.parameters(), lr=args.lr, weight_decay=0.0)
    base, val = image_pool()
    extra, used = ([], []) if args.no_shared else shared_pool()
    pool = pool_to(base + extra, device, args.workers > 0)
    print(f"data: {len(base)} skimage/wolf images, {len(extra)} from {train_vae.SHARED_TRAIN} "
          f"({', '.join(used) if used else 'skipped (--no-shared)' if args.no_shared else 'absent'}); validation: "
          f"{len(val)} held-out {'wolf frames' if wolf_available() else 'scikit-image photographs'}", flush=True)
    val_x = torch.stack([bicubic_resize(v, (128, 224)) for v in val]).clamp(-1, 1).to(device)

    run = Run(args.run, {"model": preview}, opt, ["step", "loss", "seconds", "val_psnr_vs_vae_db"],
              script="train_preview", options=vars(args), minutes=args.minutes)
    print(f"preview decoder params {sum(x.numel() for x in preview.decoder.parameters()) / 1e6:.3f}M "
          f"(VAE decoder {sum(x.numel() for x in vae.decoder.parameters()) / 1e6:.2f}M), device {device}", flush=True)
    bar = tqdm(total=args.steps, initial=run.step, desc="preview", mininterval=10, file=sys.stdout)
    batches = prefetch(lambda s: sample_crops(pool, step_randomness(args.seed, s)[0], args.batch, args.crop),
                       run.step, args.workers)
    while not run.finished(args.steps, args.minutes):
        step = run.step
        gen = step_randomness(args.seed, step)[1]
        x = next(batches).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            # approximated x0 are blurry or noisy at large t: mimic the decoder there too
            z = z + torch.randn(z.shape, generator=gen).to(device) * z.std() * 0.3 * float(torch.rand(1, generator=gen))
            target = vae.decode(z).sample
        loss = F.l1_loss(preview.decode(z).sample, target)
        optimizer_step(opt, loss, preview.decoder.parameters(), clip=None)
        run.step = step = step + 1
        bar.update(1)
        row = [step, f"{loss.item():.5f}", f"{run.seconds():.1f}", ""]
        if step % args.every == 0 or run.finished(args.steps, args.minutes):
            row[3] = f"{held_out_psnr(preview, vae, val_x):.3f}"
            bar.write(f"step {step} loss {loss.item():.4f} preview vs VAE decoder on held-out frames: {row[3]} dB")
            run.writer.writerow(row)
            run.save()
            tmp = args.out.with_name(args.out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            preview.save_pretrained(tmp, safe_serialization=True)
            replace_dir(tmp, args.out)
            plot_log(run.log_csv, args.run / "preview-loss.png", "L1 to the VAE decoder", "preview decoder training",
                     [("val_psnr_vs_vae_db", "held-out frames")], "dB", "preview vs VAE decoder (PSNR)")
            continue
        run.writer.writerow(row)
    run.close()


if __name__ == "__main__":
    entry(main)
