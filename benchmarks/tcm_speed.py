"""Per-stage time split of the StableVSR (TCM) mode on a checkpoint with StableVSR's layout.

Without a model path it builds a tiny random checkpoint with the exact layout (unet with 7 input
channels, vae, text encoder, tokenizer, controlnet, DDPM v-prediction), so the split shows the
pipeline's own overheads (VAE decodes of the neighbour x0, warping, flow), not StableVSR's speed.

    python benchmarks/tcm_speed.py [--model claudiom4sir/StableVSR --dtype float16 --device cuda]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipelines.flow import FlowConfig  # noqa: E402
from pipelines.tcm import TCMAlignment  # noqa: E402
from pipelines.timing import StageTimer  # noqa: E402
from pipelines.video_pipeline import SamplingOptions, VideoPipeline  # noqa: E402
from common import default_out, pick_device, resolve_model, run_script, write_json  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(model: str, frames: int, size: int, steps: int, device: str, dtype: str, flow_scale: float) -> dict:
    pipe = VideoPipeline.from_pretrained(resolve_model(model), device=device, dtype=DTYPES[dtype])
    import tiny

    lr = tiny.textured_clip(frames, size, shift=(0.8, 0.3)).to(DTYPES[dtype])
    tcm = TCMAlignment()
    timer = StageTimer(device)
    start = time.perf_counter()
    pipe(lr.float(), options=SamplingOptions(num_inference_steps=steps, batch_size=1), alignment=tcm,
         flow=FlowConfig(scale=flow_scale), timer=timer)
    wall = time.perf_counter() - start
    split = timer.report()
    return dict(frames=frames, lr_size=size, steps=steps, device=device, dtype=dtype, wall_s=round(wall, 3),
                stages_s=split, x0_decodes=len(tcm.decoded_frames),
                decodes_per_step=len(tcm.decoded_frames) / steps,
                share_of_wall={k: round(v / wall, 3) for k, v in split.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="StableVSR-layout folder or hub id (default: a tiny random one)")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--size", type=int, default=32, help="low-res side")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--flow-scale", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/tcm_speed.json with --model, else runs/benchmarks/ (a tiny "
                        "random model's figures are no result to commit)")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = default_out("tcm_speed.json", full=a.model is not None)
    if a.frames < 2:
        p.error(f"--frames must be >= 2 (the TCM conditions a frame on its neighbour), got {a.frames}")
    a.device = str(pick_device(a.device))
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            import tiny

            model = str(tiny.save_stablevsr_layout(Path(tmp) / "stablevsr"))
        res = run(model, a.frames, a.size, a.steps, a.device, a.dtype, a.flow_scale)
    card = torch.cuda.get_device_name(torch.device(a.device)) if torch.device(a.device).type == "cuda" else None
    res.update(model=a.model or "tiny random StableVSR layout", machine=platform.platform(), card=card,
               torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(res, indent=2))
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    run_script(main)
