"""Figure: how good is the one-call approximated x0 at each timestep? (for the README)

    python benchmarks/x0_vs_t.py          # writes docs/x0_vs_t.png and docs/x0_vs_t_frames.png

On one real frame (the first of assets/example_gt; its input is the x4 antialiased bicubic
downscale), the ground-truth residual ``x0 = (GT - bicubic) / residual_scale`` is noised to
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (the scheduler's ``add_noise``, one fixed eps) for ~25
timesteps across [0, T-1]; the model is evaluated once at each, and the approximated x0
(``schedulers.approx_x0``) is turned back into a frame, ``bicubic + residual_scale * x0_hat``, whose
PSNR against the ground truth is plotted against t. At large t the estimate is a blurry guess of the
mean (close to bicubic); at small t it is sharp.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, run from anywhere
from common import (run_script, DEFAULTS, EXAMPLE_GT, ROOT, crop_to_multiple, load_pipeline, pick_device,  # noqa: E402
                    set_threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from pipelines.degradation import downscale  # noqa: E402
from pipelines.denoiser import Denoiser  # noqa: E402
from pipelines.metrics import psnr  # noqa: E402
from pipelines.sampler import img2img_timesteps  # noqa: E402
from pipelines.video_io import read_clip, to_tensor, to_uint8  # noqa: E402
from schedulers import approx_x0  # noqa: E402

SHOW_T = (999, 750, 500, 250, 50)


@torch.no_grad()
def x0_estimates(pipe, gt: torch.Tensor, timesteps: list[int], seed: int = 0):
    """gt (1, 3, H, W) -> bicubic frame (1, 3, H, W) and {t: frame from the approximated x0 (1, 3, H, W)}.

    The noise schedule is the model's, as a DDPMScheduler (alphas_cumprod indexed by t directly).
    """
    if pipe.kind != "residual_sr":
        raise ValueError(f"x0_vs_t needs a residual super-resolution model, not a {pipe.kind!r} one")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    lr = downscale(gt, pipe.scale).clamp(-1, 1)
    bic = pipe.conditioning_frames(lr)  # bicubic upscale, clamped: the model's conditioning frame
    x0 = (gt - bic) / pipe.residual_scale
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    denoiser = Denoiser(pipe.unet, sched)
    dev = pipe.device
    frames = {}
    for t in timesteps:
        tt = torch.tensor([t], dtype=torch.long)
        x_t = sched.add_noise(x0, eps, tt)
        out = denoiser(x_t.to(dev, pipe.unet.dtype), tt[0].to(dev), concat=bic.to(dev))
        x0_hat = approx_x0(sched, out.float(), int(t), x_t.to(dev).float()).cpu()
        frames[int(t)] = (bic + pipe.residual_scale * x0_hat).clamp(-1, 1)
    return bic, frames


def save_curve(path: Path, ts: list[int], values: list[float], bicubic: float, start_t: int | None, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(ts, values, "o-", ms=3,
            label="bicubic + residual_scale x approximated x0\n(one model call on x_t noised from the GT residual)")
    ax.axhline(bicubic, color="gray", linestyle="--", label="bicubic")
    if start_t is not None:
        ax.axvline(start_t, color="tab:orange", linestyle=":", label=f"first step of the default run (t={start_t})")
    ax.set_xlabel("timestep t (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps)")
    ax.set_ylabel("PSNR vs ground truth (dB)")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_frames(path: Path, panels: list[tuple[str, torch.Tensor]], crop: int, zoom: int) -> None:
    """Top row: whole frames; bottom row: a centred ``crop`` x ``crop`` patch enlarged ``zoom`` x (nearest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.3), dpi=120, squeeze=False)
    for k, (title, frame) in enumerate(panels):
        img = to_uint8(frame)[0]
        h, w = img.shape[:2]
        c = min(crop, h, w)
        y, x = (h - c) // 2, (w - c) // 2
        patch = np.repeat(np.repeat(img[y:y + c, x:x + c], zoom, 0), zoom, 1)
        axes[0][k].imshow(img)
        axes[0][k].add_patch(plt.Rectangle((x - 0.5, y - 0.5), c, c, fill=False, edgecolor="yellow", lw=0.8))
        axes[1][k].imshow(patch, interpolation="nearest")
        axes[0][k].set_title(title, fontsize=8)
        for ax in axes[:, k]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/x0_vs_t.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "vsr-x4"),
                   help="a residual (pixel-space) super-resolution model; the default job's latent model has no "
                        "pixel residual to noise")
    p.add_argument("--clip", default=str(EXAMPLE_GT), help="ground-truth video or image folder")
    p.add_argument("--frame", type=int, default=0, help="index of the frame used")
    p.add_argument("--num-t", type=int, default=25, help="timesteps evenly spread over [0, T-1]")
    p.add_argument("--show-t", default=",".join(map(str, SHOW_T)), help="timesteps shown as images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="for the marker of the default run's first step")
    p.add_argument("--strength", type=float, default=DEFAULTS["strength"], help="for the marker of the default run's first step")
    p.add_argument("--crop", type=int, default=64, help="side of the zoomed patch")
    p.add_argument("--zoom", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default=str(ROOT / "docs"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    set_threads(args.threads)
    if args.num_t < 2:
        raise ValueError(f"--num-t must be >= 2, not {args.num_t}")
    pipe = load_pipeline(args.model, pick_device(args.device))
    T = pipe.scheduler.config.num_train_timesteps
    show = [min(int(t), T - 1) for t in args.show_t.split(",") if t.strip()]
    ts = sorted({int(t) for t in np.linspace(0, T - 1, args.num_t).round()} | set(show))
    gt = to_tensor(read_clip(args.clip, start=args.frame, max_frames=1).frames)
    gt = crop_to_multiple(gt, pipe.scale * 8)
    bic, frames = x0_estimates(pipe, gt, ts, args.seed)
    values = {t: psnr(f, gt) for t, f in frames.items()}
    bic_psnr = psnr(bic, gt)
    try:
        start_t = int(img2img_timesteps(DDPMScheduler.from_config(pipe.scheduler.config), args.steps, args.strength)[0])
    except ValueError:
        start_t = None

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = (f"{Path(args.clip).name} frame {args.frame}, x{pipe.scale}, {Path(args.model).name}, "
             f"seed {args.seed}")
    save_curve(out / "x0_vs_t.png", ts, [values[t] for t in ts], bic_psnr, start_t, label)
    panels = [(f"bicubic\n{bic_psnr:.2f} dB", bic)]
    panels += [(f"x0 estimate, t={t}\n{values[t]:.2f} dB", frames[t]) for t in show]
    panels.append(("ground truth", gt))
    save_frames(out / "x0_vs_t_frames.png", panels, args.crop, args.zoom)

    print(f"bicubic PSNR {bic_psnr:.2f} dB")
    print("   t  PSNR (dB)  vs bicubic")
    for t in ts:
        print(f"{t:4d}  {values[t]:9.2f}  {values[t] - bic_psnr:+.2f}")
    print(f"wrote {out / 'x0_vs_t.png'}, {out / 'x0_vs_t_frames.png'}")
    return {"timesteps": ts, "psnr": [values[t] for t in ts], "bicubic_psnr": bic_psnr, "first_t": start_t}


if __name__ == "__main__":
    run_script(main)
