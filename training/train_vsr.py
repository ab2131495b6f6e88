"""Train the shipped x4 super-resolution diffusion model (pixel-space UNet2DModel, v-prediction).

The model denoises a *normalised residual*: x0 = (HR - bicubic_up(LR)) / residual_scale, conditioned
on the bicubic-upscaled frame concatenated to its input channels. ``residual_scale`` is the
residual's standard deviation on the training data, so x0 has about unit variance and the
cosine schedule (designed for unit-variance data) does not drown the signal.

Data: scikit-image's bundled photographs, frames of ../shared/clips/wolf.mp4 (copied into
training/data/ once) and procedural textures. woman-running.mp4 is the evaluation clip and is
never read here.

Usage (seeded, resumable from the --run folder; the export goes to <run>/export unless --out is given):
    nohup python training/train_vsr.py --threads 1 > runs/train.log 2>&1 &
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize, downscale, upscale  # noqa: E402
from training.common import (Run, TrainError, ema_update, entry, optimizer_step, parser, plot_log,  # noqa: E402
                             replace_dir, rescaled_crop, setup, step_randomness)

WOLF_COPY = ROOT / "training" / "data" / "wolf.mp4"
# ../shared beside the checkout, or another copy of it (BISWEEP_SHARED, e.g. training/pack_gpu_data.py's)
SHARED = Path(os.environ.get("BISWEEP_SHARED", ROOT.parent / "shared"))
HELD_OUT_WOLF = 4  # the last frames of wolf.mp4 are the validation set


def unet_config(scale: int) -> dict:
    return dict(
        sample_size=64, in_channels=6, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 64, 128), norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
    )


def scheduler() -> DDPMScheduler:
    # trailing spacing: a short or partial (strength < 1) schedule never ends on a lone t=0 step
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")


# ----------------------------------------------------------------------------- data
def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HWC (RGB) or HW -> float (3, H, W) in [-1, 1]."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def wolf_available() -> bool:
    return WOLF_COPY.exists() or (SHARED / "clips" / "wolf.mp4").exists()


def read_wolf() -> list[np.ndarray]:
    """wolf.mp4's frames (copied once from ../shared/clips into training/data/); [] when neither exists."""
    if not WOLF_COPY.exists():
        src = SHARED / "clips" / "wolf.mp4"
        if not src.exists():
            print(f"note: {src} is absent: training without wolf.mp4", flush=True)
            return []
        WOLF_COPY.parent.mkdir(parents=True, exist_ok=True)
        tmp = WOLF_COPY.with_name(f".{WOLF_COPY.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, WOLF_COPY)  # another run reading the copy never sees half of it
    cap, frames = cv2.VideoCapture(str(WOLF_COPY)), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    return frames


def image_pool() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    import skimage.data as sk

    colour = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
              "immunohistochemistry", "retina", "cat", "colorwheel"]
    grey = ["brick", "grass", "gravel", "camera", "moon", "page", "text", "coins", "clock"]
    pool = []
    for n in colour + grey:
        try:  # some scikit-image versions fetch a few of these over the network
            pool.append(to_tensor(getattr(sk, n)()))
        except Exception as err:  # noqa: BLE001
            print(f"note: skimage.data.{n} unavailable ({type(err).__name__}); training without it", flush=True)
    wolf = [to_tensor(f) for f in read_wolf()]
    if not wolf:  # without ../shared: validate on two of the photographs instead (they stay out of training)
        return pool[:-2], pool[-2:]
    return pool + wolf[:-HELD_OUT_WOLF], wolf[-HELD_OUT_WOLF:]


def procedural(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A random texture: oriented gratings, hard-edged shapes and coloured noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(rng.integers(1, 4)):
        th, f = rng.uniform(0, np.pi), rng.uniform(0.05, 0.9)
        wave = np.sin(f * (np.cos(th) * xx + np.sin(th) * yy) + rng.uniform(0, 6.3))
        img += wave[..., None] * rng.uniform(-0.6, 0.6, 3)
    for _ in range(rng.integers(0, 6)):
        c, r = rng.uniform(0, size, 2), rng.uniform(2, size / 3)
        mask = (np.abs(xx - c[0]) < r) & (np.abs(yy - c[1]) < r * rng.uniform(0.3, 1.5))
        if rng.random() < 0.5:
            mask = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 < r**2
        img[mask] = rng.uniform(-1, 1, 3)
    img += rng.normal(0, rng.uniform(0, 0.15), img.shape).astype(np.float32)
    return torch.from_numpy(np.clip(img, -1, 1)).permute(2, 0, 1)


def degrade_lr(lr: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mild extra degradations on some low-res crops (most stay clean bicubic, as at test time)."""
    if rng.random() < 0.15:
        lr = lr + torch.from_numpy(rng.normal(0, rng.uniform(0.002, 0.02), lr.shape).astype(np.float32))
    if rng.random() < 0.15:
        u8 = ((lr.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
        lr = torch.from_numpy(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)).permute(2, 0, 1).float() / 127.5 - 1
    return lr.clamp(-1, 1)


def sample_batch(pool, rng: np.random.Generator, batch: int, crop: int, scale: int):
    """Returns (hr, bicubic) crops, both (B, 3, crop, crop) in [-1, 1]."""
    hrs, bics = [], []
    for _ in range(batch):
        if rng.random() < 0.2:
            hr = procedural(rng, crop)
        else:
            hr = rescaled_crop(pool[rng.integers(len(pool))], rng, crop, 0.3)
            if hr.shape[0] == 3 and rng.random() < 0.3:  # colour jitter on grey and colour images
                hr = (hr * torch.from_numpy(rng.uniform(0.7, 1.2, (3, 1, 1)).astype(np.float32))).clamp(-1, 1)
        if rng.random() < 0.5:
            hr = hr.flip(-1)
        hr = torch.rot90(hr, int(rng.integers(4)), dims=(-2, -1))
        if rng.random() < 0.1:  # slight optical blur before sampling
            k = float(rng.uniform(0.3, 0.8))
            hr = torch.from_numpy(cv2.GaussianBlur(hr.permute(1, 2, 0).numpy(), (0, 0), k)).permute(2, 0, 1)
        lr = degrade_lr(downscale(hr, scale), rng)
        hrs.append(hr)
        bics.append(upscale(lr, scale).clamp(-1, 1))
    return torch.stack(hrs), torch.stack(bics)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


# ----------------------------------------------------------------------------- training
def export(model: UNet2DModel, sched: DDPMScheduler, out: Path, meta: dict) -> None:
    """Write the diffusers layout (unet/, scheduler/, vsr_config.json) atomically."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "unet", safe_serialization=True)
    sched.save_pretrained(tmp / "scheduler")
    (tmp / "vsr_config.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out)


def plot_loss(log_csv: Path, png: Path) -> None:
    plot_log(log_csv, png, "v-prediction MSE", "training loss", [("val_gain_db", "EMA")], "dB over bicubic",
             "held-out x0 at t=T (EMA)")


@torch.no_grad()
def validate(model, sched, val_hr, val_bic, residual_scale, device) -> tuple[float, float]:
    """PSNR of bicubic and of the one-shot x0 estimate at the largest t (close to the posterior mean)."""
    t = torch.full((len(val_hr),), sched.config.num_train_timesteps - 1, device=device)
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(val_hr.shape, generator=g).to(device)
    a = sched.alphas_cumprod[-1].to(device)
    v = model(torch.cat([xt, val_bic.to(device)], 1), t).sample
    x0 = a.sqrt() * xt - (1 - a).sqrt() * v
    out = val_bic.to(device) + residual_scale * x0
    return psnr(val_bic, val_hr), psnr(out.cpu(), val_hr)


def main(argv=None) -> None:
    p = parser(__doc__, ROOT / "runs" / "vsr-x4", 100_000, 16, 64, 2e-4)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--ema", type=float, default=0.999)
    args = p.parse_args(argv)
    if args.scale < 1:
        raise TrainError(f"--scale must be >= 1, got {args.scale}")
    device = setup(args, crop_multiple=math.lcm(8, args.scale))  # a 4-level UNet at the output size; whole LR pixels

    model = UNet2DModel(**unet_config(args.scale)).to(device)
    ema = UNet2DModel(**unet_config(args.scale)).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = scheduler()
    alphas = sched.alphas_cumprod.to(device)

    pool, val = image_pool()
    val_name = "held-out wolf frames" if wolf_available() else "held-out scikit-image photographs (no wolf.mp4 here)"
    print(f"data: {len(pool)} scikit-image/wolf.mp4 images, procedural textures; validation: {len(val)} {val_name}",
          flush=True)
    val_hr = torch.stack([bicubic_resize(v, (256, 256))[:, 64:192, 64:192] for v in val]).clamp(-1, 1)
    val_bic = upscale(downscale(val_hr, args.scale), args.scale).clamp(-1, 1)

    run = Run(args.run, {"model": model, "ema": ema}, opt,
              ["step", "loss", "seconds", "val_bicubic_db", "val_x0_db", "val_gain_db"],
              script="train_vsr", options=vars(args), minutes=args.minutes)
    if "residual_scale" not in run.meta:
        rng = np.random.default_rng(12345)
        hr, bic = sample_batch(pool, rng, 256, args.crop, args.scale)
        run.meta["residual_scale"] = float((hr - bic).std())
    rs = run.meta["residual_scale"]
    print(f"residual_scale={rs:.4f} params={sum(x.numel() for x in model.parameters())/1e6:.2f}M "
          f"device={device}", flush=True)

    bar = tqdm(total=args.steps, initial=run.step, desc="train", mininterval=10, file=sys.stdout)
    while not run.finished(args.steps, args.minutes):
        step = run.step
        rng, gen = step_randomness(args.seed, step)
        hr, bic = sample_batch(pool, rng, args.batch, args.crop, args.scale)
        x0 = ((hr - bic) / rs).to(device)
        bic = bic.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (len(x0),), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v, the training target
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 200)
        loss = torch.nn.functional.mse_loss(model(torch.cat([xt, bic], 1), t).sample, target)
        optimizer_step(opt, loss, model.parameters())
        ema_update(ema, model, step, args.ema)
        run.step = step = step + 1
        bar.update(1)
        row = [step, f"{loss.item():.5f}", f"{run.seconds():.1f}", "", "", ""]
        if step % args.every == 0 or run.finished(args.steps, args.minutes):
            b_db, x_db = validate(ema, sched, val_hr, val_bic, rs, device)
            row[3:] = [f"{b_db:.3f}", f"{x_db:.3f}", f"{x_db - b_db:.3f}"]
            bar.write(f"step {step} loss {loss.item():.4f} val: bicubic {b_db:.2f} dB, x0(T) {x_db:.2f} dB "
                      f"({x_db - b_db:+.2f})")
            run.writer.writerow(row)
            run.save()
            export(ema.to("cpu"), sched, args.out, dict(
                task="super_resolution", scale=args.scale, residual_scale=rs, train_steps=step,
                train_batch=args.batch, train_crop=args.crop, train_seconds=round(run.seconds()),
                train_device=str(device)))
            ema.to(device)
            plot_loss(run.log_csv, args.run / "vsr-x4-loss.png")
            continue
        run.writer.writerow(row)
    run.close()


if __name__ == "__main__":
    entry(main)
