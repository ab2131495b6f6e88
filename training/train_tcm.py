"""Train StableVSR's Temporal Conditioning Module (a ControlNet) for the in-project latent x4 model.

The UNet and the VAE stay frozen; the ControlNet starts as ``ControlNetModel.from_unet(unet)`` with a
conditioning embedding that takes the RGB condition at the output size down x4 to the latent size.
Each sample is a pair of neighbouring frames (previous, current), the previous one taken at random
from either side so the module works in both sweep directions. Both are noised to the same t with
independent noise; then

1. the frozen UNet predicts on the previous frame, and its approximated x0
   ``sqrt(a_t) x_t - sqrt(1 - a_t) v`` is decoded to RGB (``--decoder vae``, or a preview decoder);
2. that RGB frame is warped onto the current frame with the flow of the bicubic-upscaled low-res
   frames (the project's own flow code, as at sampling time);
3. the warped frame is the ControlNet's condition for the current frame;
4. the loss is the v-prediction MSE on the current frame.

Pairs: consecutive frames of ../shared/clips/train and wolf.mp4 (flow estimated), plus photographs
moved by random smooth warps whose flow is known exactly. woman-running.mp4 is never read. Seeded,
resumable, logged (CSV + plot), CUDA when present. Every ``--every`` steps it validates on fixed held-out
pairs (the last wolf.mp4 frames, which no training pair reads, and synthetic warps of them):
``val_gain_db = 10 log10(MSE_without / MSE_with)``, how much the warped condition lowers the v-prediction
error of the frozen UNet (0 dB: the TCM does nothing). ``--out`` receives the model folder with the
trained ``controlnet/`` beside its other components.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.degradation import downscale, upscale  # noqa: E402
from pipelines.flow import FlowConfig, compute_clip_flows, warp  # noqa: E402
from training.latent_parts import SCALE, empty_prompt_embedding  # noqa: E402
from training.common import (Run, entry, local_folder, optimizer_step, parser, plot_log, prefetch,  # noqa: E402
                             replace_dir, rescaled_crop, setup, step_randomness)
from training.train_vae import SHARED_TRAIN, EVAL_CLIP_NAME, clip_frames, image_pool, shrink, to_tensor  # noqa: E402


# ----------------------------------------------------------------------------- pairs


def clip_pairs(every: int = 8, max_side: int = 480, span: int = 2) -> list[torch.Tensor]:
    """(span, 3, H, W): frames i .. i+span-1 (a pair by default), every ``every`` frames of the training clips
    (and wolf.mp4), long side <= max_side."""
    from training.train_vsr import read_wolf

    wolf = read_wolf()[:-4]  # the last wolf frames are validation for the other scripts
    pairs = [torch.stack([to_tensor(shrink(f, max_side)) for f in wolf[i:i + span]])
             for i in range(0, len(wolf) - span + 1, every)]
    if SHARED_TRAIN.is_dir():
        for clip in sorted(SHARED_TRAIN.glob("*.mp4")):
            if EVAL_CLIP_NAME not in clip.name:
                pairs += clip_frames(clip, every, max_side, span=span)
    return pairs


def smooth_flow(rng: np.random.Generator, size: int, amplitude: float) -> torch.Tensor:
    """(2, size, size) random smooth flow in pixels: a 4x4 grid of displacements, bicubic-upsampled."""
    coarse = torch.from_numpy(rng.normal(0, amplitude, (1, 2, 4, 4)).astype(np.float32))
    shift = torch.from_numpy(rng.normal(0, amplitude, (1, 2, 1, 1)).astype(np.float32))
    return (F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True) + shift)[0]


def sample_pairs(pairs, photos, rng: np.random.Generator, batch: int, crop: int, flow_cfg: FlowConfig):
    """(prev_hr, cur_hr, prev_lr, cur_lr, flow cur -> prev at crop size): real pairs with estimated flow
    and photographs with a known smooth warp (``cur(p) = prev(p + flow(p))``)."""
    prev_hr, cur_hr, flows = [], [], []
    for _ in range(batch):
        if pairs and rng.random() < 0.6:
            a, b = rescaled_crop(pairs[rng.integers(len(pairs))], rng, crop, 0.4)  # the same window of both
            if rng.random() < 0.5:  # the previous frame from either side: both sweep directions
                a, b = b, a
            prev_hr.append(a)
            cur_hr.append(b)
            flows.append(None)
        else:
            a = rescaled_crop(photos[rng.integers(len(photos))], rng, crop, 0.3)
            f = smooth_flow(rng, crop, rng.uniform(0.5, 4.0))
            prev_hr.append(a)
            cur_hr.append(warp(a[None], f[None], padding_mode="border")[0])
            flows.append(f)
    prev_hr, cur_hr = torch.stack(prev_hr), torch.stack(cur_hr)
    prev_lr, cur_lr = downscale(prev_hr, SCALE).clamp(-1, 1), downscale(cur_hr, SCALE).clamp(-1, 1)
    for k, f in enumerate(flows):
        if f is None:  # estimated on the bicubic upscale of the low-res frames, as the sampler does
            cond = upscale(torch.stack([prev_lr[k], cur_lr[k]]), SCALE).clamp(-1, 1)
            flows[k] = compute_clip_flows(cond, flow_cfg).to_prev[1]
    return prev_hr, cur_hr, prev_lr, cur_lr, torch.stack(flows)


def sample_triples(triples, photos, rng: np.random.Generator, batch: int, crop: int, flow_cfg: FlowConfig):
    """Chains of three frames for ``--chain``: (hr (B, 3, 3, crop, crop), lr (B, 3, 3, crop/4, crop/4),
    flows (B, 2, 2, crop, crop)) with ``flows[:, j]`` taking frame j+1 to frame j: real runs of three
    neighbouring frames (either direction) with flow estimated as the sampler does, and photographs moved
    twice by known smooth warps."""
    hr, flows = [], []
    for _ in range(batch):
        if triples and rng.random() < 0.6:
            run = rescaled_crop(triples[rng.integers(len(triples))], rng, crop, 0.4)
            hr.append(run.flip(0) if rng.random() < 0.5 else run)
            flows.append(None)
        else:
            a = rescaled_crop(photos[rng.integers(len(photos))], rng, crop, 0.3)
            f1, f2 = (smooth_flow(rng, crop, rng.uniform(0.5, 4.0)) for _ in range(2))
            b = warp(a[None], f1[None], padding_mode="border")[0]
            hr.append(torch.stack([a, b, warp(b[None], f2[None], padding_mode="border")[0]]))
            flows.append(torch.stack([f1, f2]))
    hr = torch.stack(hr)
    lr = downscale(hr.flatten(0, 1), SCALE).clamp(-1, 1).unflatten(0, hr.shape[:2])
    for k, f in enumerate(flows):
        if f is None:
            to_prev = compute_clip_flows(upscale(lr[k], SCALE).clamp(-1, 1), flow_cfg).to_prev
            flows[k] = to_prev[1:]
    return hr, lr, torch.stack(flows)


def validation_pairs(val: list[torch.Tensor], crop: int, flow_cfg: FlowConfig, n: int = 8):
    """Fixed held-out pairs, as ``sample_pairs`` makes them: neighbouring frames of ``val`` (image_pool's
    validation frames: the last wolf.mp4 frames when it is present, consecutive) and synthetic warps of them."""
    from training.train_vsr import WOLF_COPY

    real = [torch.stack([a, b]) for a, b in zip(val, val[1:])] if WOLF_COPY.exists() else []
    return sample_pairs(real, val, np.random.default_rng(12345), n, crop, flow_cfg)


# ----------------------------------------------------------------------------- training


class Frozen:
    """The frozen parts: the UNet, the VAE, the condition's decoder (the VAE or a preview decoder), the empty
    prompt's embedding and the schedule's cumulative alphas."""

    def __init__(self, unet, vae, decoder, emb, alphas):
        self.unet, self.vae, self.decoder, self.emb, self.alphas = unet, vae, decoder, emb, alphas
        self.sf = vae.config.scaling_factor

    @torch.no_grad()
    def inputs(self, batch, t: torch.Tensor, gen: torch.Generator):
        """(the current frame's UNet input, the TCM condition, the v target) for the pairs ``batch``
        (prev_hr, cur_hr, prev_lr, cur_lr, flow) noised to ``t`` with independent noise drawn from ``gen``:

        x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,  v = sqrt(a_t) eps - sqrt(1 - a_t) x0,
        condition = warp(decode(sqrt(a_t) x_t,prev - sqrt(1 - a_t) v_prev), flow)."""
        prev_hr, cur_hr, prev_lr, cur_lr, flow = batch
        a = self.alphas[t].view(-1, 1, 1, 1)
        e = self.emb.expand(len(cur_hr), -1, -1)
        x0_prev_true = self.vae.encode(prev_hr).latent_dist.mean * self.sf
        x0_cur = self.vae.encode(cur_hr).latent_dist.mean * self.sf
        noise_prev = torch.randn(x0_prev_true.shape, generator=gen).to(x0_prev_true.device)
        noise = torch.randn(x0_cur.shape, generator=gen).to(x0_cur.device)
        xt_prev = a.sqrt() * x0_prev_true + (1 - a).sqrt() * noise_prev
        v_prev = self.unet(torch.cat([xt_prev, prev_lr], 1), t, encoder_hidden_states=e).sample
        x0_prev = a.sqrt() * xt_prev - (1 - a).sqrt() * v_prev  # the approximated x0 the sampler shares
        condition = warp(self.decoder.decode(x0_prev / self.sf).sample.float(), flow)
        xt = a.sqrt() * x0_cur + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0_cur
        return torch.cat([xt, cur_lr], 1), condition, target

    @torch.no_grad()
    def chain_inputs(self, batch, t: torch.Tensor, gen: torch.Generator, cn: ControlNetModel):
        """``--chain``: (the last frame's UNet input, its TCM condition, its v target) for chains of three
        frames (``sample_triples``), noised to ``t`` with independent noise. As in the sweep, the condition
        comes from a neighbour whose own x0 was predicted *with* the TCM: frame 0's x0 by the UNet alone,
        frame 1's by the UNet with the TCM fed frame 0's decoded, warped x0, and frame 2's condition is
        frame 1's decoded x0 warped onto it."""
        hr, lr, flows = batch
        a = self.alphas[t].view(-1, 1, 1, 1)
        x0 = [self.vae.encode(hr[:, j]).latent_dist.mean * self.sf for j in range(3)]
        noise = [torch.randn(z.shape, generator=gen).to(z.device) for z in x0]
        xt = [a.sqrt() * z + (1 - a).sqrt() * n for z, n in zip(x0, noise)]
        condition = None
        for j in range(2):  # frames 0 and 1: their approximated x0, each the next frame's condition
            inp = torch.cat([xt[j], lr[:, j]], 1)
            v = self.predict(cn if condition is not None else None, inp, t, condition)
            x0_j = a.sqrt() * xt[j] - (1 - a).sqrt() * v
            condition = warp(self.decoder.decode(x0_j / self.sf).sample.float(), flows[:, j])
        target = a.sqrt() * noise[2] - (1 - a).sqrt() * x0[2]
        return torch.cat([xt[2], lr[:, 2]], 1), condition, target

    def predict(self, cn: ControlNetModel | None, inp, t, condition):
        """The UNet's v with the TCM's residuals (``cn``), or without them (``None``)."""
        e = self.emb.expand(len(inp), -1, -1)
        if cn is None:
            return self.unet(inp, t, encoder_hidden_states=e).sample
        down, mid = cn(inp, t, encoder_hidden_states=e, controlnet_cond=condition, return_dict=False)
        return self.unet(inp, t, encoder_hidden_states=e, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


@torch.no_grad()
def condition_gain_db(frozen: Frozen, cn: ControlNetModel, val: tuple, device) -> float:
    """10 log10(MSE_without / MSE_with) of the v-prediction on the fixed held-out pairs ``val``, at fixed
    t spread over the schedule and fixed noise."""
    batch = [x.to(device) for x in val]
    t = torch.linspace(50, len(frozen.alphas) - 50, len(batch[0])).long().to(device)
    inp, condition, target = frozen.inputs(batch, t, torch.Generator().manual_seed(0))
    was_training = cn.training
    cn.eval()
    with_tcm = F.mse_loss(frozen.predict(cn, inp, t, condition), target)
    without = F.mse_loss(frozen.predict(None, inp, t, condition), target)
    cn.train(was_training)
    return float(10 * torch.log10(without / with_tcm))


def export(cn: ControlNetModel, model: Path, out: Path) -> None:
    """``out`` = the model folder with ``controlnet/`` added (atomically)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("controlnet"))
    cn.save_pretrained(tmp / "controlnet", safe_serialization=True)
    replace_dir(tmp, out)


def main(argv=None) -> None:
    p = parser(__doc__, ROOT / "training" / "checkpoints" / "tcm-x4", 100_000, 8, 128, 1e-4)
    p.add_argument("--model", type=Path, default=ROOT / "weights" / "latent-x4",
                   help="latent model folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    p.add_argument("--decoder", default="vae", help="vae, or a folder with a preview decoder (AutoencoderTiny)")
    p.add_argument("--no-shared", action="store_true", help="skip ../shared/clips/train (tests)")
    p.add_argument("--init", type=Path, default=None, help="a controlnet/ folder to continue from")
    p.add_argument("--cosine", action="store_true",
                   help="decay the learning rate to 0 by a half cosine: by step over --steps, or over the "
                        "--minutes budget when that ends first")
    p.add_argument("--chain", action="store_true",
                   help="train on chains of three frames: the condition is the decoded x0 of a neighbour that was "
                        "itself predicted with the TCM, as in the sweep (validation stays on pairs)")
    args = p.parse_args(argv)

    local_folder(args.model, "--model")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        local_folder(args.model / sub, f"--model's {sub}/:")
    decoder_dir = None if args.decoder == "vae" else local_folder(Path(args.decoder), "--decoder")
    device = setup(args, model=args.model, decoder=decoder_dir, init=local_folder(args.init, "--init"))
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").to(device).eval().requires_grad_(False)
    from diffusers import AutoModel

    # the preview decoder (AutoencoderTiny) is fine-tuned against with the same call: decode(x0 / scaling_factor)
    decoder = vae if args.decoder == "vae" else \
        AutoModel.from_pretrained(args.decoder).to(device).eval().requires_grad_(False)
    enc = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").to(device)
    tok = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    emb = empty_prompt_embedding(enc, tok)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    alphas = sched.alphas_cumprod.to(device)
    if args.init:  # continue from a trained ControlNet (a folder with its config and weights)
        cn = ControlNetModel.from_pretrained(args.init, torch_dtype=torch.float32).to(device).train()
    else:
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64)).to(device).train()
    opt = torch.optim.AdamW(cn.parameters(), lr=args.lr, weight_decay=0.0)

    photos, val_frames = image_pool()
    pairs = [] if args.no_shared else clip_pairs(span=3 if args.chain else 2)
    flow_cfg = FlowConfig()
    print(f"data: {len(pairs)} real frame pairs (estimated flow), {len(photos)} images for synthetic pairs "
          f"(exact flow); decoder: {args.decoder}; controlnet params "
          f"{sum(x.numel() for x in cn.parameters()) / 1e6:.2f}M; device {device}", flush=True)

    frozen = Frozen(unet, vae, decoder, emb, alphas)
    val = validation_pairs(val_frames, args.crop, flow_cfg)
    run = Run(args.run, {"model": cn}, opt, ["step", "loss", "seconds", "val_gain_db"],
              script="train_tcm", options=vars(args), minutes=args.minutes)
    bar = tqdm(total=args.steps, initial=run.step, desc="tcm", mininterval=10, file=sys.stdout)
    sample = sample_triples if args.chain else sample_pairs
    batches = prefetch(lambda s: sample(pairs, photos, step_randomness(args.seed, s)[0], args.batch, args.crop,
                                        flow_cfg), run.step, args.workers)
    while not run.finished(args.steps, args.minutes):
        step = run.step
        gen = step_randomness(args.seed, step)[1]
        batch = [x.to(device) for x in next(batches)]
        t = torch.randint(0, sched.config.num_train_timesteps, (len(batch[1]),), generator=gen).to(device)
        inp, condition, target = frozen.chain_inputs(batch, t, gen, cn) if args.chain else frozen.inputs(batch, t, gen)
        loss = F.mse_loss(frozen.predict(cn, inp, t, condition), target)
        lr = args.lr * min(1.0, (step + 1) / 200) * (run.cosine(args.steps, args.minutes) if args.cosine else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        optimizer_step(opt, loss, cn.parameters())
        run.step = step = step + 1
        bar.update(1)
        row = [step, f"{loss.item():.5f}", f"{run.seconds():.1f}", ""]
        if step % args.every == 0 or run.finished(args.steps, args.minutes):
            row[3] = f"{condition_gain_db(frozen, cn, val, device):.4f}"
            run.writer.writerow(row)
            run.save()
            export(cn, args.model, args.out)
            plot_log(run.log_csv, args.run / "tcm-loss.png", "v-prediction MSE", "TCM training loss",
                     [("val_gain_db", "held-out pairs")], "dB", "v-MSE without / with the TCM")
            bar.write(f"step {step} loss {loss.item():.4f} held-out gain from the condition {row[3]} dB")
            continue
        run.writer.writerow(row)
    run.close()


if __name__ == "__main__":
    entry(main)
