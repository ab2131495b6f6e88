"""Train the latent x4 model's VAE: a small diffusers ``AutoencoderKL`` (4x down, 4 latent channels).

Stage 1 of the latent default model (StableVSR layout: ``vae/``, then a latent ``unet/`` trained on
its frozen latents). Loss: L1 reconstruction (``--loss``) plus a small KL term (``--kl``), so the latent
stays close to a deterministic code the UNet can learn. The exported ``scaling_factor`` is
``1 / std`` of the posterior means on training crops, so scaled latents have about unit variance.

Data (said at start, with counts): frames of ../shared/clips/train/*.mp4 and its photos/ when that
folder exists, scikit-image's photographs, wolf.mp4 (its last frames held out for validation) and
procedural textures, with random rescale, flips and rotations. woman-running.mp4 is the evaluation
clip and is never read here.

Usage (seeded, resumable from runs/<name>/last.*):
    nohup python training/train_vae.py --threads 2 > runs/vae.log 2>&1 &
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize  # noqa: E402
from training.train_vsr import image_pool, procedural, psnr, to_tensor  # noqa: E402

SHARED_TRAIN = ROOT.parent / "shared" / "clips" / "train"
EVAL_CLIP_NAME = "woman-running"


def vae_config(blocks=(32, 64, 64), mid_attention: bool = True) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=tuple(blocks), norm_num_groups=32, sample_size=256,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=mid_attention,
    )


def shared_pool(every: int = 8, max_side: int = 720) -> tuple[list[torch.Tensor], list[str]]:
    """Every ``every``-th frame of each clip in ../shared/clips/train and its photos (long side <= max_side)."""
    pool, used = [], []
    if not SHARED_TRAIN.is_dir():
        return pool, used

    def shrink(img):
        s = max_side / max(img.shape[:2])
        return cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else img

    for clip in sorted(SHARED_TRAIN.glob("*.mp4")):
        if EVAL_CLIP_NAME in clip.name:
            continue
        cap, i, n = cv2.VideoCapture(str(clip)), 0, 0
        while True:
            ok, f = cap.read()
            if not ok:
                break
            if i % every == 0:
                pool.append(to_tensor(shrink(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))))
                n += 1
            i += 1
        used.append(f"{clip.name}:{n}")
    for photo in sorted((SHARED_TRAIN / "photos").glob("*")):
        img = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if img is not None:
            pool.append(to_tensor(shrink(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))))
            used.append(photo.name)
    return pool, used


def sample_crops(pool, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    """(B, 3, crop, crop) in [-1, 1]: random rescale (0.25..1), crop, flip, rotation; some procedural."""
    out = []
    for _ in range(batch):
        if rng.random() < 0.1:
            img = procedural(rng, crop)
        else:
            img = pool[rng.integers(len(pool))]
            s = rng.uniform(0.25, 1.0)
            h, w = img.shape[-2:]
            sh, sw = max(crop, int(h * s)), max(crop, int(w * s))
            img = bicubic_resize(img, (sh, sw)).clamp(-1, 1)
            y, x = rng.integers(0, sh - crop + 1), rng.integers(0, sw - crop + 1)
            img = img[:, y:y + crop, x:x + crop]
        if rng.random() < 0.5:
            img = img.flip(-1)
        out.append(torch.rot90(img, int(rng.integers(4)), dims=(-2, -1)))
    return torch.stack(out)


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
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def plot_log(log_csv: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({r["step"]: r for r in csv.DictReader(log_csv.open())}.values(), key=lambda r: int(r["step"]))
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    k = 50
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) > k else loss
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, loss, alpha=0.25, lw=0.5)
    ax[0].plot(steps[len(steps) - len(smooth):], smooth)
    ax[0].set(xlabel="step", ylabel="L1 + MSE", yscale="log", title="VAE training loss")
    val = [r for r in rows if r.get("val_psnr_db")]
    if val:
        ax[1].plot([int(r["step"]) for r in val], [float(r["val_psnr_db"]) for r in val], "o-")
    ax[1].set(xlabel="step", ylabel="PSNR (dB)", title="held-out wolf frames, reconstruction (EMA)")
    fig.tight_layout()
    fig.savefig(png.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(png.with_suffix(".tmp.png"), png)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean: (B, 3, H, W) in [-1, 1] -> same."""
    return vae.decode(vae.encode(x).latent_dist.mean).sample


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state as safetensors (no pickles in the repository): per parameter i, ``i.exp_avg``,
    ``i.exp_avg_sq`` and ``i.step``."""
    tensors = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(tensors, path)


def load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    """Restore :func:`save_optimizer`'s file (or an older ``last_opt.pt``)."""
    st = folder / "last_opt.safetensors"
    if not st.exists():
        opt.load_state_dict(torch.load(folder / "last_opt.pt", weights_only=True))
        return
    tensors = load_file(st)
    for i, p in enumerate(opt.param_groups[0]["params"]):
        state = {k.split(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if state:
            opt.state[p] = state


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "training" / "checkpoints" / "vae-x4")
    p.add_argument("--out", type=Path, default=ROOT / "training" / "checkpoints" / "vae-x4" / "export",
                   help="the EMA weights in diffusers layout (moves to weights/ once it meets its bar)")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--every", type=int, default=250, help="validate, checkpoint and export every N steps")
    p.add_argument("--device", default="auto")
    # defaults from a 400-step A/B on this CPU (example clip reconstruction, raw weights): blocks 32,64,64 with
    # mid-block attention, L1, 64 px crops: 23.4 dB; blocks 32,64,96 without attention, L1 + MSE, 48 px: 19.2 dB
    p.add_argument("--blocks", default="32,64,64")
    p.add_argument("--no-mid-attention", dest="mid_attention", action="store_false")
    p.add_argument("--loss", default="l1", choices=("l1", "l1+mse", "mse"))
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    arch = vae_config(tuple(int(b) for b in args.blocks.split(",")), args.mid_attention)
    vae = AutoencoderKL(**arch).to(device)
    ema = AutoencoderKL(**arch).to(device).requires_grad_(False)
    ema.load_state_dict(vae.state_dict())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)

    base, val = image_pool()
    extra, used = shared_pool()
    pool = base + extra
    print(f"data: {len(base) - 0} skimage/wolf images, {len(extra)} from {SHARED_TRAIN} "
          f"({', '.join(used) if used else 'absent'}), procedural textures; validation: {len(val)} "
          f"held-out wolf frames", flush=True)
    val_x = torch.stack([bicubic_resize(v, (256, 448)) for v in val]).clamp(-1, 1)

    meta_path, log_csv = args.run / "state.json", args.run / "log.csv"
    step, meta = 0, {}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        step = meta["step"]
        vae.load_state_dict(load_file(args.run / "last_model.safetensors"))
        ema.load_state_dict(load_file(args.run / "last_ema.safetensors"))
        load_optimizer(opt, args.run)
        print(f"resumed from step {step}", flush=True)
    print(f"params={sum(x.numel() for x in vae.parameters()) / 1e6:.2f}M "
          f"(decoder {sum(x.numel() for x in vae.decoder.parameters()) / 1e6:.2f}M) device={device}", flush=True)
    new_log = not log_csv.exists()
    logf = log_csv.open("a", newline="")
    writer = csv.writer(logf)
    if new_log:
        writer.writerow(["step", "loss", "seconds", "val_psnr_db", "latent_std"])

    bar = tqdm(total=args.steps, initial=step, desc="vae", mininterval=10, file=sys.stdout)
    t_start = time.time() - meta.get("seconds", 0.0)
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x = sample_crops(pool, rng, args.batch, args.crop).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        rec_loss = {"l1": lambda: F.l1_loss(rec, x), "mse": lambda: F.mse_loss(rec, x),
                    "l1+mse": lambda: F.l1_loss(rec, x) + F.mse_loss(rec, x)}[args.loss]()
        loss = rec_loss + args.kl * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 200) * (0.5 + 0.5 * math.cos(math.pi * min(1.0, step / args.steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        bar.update(1)
        row = [step, f"{loss.item():.5f}", f"{time.time() - t_start:.1f}", "", ""]
        if step % args.every == 0 or step == args.steps:
            val_db = psnr(reconstruct(ema, val_x.to(device)).cpu(), val_x)
            std = latent_std(ema, pool, device)
            row[3:] = [f"{val_db:.3f}", f"{std:.4f}"]
            bar.write(f"step {step} loss {loss.item():.4f} held-out reconstruction {val_db:.2f} dB, "
                      f"latent std {std:.3f}")
            meta.update(step=step, seconds=time.time() - t_start)
            save_file(vae.state_dict(), args.run / "last_model.safetensors")
            save_file(ema.state_dict(), args.run / "last_ema.safetensors")
            save_optimizer(opt, args.run / "last_opt.safetensors")
            (args.run / "last_opt.pt").unlink(missing_ok=True)
            meta_path.write_text(json.dumps(meta))
            export(ema, args.out, 1.0 / std)
            writer.writerow(row)
            logf.flush()
            plot_log(log_csv, args.run / "vae-loss.png")
            continue
        writer.writerow(row)
    logf.close()


if __name__ == "__main__":
    main()
