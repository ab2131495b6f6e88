"""How well a VAE keeps colour: where its reconstruction error lies on the example clip, and what it
does to uniform colours and to colour-turned frames.

    python benchmarks/vae_colour.py weights/latent-x4/vae [more VAE folders ...]

For each VAE (``D(mean of E(x))``, clamped to [-1, 1]):

* ``psnr_db``: the example clip's ground truth (16 frames, 256 px) reconstructed;
* ``lowpass_psnr_db``: the same after a 4x4 box average of both (colour and shading, not detail);
* ``saturated_error_share``: the share of the squared error in pixels of saturation
  ``(max - min) / max > 0.3`` (HSV's, on [0, 1] values), next to ``saturated_pixel_share``;
* ``uniform``: flat 64x64 images of pure red, green, blue, light and dark grey in, mean colour out;
* ``held_out_psnr_db`` / ``held_out_jittered_psnr_db``: every 8th frame of ``--held-out`` (a clip of
  ../shared/clips/train, when present) and colour-jittered copies of them (training/train_vae.color_jitter,
  fixed seed), as train_vae.py's validation reports them.

Figures are printed and written to ``<out>.json``; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXAMPLE_GT, ROOT, load_clip, run_script, set_threads, vae_roundtrip  # noqa: E402

UNIFORM = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "light grey": (0.5, 0.5, 0.5),
           "dark grey": (-0.5, -0.5, -0.5)}
SATURATED = 0.3


def saturation(x: torch.Tensor) -> torch.Tensor:
    """HSV saturation (max - min) / max of (N, 3, H, W) frames in [-1, 1] -> (N, H, W)."""
    rgb = (x + 1) / 2
    hi, lo = rgb.max(1).values, rgb.min(1).values
    return (hi - lo) / hi.clamp_min(1e-6)


@torch.no_grad()
def measure(vae, gt: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """``held_out``: (frames, colour-jittered copies), as training/train_vae.validation_tensors makes them."""
    from training.train_vae import psnr as psnr_db  # 10 log10(2^2 / MSE) over the whole batch

    rec = vae_roundtrip(vae, gt, 1)
    err = ((rec - gt) ** 2).mean(1)
    sat = saturation(gt) > SATURATED
    flat = torch.tensor(list(UNIFORM.values()), dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, 64, 64)
    out = vae_roundtrip(vae, flat.contiguous(), len(UNIFORM)).mean((2, 3))
    res = {"psnr_db": psnr_db(rec, gt), "lowpass_psnr_db": psnr_db(F.avg_pool2d(rec, 4), F.avg_pool2d(gt, 4)),
           "saturated_pixel_share": float(sat.float().mean()),
           "saturated_error_share": float((err * sat).sum() / err.sum()),
           "uniform": {k: [round(v, 3) for v in o.tolist()] for k, o in zip(UNIFORM, out)}}
    if held_out is not None:
        plain, jittered = held_out
        res["held_out_psnr_db"] = psnr_db(vae_roundtrip(vae, plain, 1), plain)
        res["held_out_jittered_psnr_db"] = psnr_db(vae_roundtrip(vae, jittered, 1), jittered)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks/vae_colour.py", description=__doc__.split("\n\n")[0])
    p.add_argument("vaes", nargs="+", help="AutoencoderKL folders")
    p.add_argument("--held-out", default="rollercoaster.mp4", help="a clip of ../shared/clips/train ('' for none)")
    p.add_argument("--resize", type=int, default=None, help="shorter side of the ground truth (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vae_colour"))
    args = p.parse_args(argv)
    set_threads(args.threads)
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(ROOT))
    from training.train_vae import SHARED_TRAIN, clip_frames, validation_tensors

    missing = [v for v in args.vaes if not (Path(v) / "config.json").is_file()]
    if missing:
        raise ValueError(f"{missing[0]}: no such VAE folder (an AutoencoderKL folder with config.json)")
    gt = load_clip(EXAMPLE_GT, 4, max_frames=16, resize=args.resize).gt
    held = None
    if args.held_out and not (SHARED_TRAIN / args.held_out).exists():
        print(f"note: --held-out {args.held_out} is not in {SHARED_TRAIN}: no held-out figures", flush=True)
    if args.held_out and (SHARED_TRAIN / args.held_out).exists():
        held = validation_tensors(clip_frames(SHARED_TRAIN / args.held_out))  # what train_vae.py validates on
    report = {"example_clip": str(EXAMPLE_GT), "held_out": args.held_out if held is not None else None, "vaes": {}}
    for path in args.vaes:
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()
        report["vaes"][path] = r = measure(vae, gt, held)
        line = (f"{path}: example clip {r['psnr_db']:.2f} dB (4x4 low-pass {r['lowpass_psnr_db']:.2f} dB); "
                f"{100 * r['saturated_error_share']:.0f} % of the squared error in the "
                f"{100 * r['saturated_pixel_share']:.0f} % of pixels with saturation > {SATURATED}")
        if held is not None:
            line += (f"; {args.held_out} {r['held_out_psnr_db']:.2f} dB, colour-jittered "
                     f"{r['held_out_jittered_psnr_db']:.2f} dB")
        print(line)
        print("   uniform in -> out: " + "; ".join(f"{k} {UNIFORM[k]} -> {tuple(v)}" for k, v in r["uniform"].items()))
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    run_script(main)
