"""The sampling options of :class:`pipelines.video_pipeline.VideoPipeline` (re-exported there), with their checks.

Imports nothing heavy: the config checks its sampling ranges through this class, before the job imports torch
and diffusers, so a config error returns at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SamplingOptions:
    num_inference_steps: int = 20
    strength: float = 1.0
    seed: int = 0
    noise: Literal["independent", "shared"] = "independent"
    eta: float = 0.0
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = 1.0
    noise_level: int = 20  # upscaler only
    direction: Literal["bidirectional", "forward", "backward"] = "bidirectional"
    start: Literal["forward", "backward"] = "forward"
    passes: int = 0
    chain_length: int | None = None
    batch_size: int = 0  # frames per model call; 0 = auto_batch
    decode_batch_size: int = 0  # frames per VAE call; 0 = auto_batch
    offload_state: bool = False  # keep per-frame state on the host, move only the batch to the device
    back_projection: bool = False  # SR models: the output made to agree with its input (pipelines.backproject)
    frame_offset: int = 0  # index of the first frame in the whole clip (windows): frame f draws from seed + f

    def __post_init__(self):
        """Ranges and names checked here too, for library callers (the config checks its own copy)."""
        import math

        if self.chain_length == 0:
            self.chain_length = None  # the config's "0 = the exact sweep"
        for name, ok, want in (
                ("num_inference_steps", self.num_inference_steps >= 1, ">= 1"),
                ("strength", 0 < self.strength <= 1, "in (0, 1]"),
                ("seed", 0 <= self.seed < 2 ** 63 - 1_000_000, "in [0, 2**63 - 1e6)"),
                ("noise", self.noise in ("independent", "shared"), "independent or shared"),
                # DDIM's step takes the square root of 1 - alpha_prev - (eta sigma)^2, negative for eta > 1 at
                # some steps: NaN samples, a black video
                ("eta", 0 <= self.eta <= 1, "in [0, 1]"),
                ("guidance_scale", math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "finite and >= 0"),
                ("noise_level", self.noise_level >= 0, ">= 0"),
                ("direction", self.direction in ("bidirectional", "forward", "backward"),
                 "bidirectional, forward or backward"),
                ("start", self.start in ("forward", "backward"), "forward or backward"),
                ("passes", self.passes >= 0, ">= 0 (0 = flip every step)"),
                ("chain_length", self.chain_length is None or self.chain_length >= 1, ">= 0 (0 = exact sweep)"),
                ("batch_size", self.batch_size >= 0, ">= 0 (0 = auto)"),
                ("decode_batch_size", self.decode_batch_size >= 0, ">= 0 (0 = auto)"),
                ("frame_offset", self.frame_offset >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"SamplingOptions.{name} must be {want}, got {getattr(self, name)!r}")
