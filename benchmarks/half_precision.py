"""Where half precision departs from float32, layer by layer (a diagnosis for tests/test_gpu.py).

    python benchmarks/half_precision.py --device cuda           # on a GPU (benchmarks/gpu.sh runs it)
    python benchmarks/half_precision.py --device cpu --kinds upscale+tcm   # a smoke run here

For each model kind of the GPU suite (tiny seeded random models, tests/test_gpu.py) and for the shipped
latent model, the same short clip is sampled in float32 (TF32 off) and in float16 / bfloat16, and:

* the whole run's PSNR (half against float32) after 1 and 4 steps;
* the **first call** of the UNet (and the ControlNet, where there is one) is recorded module by module;
  for each module the relative error ``||y_half - y_32|| / ||y_32||`` of its output is printed where it
  first exceeds 1e-2, with the modules of largest error. The first call's inputs differ only by rounding
  (same seed, same noise), so a module whose error jumps there is where the two precisions part.

The H100 lease of 2026-11-27 measured 13.0 dB (float16) and 13.5 dB (bfloat16) for the StableVSR layout
with the TCM, against 67.4 / 49.4 dB on this CPU; the shipped model agreed within 0.1 dB PSNR against the
ground truth. Nothing is asserted; figures go to stdout and ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the GPU suite's tiny model kinds
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipelines.metrics import psnr  # noqa: E402
from pipelines.video_pipeline import SamplingOptions, VideoPipeline  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
JUMP = 1e-2  # relative error at which a module's output counts as departed


class _Tmp:
    """The one method of pytest's tmp_path_factory that tests/test_gpu._pipes uses."""

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-"))


def kinds(device: str, names: list[str] | None):
    from test_gpu import _pipes

    from pipelines.align import Fusion
    from pipelines.degradation import downscale
    from pipelines.video_io import read_clip, to_tensor

    out = _pipes(_Tmp(), device=device)
    gt = to_tensor(read_clip(ROOT / "assets" / "example_gt", max_frames=4).frames)[:, :, 96:160, 96:160]
    lr = downscale(gt, 4).clamp(-1, 1)
    out.append(("shipped latent-x4", lambda dt: VideoPipeline.from_pretrained(ROOT / "weights" / "latent-x4",
                                                                              device=device, dtype=dt),
                lr, lambda: Fusion(0.3)))
    unknown = sorted(set(names or []) - {k[0] for k in out})
    if unknown:
        raise ValueError(f"unknown --kinds {', '.join(unknown)}; expected some of {', '.join(k[0] for k in out)}")
    return [k for k in out if not names or k[0] in names]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def first_call_outputs(pipe, clip, align, steps: int) -> tuple[dict, torch.Tensor]:
    """Every module's output at the first call of the UNet / ControlNet, and the run's frames."""
    seen: dict[str, torch.Tensor] = {}
    done = set()
    hooks = []
    for label, model in (("unet", pipe.unet), ("controlnet", pipe.controlnet)):
        if model is None:
            continue
        for name, mod in model.named_modules():
            key = f"{label}.{name}" if name else label

            def hook(mod, args, out, key=key, label=label):
                if label in done or key in seen:
                    return
                y = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                if torch.is_tensor(y) and y.is_floating_point():
                    seen[key] = y.detach().float().cpu()
                if key == label:
                    done.add(label)  # the whole model returned: its first call is recorded

            hooks.append(mod.register_forward_hook(hook))
    try:
        frames = pipe(clip, options=SamplingOptions(num_inference_steps=steps, seed=3), alignment=align()).frames
    finally:
        for h in hooks:
            h.remove()
    return seen, frames.float().cpu()


@torch.no_grad()
def diagnose(make, clip, align, dtype: torch.dtype) -> dict:
    """Whole-run PSNR of ``dtype`` against float32 (1 and 4 steps) and the per-module errors of the first
    UNet / ControlNet call; ``make(dtype)`` builds the pipeline."""
    ref = {s: first_call_outputs(make(torch.float32), clip, align, s) for s in (1, 4)}
    got = {s: first_call_outputs(make(dtype), clip, align, s) for s in (1, 4)}
    errs = {k: relative_error(v, ref[1][0][k]) for k, v in got[1][0].items()
            if k in ref[1][0] and v.shape == ref[1][0][k].shape}
    first_jump = next((k for k, e in errs.items() if e > JUMP), None)
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
    return {
        "psnr_1_step": round(float(psnr(got[1][1], ref[1][1])), 2),
        "psnr_4_steps": round(float(psnr(got[4][1], ref[4][1])), 2),
        "modules_compared": len(errs),
        "first_module_over_1e-2": first_jump,
        "its_error": errs.get(first_jump) if first_jump else None,
        "worst_modules": [[k, round(e, 4)] for k, e in worst],
        "output_error": errs.get("unet"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--kinds", default=None, help="comma list (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "half_precision.json"))
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    report = {"device": args.device, "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "kinds": {}}
    for name, make, clip, align in kinds(args.device, args.kinds.split(",") if args.kinds else None):
        rec = report["kinds"][name] = {}
        for dt_name in args.dtypes.split(","):
            r = rec[dt_name] = diagnose(make, clip, align, DTYPES[dt_name])
            print(f"{name} {dt_name}: PSNR vs float32 {r['psnr_1_step']} dB (1 step), {r['psnr_4_steps']} dB "
                  f"(4 steps); first UNet call: output rel. error {r['output_error']}, first module over "
                  f"{JUMP}: {r['first_module_over_1e-2']} ({r['its_error']}); worst {r['worst_modules'][:3]}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from common import run_script

    run_script(main)  # bad flags: one line and exit 2
