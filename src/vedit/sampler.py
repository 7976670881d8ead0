"""The DDIM sampler: the scheduler a base model samples with, inversion, and sampling with
classifier-free guidance, each step run over a clip's windows (windows.py).

Everything that decides how latents move from noise to a clip and back lives here, so
changing the sampler means changing this file. The model is any `Denoiser`: the inflated UNet,
or a test's exact denoiser of a known clip.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from vedit.progress import Reporter
from vedit.windows import ResumeFile, StepFn, WindowPlan, denoise_in_windows, single_window


class Denoiser(Protocol):
    """A model of clips: latents `(b, c, f, h, w)` at a timestep, under prompt states
    `(b, n, d)`, to the noise (or velocity) in them, in the same shape."""

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, /) -> torch.Tensor: ...


def ddim_scheduler(model_folder: Path) -> DDIMScheduler:
    """A DDIM scheduler on the model's own noise schedule, prediction type, timestep spacing and
    offset. Latents are never clipped, as diffusers' SD pipelines enforce."""
    config = DDIMScheduler.load_config(str(model_folder), subfolder="scheduler")
    return DDIMScheduler.from_config(
        config,
        prediction_type=config.get("prediction_type", "epsilon"),
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=config.get("steps_offset", 1),
        set_alpha_to_one=config.get("set_alpha_to_one", False),
        clip_sample=False,
    )


def inverse_scheduler(scheduler_config: Mapping[str, Any]) -> DDIMInverseScheduler:
    """diffusers' DDIM inverse on the same noise schedule (keys it does not take are dropped,
    rather than warned about: PNDM configs carry `skip_prk_steps`)."""
    accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters
    return DDIMInverseScheduler.from_config(
        {k: v for k, v in scheduler_config.items() if k in accepted})


def predict(unet: Denoiser, latents: torch.Tensor, timestep: torch.Tensor,
            prompt_embeds: torch.Tensor) -> torch.Tensor:
    """One model call in the model's dtype; the result in fp32 for the scheduler's arithmetic."""
    dtype = unet.dtype
    return unet(latents.to(dtype), timestep, prompt_embeds.to(dtype)).float()


def unet_device(unet: Denoiser, fallback: torch.device) -> torch.device:
    """Where the model runs; one that does not say (a test's exact denoiser) runs at `fallback`."""
    device: torch.device = getattr(unet, "device", fallback)
    return device


@torch.no_grad()
def ddim_invert(unet: Denoiser, scheduler_config: Mapping[str, Any], latents: torch.Tensor,
                prompt_embeds: torch.Tensor, steps: int, reporter: Reporter | None = None, *,
                plan: WindowPlan | None = None, resume: ResumeFile | None = None
                ) -> torch.Tensor:
    """Latents `(b, c, f, h, w)` to the noise DDIM sampling in `steps` steps would start from,
    in the windows of `plan` (default: all frames at once). The result stays on the latents'
    device; each window runs on the model's."""
    device = unet_device(unet, latents.device)
    inverse = inverse_scheduler(scheduler_config)
    inverse.set_timesteps(steps, device=device)
    embeds = prompt_embeds.to(device)

    def step(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        previous: torch.Tensor = inverse.step(predict(unet, sample, timestep, embeds), timestep,
                                              sample).prev_sample
        return previous

    return denoise_in_windows(latents, inverse.timesteps, step,
                              plan or single_window(latents.shape[2]), device=device,
                              label="inverting", reporter=reporter, resume=resume)


@torch.no_grad()
def ddim_sample(unet: Denoiser, scheduler: DDIMScheduler, noise: torch.Tensor,
                cond: torch.Tensor, uncond: torch.Tensor, guidance: float, steps: int,
                reporter: Reporter | None = None, label: str = "sampling", *,
                plan: WindowPlan | None = None) -> torch.Tensor:
    """DDIM from `noise` `(b, c, f, h, w)` with classifier-free guidance (one batched call for
    the unconditional and conditional halves; guidance 1 needs only the conditional one), in
    the windows of `plan` (default: all frames at once). The result stays on the noise's
    device; each window runs on the model's."""
    device = unet_device(unet, noise.device)
    scheduler.set_timesteps(steps, device=device)
    step = guided_step(unet, scheduler, cond.to(device), uncond.to(device), guidance)
    return denoise_in_windows(noise, scheduler.timesteps, step,
                              plan or single_window(noise.shape[2]), device=device,
                              label=label, reporter=reporter)


def guided_step(unet: Denoiser, scheduler: DDIMScheduler, cond: torch.Tensor,
                uncond: torch.Tensor, guidance: float) -> StepFn:
    """One DDIM step of a window's latents under classifier-free guidance."""

    def step(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            model_output = predict(unet, sample, timestep, cond)
        else:
            both = predict(unet, torch.cat([sample, sample]), timestep,
                           torch.cat([uncond, cond]))
            unconditional, conditional = both.chunk(2)
            model_output = unconditional + guidance * (conditional - unconditional)
        previous: torch.Tensor = scheduler.step(model_output, timestep, sample).prev_sample
        return previous

    return step
