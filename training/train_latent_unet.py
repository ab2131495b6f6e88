"""Stage 2 of the latent x4 model: the latent UNet on the frozen VAE's latents (StableVSR layout).

The UNet (``UNet2DConditionModel``, see ``training/latent_parts.py``) sees ``[x_t, low-res frame]``
(4 + 3 channels at the low-res size; the frame in [-1, 1], not noised, no class labels: StableVSR's
convention) and the fixed embedding of the empty prompt, and predicts the velocity
``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` of ``x0 = vae.encode(hr).mean * scaling_factor``.

Data as ``training/train_vae.py`` (woman-running.mp4 is never read). Seeded, resumable from
``--run``, tqdm progress, a CSV log, a loss plot, CUDA when present. Every ``--every`` steps the EMA
weights are exported with the VAE, text encoder, tokenizer and scheduler as a complete model folder
(``--out``) that ``configs/stablevsr.yaml`` runs unchanged:

    nohup python training/train_latent_unet.py --init weights/latent-x4 --threads 2 \\
        > runs/unet.log 2>&1 &
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import bicubic_resize, downscale, upscale  # noqa: E402
from training.latent_parts import (SCALE, empty_prompt_embedding, hr_lr_batch, scheduler,  # noqa: E402
                                   tiny_text_encoder, unet_config)
from training.common import (Run, ema_update, entry, local_folder, optimizer_step, parser, plot_log,  # noqa: E402
                             prefetch, replace_dir, setup, step_randomness)
from training import train_vae  # noqa: E402  (its SHARED_TRAIN, read when used)
from training.train_vae import image_pool, pool_to, psnr, shared_pool, validation_frames  # noqa: E402


def export(ema: UNet2DConditionModel, vae_dir: Path, enc, tok, out: Path, meta: dict) -> None:
    """The complete model folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ vsr_config.json), atomically."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema.save_pretrained(tmp / "unet", safe_serialization=True)
    shutil.copytree(vae_dir, tmp / "vae")
    enc.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tok.save_pretrained(tmp / "tokenizer")
    scheduler().save_pretrained(tmp / "scheduler")
    (tmp / "vsr_config.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out)


def validation_crops(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation frames as 128 px ground-truth crops and their x4 antialiased downscales."""
    hr = torch.stack([bicubic_resize(v, (256, 448))[:, 64:192, 160:288] for v in frames]).clamp(-1, 1)
    return hr, downscale(hr, SCALE).clamp(-1, 1)


@torch.no_grad()
def validate(unet, vae, emb, sched, hr, lr, device) -> tuple[float, float]:
    """PSNR of bicubic and of the one-call x0 at the largest t, decoded, on held-out frames."""
    sf = vae.config.scaling_factor
    t = torch.full((len(hr),), sched.config.num_train_timesteps - 1, device=device)
    g = torch.Generator().manual_seed(0)
    shape = (len(hr), vae.config.latent_channels, *lr.shape[-2:])
    xt = torch.randn(shape, generator=g).to(device)
    a = sched.alphas_cumprod[-1].to(device)
    v = unet(torch.cat([xt, lr.to(device)], 1), t, encoder_hidden_states=emb.expand(len(hr), -1, -1)).sample
    x0 = a.sqrt() * xt - (1 - a).sqrt() * v
    out = vae.decode(x0 / sf).sample.clamp(-1, 1).cpu()
    return psnr(upscale(lr, SCALE).clamp(-1, 1), hr), psnr(out, hr)


@torch.no_grad()
def validate_sampled(unet, vae, enc, tok, hr, lr, steps: int = 10) -> float:
    """PSNR of ``lr`` upscaled by the project's pipeline with this UNet: ``steps`` steps from pure noise,
    seed 0, each frame sampled on its own, no back-projection. Unlike the one-call x0 at t = T (which
    rewards the blurry mean), this is what sampling gives; a continued UNet raised the one-call figure by
    0.42 dB while the sampled one stayed flat and held-out clips lost 0.08 dB (README)."""
    from pipelines.video_pipeline import SamplingOptions, VideoPipeline

    pipe = VideoPipeline(unet, scheduler(), vae=vae, text_encoder=enc, tokenizer=tok, scale=SCALE)
    out = pipe(lr.to(unet.device), options=SamplingOptions(num_inference_steps=steps, seed=0)).frames
    return psnr(out.clamp(-1, 1).cpu(), hr)


def main(argv=None) -> None:
    p = parser(__doc__, ROOT / "training" / "checkpoints" / "unet-x4", 200_000, 16, 128, 2e-4)
    p.add_argument("--vae", type=Path, default=None,
                   help="the frozen VAE folder (default: --init's vae/, else weights/latent-x4/vae)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--init", type=Path, default=None,
                   help="a model folder to continue from (its unet/, text_encoder/, tokenizer/)")
    p.add_argument("--jpeg", type=float, default=0.0,
                   help="probability of JPEG-compressing each low-res crop (quality 30-90): trains for compressed "
                        "clips (benchmarks/compressed_input.py); 0: clean downscales only, as the shipped UNet")
    p.add_argument("--no-shared", action="store_true", help="skip ../shared/clips/train (tests)")
    p.add_argument("--val-clip", default=None, help="validate on every 8th frame of this ../shared/clips/train "
                   "clip (a file name), left out of training; default: wolf.mp4's last frames")
    args = p.parse_args(argv)

    local_folder(args.init, "--init")
    if args.vae is None:
        args.vae = args.init / "vae" if args.init else ROOT / "weights" / "latent-x4" / "vae"
    device = setup(args, vae=local_folder(args.vae, "--vae"), init=args.init)
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    if args.init:  # continue from a model folder: its UNet, text encoder and tokenizer (a saved run still resumes)
        from transformers import CLIPTextModel, CLIPTokenizer

        enc = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder", torch_dtype=torch.float32)
        tok = CLIPTokenizer.from_pretrained(args.init, subfolder="tokenizer")
        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet", torch_dtype=torch.float32).to(device)
        cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    else:
        enc, tok = tiny_text_encoder(args.run / "_tokenizer_files")
        cfg = unet_config(tuple(int(b) for b in args.blocks.split(",")), cross_attention_dim=enc.config.hidden_size)
        unet = UNet2DConditionModel(**cfg).to(device)
    enc = enc.to(device).requires_grad_(False)
    emb = empty_prompt_embedding(enc, tok)
    ema = UNet2DConditionModel(**cfg).to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sched = scheduler()
    alphas = sched.alphas_cumprod.to(device)

    base, val = image_pool()
    extra, used = ([], []) if args.no_shared else shared_pool(exclude=args.val_clip)
    val, val_name = validation_frames(args.val_clip, val)
    pool = pool_to(base + extra, device, args.workers > 0)
    print(f"data: {len(base)} skimage/wolf images, {len(extra)} from {train_vae.SHARED_TRAIN} "
          f"({', '.join(used) if used else 'skipped (--no-shared)' if args.no_shared else 'absent'}), procedural "
          f"textures; validation: {len(val)} {val_name}", flush=True)
    val_hr, val_lr = validation_crops(val)
    run = Run(args.run, {"model": unet, "ema": ema}, opt,
              ["step", "loss", "seconds", "val_bicubic_db", "val_psnr_db", "latent_std", "val_sampled_db"],
              script="train_latent_unet", options=vars(args), minutes=args.minutes)
    print(f"unet params={sum(x.numel() for x in unet.parameters()) / 1e6:.2f}M device={device} "
          f"vae scaling_factor={sf:.4f}", flush=True)

    bar = tqdm(total=args.steps, initial=run.step, desc="unet", mininterval=10, file=sys.stdout)
    batches = prefetch(lambda s: hr_lr_batch(pool, step_randomness(args.seed, s)[0], args.batch, args.crop,
                                                   args.jpeg),
                       run.step, args.workers)
    while not run.finished(args.steps, args.minutes):
        step = run.step
        gen = step_randomness(args.seed, step)[1]
        hr, lr = next(batches)
        with torch.no_grad():
            x0 = vae.encode(hr.to(device)).latent_dist.mean * sf
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 200)
        pred = unet(torch.cat([xt, lr.to(device)], 1), t, encoder_hidden_states=emb.expand(len(x0), -1, -1)).sample
        loss = F.mse_loss(pred, target)
        optimizer_step(opt, loss, unet.parameters())
        ema_update(ema, unet, step, args.ema, warmup=args.init is None)
        run.step = step = step + 1
        bar.update(1)
        row = [step, f"{loss.item():.5f}", f"{run.seconds():.1f}", "", "", f"{x0.std().item():.4f}", ""]
        if step % args.every == 0 or run.finished(args.steps, args.minutes):
            b_db, x_db = validate(ema, vae, emb, sched, val_hr, val_lr, device)
            s_db = validate_sampled(ema, vae, enc, tok, val_hr, val_lr)
            row[3:5], row[6] = [f"{b_db:.3f}", f"{x_db:.3f}"], f"{s_db:.3f}"
            bar.write(f"step {step} loss {loss.item():.4f} val: bicubic {b_db:.2f} dB, x0(T) decoded {x_db:.2f} dB, "
                      f"sampled (10 steps) {s_db:.2f} dB")
            run.writer.writerow(row)
            run.save()
            export(ema, args.vae, enc, tok, args.out, dict(
                task="super_resolution", scale=SCALE, layout="stablevsr", train_steps=step, train_batch=args.batch,
                train_crop=args.crop, train_seconds=round(run.seconds()), train_device=str(device)))
            plot_log(run.log_csv, args.run / "unet-loss.png", "v-prediction MSE", "latent UNet training loss",
                     [("val_psnr_db", "one-call x0 at t=T, decoded"), ("val_sampled_db", "sampled, 10 steps"),
                      ("val_bicubic_db", "bicubic")], "PSNR (dB)",
                     f"{val_name} (EMA)")
            continue
        run.writer.writerow(row)
    run.close()


if __name__ == "__main__":
    entry(main)
