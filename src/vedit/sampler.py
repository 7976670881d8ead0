"""The DDIM sampler: the scheduler a base model samples with, inversion, and sampling with
classifier-free guidance, each step run over a clip's windows (windows.py).

Everything that decides how latents move from noise to a clip and back lives here, so
changing the sampler means changing this file. The model is any `Denoiser`: the inflated UNet,
or a test's exact denoiser of a known clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from diffusers import DDIMScheduler

from vedit.conditioning import Conditioning
from vedit.progress import Reporter
from vedit.windows import ResumeFile, StepFn, WindowPlan, denoise_in_windows, single_window


class Denoiser(Protocol):
    """A model of clips: latents `(b, c, f, h, w)` at a timestep, under prompt states
    `(b, n, d)` (and an SDXL UNet's added conditioning, which is passed only to a model of an
    SDXL base), to the noise (or velocity) in them, in the same shape."""

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: Mapping[str, torch.Tensor] | None = None, /
                 ) -> torch.Tensor: ...


#: What the sampler conditions on: prompt states alone, or a whole `Conditioning`.
Condition = torch.Tensor | Conditioning


def as_conditioning(condition: Condition) -> Conditioning:
    return condition if isinstance(condition, Conditioning) else Conditioning(condition)


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


def inversion_timesteps(scheduler: DDIMScheduler, steps: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """The timesteps DDIM sampling in `steps` steps visits, in reverse: inversion retraces the
    sampler's own path, whatever its timestep spacing (leading, trailing or linspace)."""
    scheduler.set_timesteps(steps, device=device)
    timesteps: torch.Tensor = scheduler.timesteps
    return timesteps.flip(0)


def ddim_inverse_step(scheduler: DDIMScheduler, model_output: torch.Tensor,
                      timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The sampler's DDIM step at `timestep` run backwards: from the noise level that step lands
    on (`timestep` minus the step ratio, as `DDIMScheduler.step` computes it) up to
    `timestep`'s, with the model's prediction at `timestep`, as Tune-A-Video's inversion loop
    and diffusers' `DDIMInverseScheduler` do (which take leading and trailing spacings only)."""
    config = scheduler.config
    target = int(timestep)
    source = min(target - config.num_train_timesteps // scheduler.num_inference_steps,
                 config.num_train_timesteps - 1)
    alpha_prod_t = (scheduler.alphas_cumprod[source] if source >= 0
                    else scheduler.final_alpha_cumprod)
    alpha_prod_t_next = scheduler.alphas_cumprod[target]
    beta_prod_t = 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / (
            alpha_prod_t ** (0.5))
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / (
            beta_prod_t ** (0.5))
    else:  # v_prediction
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    direction = (1 - alpha_prod_t_next) ** (0.5) * pred_epsilon
    previous: torch.Tensor = alpha_prod_t_next ** (0.5) * pred_original_sample + direction
    return previous


def predict(unet: Denoiser, latents: torch.Tensor, timestep: torch.Tensor,
            condition: Condition) -> torch.Tensor:
    """One model call in the model's dtype; the result in fp32 for the scheduler's arithmetic."""
    dtype = unet.dtype
    condition = as_conditioning(condition)
    states = condition.states.to(dtype)
    if condition.added is None:
        return unet(latents.to(dtype), timestep, states).float()
    added = {name: value.to(dtype) for name, value in condition.added.items()}
    return unet(latents.to(dtype), timestep, states, added).float()


def unet_device(unet: Denoiser, fallback: torch.device) -> torch.device:
    """Where the model runs; one that does not say (a test's exact denoiser) runs at `fallback`."""
    device: torch.device = getattr(unet, "device", fallback)
    return device


@torch.no_grad()
def ddim_invert(unet: Denoiser, scheduler: DDIMScheduler, latents: torch.Tensor,
                prompt_embeds: Condition, steps: int, reporter: Reporter | None = None, *,
                plan: WindowPlan | None = None, resume: ResumeFile | None = None
                ) -> torch.Tensor:
    """Latents `(b, c, f, h, w)` to the noise that DDIM sampling with `scheduler` in `steps`
    steps would start from, in the windows of `plan` (default: all frames at once). The result
    stays on the latents' device; each window runs on the model's."""
    device = unet_device(unet, latents.device)
    timesteps = inversion_timesteps(scheduler, steps, device)
    embeds = as_conditioning(prompt_embeds).to(device)

    def step(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return ddim_inverse_step(scheduler, predict(unet, sample, timestep, embeds), timestep,
                                 sample)

    return denoise_in_windows(latents, timesteps, step,
                              plan or single_window(latents.shape[2]), device=device,
                              label="inverting", reporter=reporter, resume=resume)


@torch.no_grad()
def ddim_sample(unet: Denoiser, scheduler: DDIMScheduler, noise: torch.Tensor,
                cond: Condition, uncond: Condition, guidance: float, steps: int,
                reporter: Reporter | None = None, label: str = "sampling", *,
                plan: WindowPlan | None = None) -> torch.Tensor:
    """DDIM from `noise` `(b, c, f, h, w)` with classifier-free guidance (one batched call for
    the unconditional and conditional halves; guidance 1 or less needs only the conditional
    one), in the windows of `plan` (default: all frames at once). The result stays on the
    noise's device; each window runs on the model's."""
    device = unet_device(unet, noise.device)
    scheduler.set_timesteps(steps, device=device)
    step = guided_step(unet, scheduler, as_conditioning(cond).to(device),
                       as_conditioning(uncond).to(device), guidance)
    return denoise_in_windows(noise, scheduler.timesteps, step,
                              plan or single_window(noise.shape[2]), device=device,
                              label=label, reporter=reporter)


def guided_step(unet: Denoiser, scheduler: DDIMScheduler, cond: Conditioning,
                uncond: Conditioning, guidance: float) -> StepFn:
    """One DDIM step of a window's latents under classifier-free guidance; a guidance of 1 or
    less is no guidance, as in diffusers and Tune-A-Video: the conditional prediction alone."""

    def step(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if guidance <= 1.0:
            model_output = predict(unet, sample, timestep, cond)
        else:
            both = predict(unet, torch.cat([sample, sample]), timestep, uncond.cat(cond))
            unconditional, conditional = both.chunk(2)
            model_output = unconditional + guidance * (conditional - unconditional)
        previous: torch.Tensor = scheduler.step(model_output, timestep, sample).prev_sample
        return previous

    return step
