"""Train the latent x4 model's VAE: a small diffusers ``AutoencoderKL`` (4x down, 4 latent channels).

Stage 1 of the latent default model (StableVSR layout: ``vae/``, then a latent ``unet/`` trained on
its frozen latents). Loss: L1 reconstruction (``--loss``) plus a small KL term (``--kl``), so the latent
stays close to a deterministic code the UNet can learn. The exported ``scaling_factor`` is
``1 / std`` of the posterior means on training crops, so scaled latents have about unit variance.

A fine-tune (``--init``) can train the decoder alone (``--decoder-only``: the latents, and so a UNet
trained on them, stay exactly as they were) or the whole VAE; ``--anchor W`` then adds
``W * mean((s E(x) - s E0(x))^2)`` (``s`` the scaling factor, ``E0`` the init's encoder) so that the
latents stay close to those the UNet was trained on.

Data (said at start, with counts): frames of ../shared/clips/train/*.mp4 and its photos/ when that
folder exists, scikit-image's photographs, wolf.mp4 (its last frames held out for validation) and
procedural textures, with random rescale, flips and rotations. woman-running.mp4 is the evaluation
clip and is never read here.

Usage (seeded, resumable from the --run folder; the export goes to <run>/export unless --out is given):
    nohup python training/train_vae.py --threads 2 > runs/vae.log 2>&1 &
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize  # noqa: E402
from training.common import (Run, TrainError, ema_update, entry, local_folder, optimizer_step, parser,  # noqa: E402
                             plot_log, replace_dir, prefetch, rescaled_crop, setup, step_randomness)
from training.train_vsr import SHARED, image_pool, procedural, psnr, to_tensor, wolf_available  # noqa: E402

SHARED_TRAIN = SHARED / "clips" / "train"
EVAL_CLIP_NAME = "woman-running"


def vae_config(blocks=(32, 64, 64), mid_attention: bool = True, layers: int = 1, groups: int = 32) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=layers,
        block_out_channels=tuple(blocks), norm_num_groups=groups, sample_size=256,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=mid_attention,
    )


def shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    """``img`` (H, W, C) resized (area) so that its long side is at most ``max_side``."""
    s = max_side / max(img.shape[:2])
    return cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else img


def clip_frames(path: Path, every: int = 8, max_side: int = 720, span: int = 1) -> list[torch.Tensor]:
    """Frame i of the video ``path`` for every i divisible by ``every`` (long side <= max_side), as
    (3, H, W) in [-1, 1]; with ``span`` k > 1, frames i .. i + k - 1 stacked as (k, 3, H, W) (pairs: 2)."""
    if span > 1 and every < span:
        raise ValueError(f"runs of {span} frames need every >= {span}")
    out, cap, i, run = [], cv2.VideoCapture(str(path)), 0, []
    while True:
        ok, f = cap.read()
        if not ok:
            return out
        k, i = i % every, i + 1
        if k >= span:
            continue  # a frame no one uses: not converted
        img = to_tensor(shrink(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), max_side))
        if span == 1:
            out.append(img)
            continue
        run = [img] if k == 0 else run + [img]
        if len(run) == span:
            out.append(torch.stack(run))


def shared_pool(every: int = 8, max_side: int = 720, exclude: str | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """Every ``every``-th frame of each clip in ../shared/clips/train (but ``exclude``, a clip's file
    name) and its photos (long side <= max_side)."""
    pool, used = [], []
    if not SHARED_TRAIN.is_dir():
        return pool, used
    for clip in sorted(SHARED_TRAIN.glob("*.mp4")):
        if EVAL_CLIP_NAME in clip.name or clip.name == exclude:
            continue
        frames = clip_frames(clip, every, max_side)
        pool += frames
        used.append(f"{clip.name}:{len(frames)}")
    for photo in sorted((SHARED_TRAIN / "photos").glob("*")):
        img = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if img is not None:
            pool.append(to_tensor(shrink(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), max_side)))
            used.append(photo.name)
    return pool, used


# RGB -> YIQ (NTSC): luma and two chroma axes, so that a rotation of (I, Q) turns the hue
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_matrix(hue: float, saturation: float) -> np.ndarray:
    """3x3 RGB -> RGB map that keeps the luma Y and turns the chroma (I, Q) by ``hue`` radians, scaled
    by ``saturation``:  rgb' = YIQ^-1 diag(1, s R(hue)) YIQ rgb."""
    c, s = math.cos(hue) * saturation, math.sin(hue) * saturation
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return np.linalg.inv(YIQ) @ chroma @ YIQ


def color_jitter(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) in [-1, 1] with a random hue turn (uniform) and saturation gain (1 to 2), clamped to
    the RGB cube: the saturated colours natural training frames rarely hold (measured: the first VAE
    turned the evaluation clip's saturated reds brown, 72 % of its squared error in 29 % of the pixels)."""
    m = torch.as_tensor(color_matrix(rng.uniform(-math.pi, math.pi), rng.uniform(1.0, 2.0)), dtype=img.dtype)
    rgb = (img + 1) / 2
    out = torch.einsum("ij,jhw->ihw", m.to(img.device), rgb)
    return out.clamp(0, 1) * 2 - 1


def validation_frames(val_clip: str | None, wolf: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    """Every 8th frame of ``val_clip`` (a file in ../shared/clips/train, which :func:`shared_pool` must
    then exclude from training) and its description; without one, wolf's held-out last frames."""
    if not val_clip:
        return wolf, ("held-out wolf frames" if wolf_available() else
                      "held-out scikit-image photographs (no wolf.mp4 here)")
    if not (SHARED_TRAIN / val_clip).is_file():
        raise TrainError(f"--val-clip {val_clip}: no such clip in {SHARED_TRAIN}")
    val = clip_frames(SHARED_TRAIN / val_clip)
    if not val:
        raise TrainError(f"--val-clip {val_clip}: no frames read from {SHARED_TRAIN / val_clip}")
    return val, f"frames of {val_clip} (left out of training)"


def validation_tensors(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation frames resized to 256x448 (N, 3, 256, 448), and colour-jittered copies of them that
    are the same every time (a fixed seed)."""
    plain = torch.stack([bicubic_resize(v, (256, 448)) for v in frames]).clamp(-1, 1)
    rng = np.random.default_rng(12345)
    return plain, torch.stack([color_jitter(v, rng) for v in plain])


def sample_crops(pool, rng: np.random.Generator, batch: int, crop: int, jitter: float = 0.0) -> torch.Tensor:
    """(B, 3, crop, crop) in [-1, 1]: random rescale (0.25..1), crop, flip, rotation; some procedural;
    with probability ``jitter`` a :func:`color_jitter` (no extra draws at 0, so older runs replay).
    Made on the pool's device (see :func:`pool_to`): the draws are on the host, so no sync."""
    out = []
    for _ in range(batch):
        if rng.random() < 0.1:
            img = procedural(rng, crop).to(pool[0].device)
        else:
            img = rescaled_crop(pool[rng.integers(len(pool))], rng, crop, 0.25)
        if rng.random() < 0.5:
            img = img.flip(-1)
        img = torch.rot90(img, int(rng.integers(4)), dims=(-2, -1))
        if jitter > 0 and rng.random() < jitter:
            img = color_jitter(img, rng)
        out.append(img)
    return torch.stack(out)


def pool_to(pool: list[torch.Tensor], device: torch.device, keep_on_host: bool) -> list[torch.Tensor]:
    """The training images on ``device`` (a GPU then makes the crops itself: CPU data loading kept a
    first H200 lease's stages at 1-10 steps/s), unless ``keep_on_host``."""
    return pool if keep_on_host or device.type == "cpu" else [p.to(device) for p in pool]


@torch.no_grad()
def latent_std(vae: AutoencoderKL, pool, device, n: int = 64, crop: int = 128) -> float:
    """Standard deviation of the posterior means on ``n`` fixed training crops."""
    x = sample_crops(pool, np.random.default_rng(777), n, crop)
    zs = [vae.encode(x[i:i + 16].to(device)).latent_dist.mean for i in range(0, n, 16)]
    return float(torch.cat(zs).std())


def export(vae: AutoencoderKL, out: Path, scaling_factor: float) -> None:
    """Write ``out`` (a diffusers AutoencoderKL folder, safetensors) atomically."""
    vae.register_to_config(scaling_factor=scaling_factor)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    replace_dir(tmp, out)


def latent_drift(z: torch.Tensor, z0: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Mean squared change of the scaled latents: mean((s z - s z0)^2), s the scaling factor (the
    anchor's loss; its square root is the RMS drift the run reports)."""
    return (scaling_factor * (z - z0)).pow(2).mean()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean: (B, 3, H, W) in [-1, 1] -> same."""
    return vae.decode(vae.encode(x).latent_dist.mean).sample


def main(argv=None) -> None:
    p = parser(__doc__, ROOT / "training" / "checkpoints" / "vae-x4", 200_000, 16, 64, 1e-3)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--deterministic", action="store_true",
                   help="decode the posterior mean (no sampling noise): a plain autoencoder, for a high-PSNR finish")
    p.add_argument("--ema", type=float, default=0.999)
    # defaults from a 400-step A/B on this CPU (example clip reconstruction, raw weights): blocks 32,64,64 with
    # mid-block attention, L1, 64 px crops: 23.4 dB; blocks 32,64,96 without attention, L1 + MSE, 48 px: 19.2 dB
    p.add_argument("--blocks", default="32,64,64")
    p.add_argument("--layers", type=int, default=1, help="resnet layers per block (the decoder has one more)")
    p.add_argument("--no-mid-attention", dest="mid_attention", action="store_false")
    p.add_argument("--loss", default="l1", choices=("l1", "l1+mse", "mse"))
    p.add_argument("--norm-groups", type=int, default=32,
                   help="GroupNorm groups (32 with a 32-channel stage normalises every channel on its own)")
    p.add_argument("--init", type=Path, default=None, help="an exported VAE folder to start from (fine-tuning)")
    p.add_argument("--anchor", type=float, default=0.0,
                   help="with --init: add this weight times the MSE between the scaled latents and the init's, so a "
                        "whole-VAE fine-tune keeps the latents a UNet was trained on close (and keeps scaling_factor)")
    p.add_argument("--decoder-only", action="store_true",
                   help="train only the decoder: the encoder, and so the latents a UNet was trained on, stay fixed")
    p.add_argument("--val-clip", default=None,
                   help="validate on every 8th frame of this clip of ../shared/clips/train (a file name), left out "
                        "of training; default: wolf.mp4's last frames, which share a clip with training frames and "
                        "flatter the model (+1.66 dB there against +0.62 on the example clip in one fine-tune)")
    p.add_argument("--no-shared", action="store_true", help="skip ../shared/clips/train (tests)")
    p.add_argument("--color-jitter", type=float, default=0.0,
                   help="probability of a random hue turn and saturation gain per crop (train_vae.color_jitter)")
    args = p.parse_args(argv)
    if args.anchor and not args.init:
        p.error("--anchor needs --init (the VAE whose latents to stay close to)")

    device = setup(args, init=local_folder(args.init, "--init"))
    if args.init:  # start from an exported VAE (its architecture and weights); a saved run still resumes
        arch = {k: v for k, v in AutoencoderKL.load_config(args.init).items() if not k.startswith("_")}
        vae = AutoencoderKL.from_pretrained(args.init, torch_dtype=torch.float32).to(device)
    else:
        arch = vae_config(tuple(int(b) for b in args.blocks.split(",")), args.mid_attention, args.layers,
                          args.norm_groups)
        vae = AutoencoderKL(**arch).to(device)
    ema = AutoencoderKL(**arch).to(device).requires_grad_(False)
    ema.load_state_dict(vae.state_dict())
    if args.decoder_only:  # the latents (and so a UNet trained on them) stay exactly as they are
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    reference = None
    if args.init and not args.decoder_only:  # the init, frozen: latent drift is measured from it
        reference = AutoencoderKL(**arch).to(device).requires_grad_(False)
        reference.load_state_dict(vae.state_dict())
    trained = [q for q in vae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)

    base, val = image_pool()
    extra, used = ([], []) if args.no_shared else shared_pool(exclude=args.val_clip)
    val, val_name = validation_frames(args.val_clip, val)
    pool = pool_to(base + extra, device, args.workers > 0)
    print(f"data: {len(base)} skimage/wolf images, {len(extra)} from {SHARED_TRAIN} "
          f"({', '.join(used) if used else 'skipped (--no-shared)' if args.no_shared else 'absent'}), procedural "
          f"textures; validation: {len(val)} "
          f"{val_name}", flush=True)
    val_x, val_c = validation_tensors(val)
    run = Run(args.run, {"model": vae, "ema": ema}, opt, ["step", "loss", "seconds", "val_psnr_db", "latent_std",
                                                           "val_color_psnr_db"],
              script="train_vae", options=vars(args), minutes=args.minutes)
    print(f"params={sum(x.numel() for x in vae.parameters()) / 1e6:.2f}M "
          f"(decoder {sum(x.numel() for x in vae.decoder.parameters()) / 1e6:.2f}M) device={device}", flush=True)
    losses = {"l1": F.l1_loss, "mse": F.mse_loss, "l1+mse": lambda a, b: F.l1_loss(a, b) + F.mse_loss(a, b)}

    bar = tqdm(total=args.steps, initial=run.step, desc="vae", mininterval=10, file=sys.stdout)
    batches = prefetch(lambda s: sample_crops(pool, step_randomness(args.seed, s)[0], args.batch, args.crop,
                                              args.color_jitter), run.step, args.workers)
    while not run.finished(args.steps, args.minutes):
        step = run.step
        gen = step_randomness(args.seed, step)[1]
        x = next(batches).to(device)
        post = vae.encode(x).latent_dist
        noise = torch.randn(post.mean.shape, generator=gen).to(device)  # drawn either way: same data stream
        z = post.mean if args.deterministic else post.mean + post.std * noise
        loss = losses[args.loss](vae.decode(z).sample, x) + args.kl * post.kl().mean()
        if args.anchor:  # the scaled latents' mean squared change from the init's
            with torch.no_grad():
                ref = reference.encode(x).latent_dist.mean
            loss = loss + args.anchor * latent_drift(post.mean, ref, reference.config.scaling_factor)
        lr = args.lr * min(1.0, (step + 1) / 200) * run.cosine(args.steps, args.minutes)  # warmup, cosine
        for g in opt.param_groups:
            g["lr"] = lr
        optimizer_step(opt, loss, trained)
        ema_update(ema, vae, step, args.ema, warmup=args.init is None)
        run.step = step = step + 1
        bar.update(1)
        row = [step, f"{loss.item():.5f}", f"{run.seconds():.1f}", "", "", ""]
        if step % args.every == 0 or run.finished(args.steps, args.minutes):
            val_db = psnr(reconstruct(ema, val_x.to(device)).cpu(), val_x)
            color_db = psnr(reconstruct(ema, val_c.to(device)).cpu(), val_c)
            drift = None
            if reference is not None:  # the EMA's latents of the held-out frames against the init's
                with torch.no_grad():
                    v = val_x.to(device)
                    drift = latent_drift(ema.encode(v).latent_dist.mean, reference.encode(v).latent_dist.mean,
                                         reference.config.scaling_factor).sqrt().item()
            keep = args.init and (args.decoder_only or args.anchor)
            std = 1.0 / vae.config.scaling_factor if keep else latent_std(ema, pool, device)
            row[3:] = [f"{val_db:.3f}", f"{std:.4f}", f"{color_db:.3f}"]
            bar.write(f"step {step} loss {loss.item():.4f} held-out reconstruction {val_db:.2f} dB "
                      + (f"latent drift from the init (RMS, scaled, held out) {drift:.4f} " if drift is not None else "") +
                      f"(colour-jittered copies {color_db:.2f} dB), latent std {std:.3f}")
            run.writer.writerow(row)
            run.save()
            export(ema, args.out, 1.0 / std)
            plot_log(run.log_csv, args.run / "vae-loss.png", "reconstruction loss", "VAE training loss",
                     [("val_psnr_db", "EMA reconstruction"),
                                                                     ("val_color_psnr_db", "colour-jittered")], "PSNR (dB)", val_name)
            continue
        run.writer.writerow(row)
    run.close()


if __name__ == "__main__":
    entry(main)
