"""Adapter that turns a diffusers UNet (plus optional ControlNet) into one calling convention:

    model_output = denoiser(x, t, concat=..., frames=..., **alignment_kwargs)

It owns everything per call that is not schedule maths: the scheduler's input scaling, the
conditioning frame concatenated to the input channels, text embeddings, noise-level class labels,
classifier-free guidance (conditional and unconditional in one batch) and ControlNet residuals.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


class Denoiser:
    def __init__(self, unet, scheduler, *, prompt_embeds: torch.Tensor | None = None,
                 negative_embeds: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 class_labels: torch.Tensor | None = None, controlnet=None):
        """``prompt_embeds``/``negative_embeds``: (1, L, D) text embeddings, shared by all frames.
        ``class_labels``: (1,) noise level (SD x4 upscaler) or None. Guidance > 1 enables CFG.
        """
        self.unet, self.scheduler, self.controlnet = unet, scheduler, controlnet
        self.conditional = isinstance(unet, UNet2DConditionModel)
        if self.conditional and prompt_embeds is None:
            raise ValueError("a UNet2DConditionModel needs prompt embeddings")
        self.cfg = guidance_scale > 1.0
        if self.cfg and (negative_embeds is None or not self.conditional):
            raise ValueError("classifier-free guidance needs a text-conditioned UNet and negative prompt embeddings")
        self.prompt_embeds, self.negative_embeds = prompt_embeds, negative_embeds
        self.guidance_scale, self.class_labels = guidance_scale, class_labels
        self.dtype = unet.dtype

    def _repeat(self, x: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return None if x is None else x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x

    def __call__(self, x: torch.Tensor, t, concat: torch.Tensor | None = None,
                 control: torch.Tensor | None = None, control_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """x: (B, C, h, w) samples at timestep t -> (B, C, h, w) model output (float32).

        ``concat``: (B, Cc, h, w) conditioning frames. ``control``: (B, 3, H, W) ControlNet condition;
        ``control_scale`` a float or a (B,) tensor (0 switches the ControlNet off for that frame).
        """
        b = x.shape[0]
        inp = self.scheduler.scale_model_input(x, t)
        n = 2 * b if self.cfg else b
        if self.cfg:
            inp = torch.cat([inp, inp])
            concat = None if concat is None else torch.cat([concat, concat])
        if concat is not None:
            inp = torch.cat([inp, concat.to(inp.dtype)], dim=1)
        inp = inp.to(self.dtype)
        kwargs = {}
        if self.class_labels is not None:
            kwargs["class_labels"] = self._repeat(self.class_labels, n)
        if self.conditional:
            emb = self._repeat(self.prompt_embeds, b)
            if self.cfg:
                emb = torch.cat([self._repeat(self.negative_embeds, b), emb])
            kwargs["encoder_hidden_states"] = emb.to(self.dtype)
        if control is not None:
            if self.controlnet is None:
                raise ValueError("a control condition was given but the pipeline has no ControlNet")
            cond = torch.cat([control, control]) if self.cfg else control
            down, mid = self.controlnet(inp[:, :self.controlnet.config.in_channels], t,
                                        encoder_hidden_states=kwargs.get("encoder_hidden_states"),
                                        controlnet_cond=cond.to(self.dtype), return_dict=False,
                                        class_labels=kwargs.get("class_labels"))
            scale = torch.as_tensor(control_scale, dtype=self.dtype, device=inp.device).reshape(-1, 1, 1, 1)
            if scale.shape[0] > 1 and self.cfg:
                scale = torch.cat([scale, scale])
            kwargs["down_block_additional_residuals"] = [r * scale for r in down]
            kwargs["mid_block_additional_residual"] = mid * scale
        out = self.unet(inp, t, **kwargs, return_dict=False)[0].float()
        if self.cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out
