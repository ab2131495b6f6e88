"""Peak host memory grows with clip length by about a latent per frame, not by full-resolution
frames, flows and masks (which would be ~10 latents per frame). Loose by design: RSS is noisy."""
import sys
from pathlib import Path

import tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import long_clip  # noqa: E402


def test_peak_memory_growth_per_frame_is_bounded(tmp_path):
    model = str(tiny.save_residual_sr(tmp_path / "model", scale=2))
    rows = long_clip.growth([long_clip.measure(n, 48, "one-pass", model, steps=1) for n in (20, 160)])
    per_frame = rows[1]["growth_latents_per_frame"]
    # measured 1.3 latents/frame (benchmarks/results/long_clip.json); keeping every full-resolution
    # conditioning frame, six flow/mask channels and three state buffers would cost about 10
    assert per_frame < 4.0, rows
