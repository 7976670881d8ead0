"""DDIM inversion of the clip's latents with the tuned model, cached in the project.

Running the deterministic DDIM sampler backwards from the clean latents gives noise that the
same model turns back into the clip; sampling from it under a new prompt keeps the clip's
structure and motion (Tune-A-Video, section 3.3). The original inverts with the empty prompt
and no guidance; `prompt` may be the source prompt instead. diffusers' `DDIMInverseScheduler`
does each step, so v-prediction bases invert correctly too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMInverseScheduler

from vedit.checkpoints import Checkpoint, load_tensors, save_tensors
from vedit.progress import Reporter
from vedit.project import Project, atomic_file, cache_key

#: Bump when an inversion for the same inputs would come out differently.
INVERSION_VERSION = 1
INVERSIONS_DIR = "inversions"


@dataclass(frozen=True)
class Inversion:
    """Inverted noise `(1, c, f, h, w)` for the clip, and where it is cached."""

    noise: torch.Tensor
    key: str
    path: Path
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "reused": self.reused}


def predict(unet: Any, latents: torch.Tensor, timestep: torch.Tensor,
            prompt_embeds: torch.Tensor) -> torch.Tensor:
    """One UNet call in the UNet's dtype; the result in fp32 for the scheduler's arithmetic."""
    dtype = unet.dtype
    return unet(latents.to(dtype), timestep, prompt_embeds.to(dtype)).float()


def inverse_scheduler(scheduler_config: Any) -> DDIMInverseScheduler:
    """diffusers' DDIM inverse on the same noise schedule (keys it does not take are dropped,
    rather than warned about: PNDM configs carry `skip_prk_steps`)."""
    accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters
    return DDIMInverseScheduler.from_config(
        {k: v for k, v in scheduler_config.items() if k in accepted})


@torch.no_grad()
def ddim_invert(unet: Any, scheduler_config: Any, latents: torch.Tensor,
                prompt_embeds: torch.Tensor, steps: int, reporter: Reporter | None = None
                ) -> torch.Tensor:
    """Latents `(b, c, f, h, w)` to the noise DDIM sampling in `steps` steps would start from."""
    reporter = reporter or Reporter()
    inverse = inverse_scheduler(scheduler_config)
    inverse.set_timesteps(steps, device=latents.device)
    sample = latents.float()
    with reporter.task("inverting", total=len(inverse.timesteps)) as task:
        for timestep in inverse.timesteps:
            model_output = predict(unet, sample, timestep, prompt_embeds)
            sample = inverse.step(model_output, timestep, sample).prev_sample
            task.advance()
    return sample


def inversion_key(checkpoint: Checkpoint, latents_key: str, steps: int, prompt: str,
                  scheduler_config: Any) -> str:
    """What an inversion depends on: the tuned weights, the clip, the steps, the prompt and the
    noise schedule."""
    schedule = {k: scheduler_config.get(k) for k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
        "timestep_spacing", "steps_offset", "set_alpha_to_one")}
    return cache_key("inversion", INVERSION_VERSION, checkpoint.record.get("id", checkpoint.name),
                     latents_key, steps, prompt, schedule)


def cached_inversion(project: Project, key: str, compute: Any,
                     reporter: Reporter | None = None) -> Inversion:
    """The inversion stored under `key`, or `compute()` now and stored (the caller holds the
    project lock)."""
    reporter = reporter or Reporter()
    path = project.root / INVERSIONS_DIR / f"{key}.safetensors"
    if path.is_file():
        tensors, _ = load_tensors(path)
        reporter.info(f"Reusing the cached inversion {path.name} (same checkpoint, steps and "
                      "prompt).")
        return Inversion(tensors["noise"], key, path, reused=True)
    noise = compute()
    with atomic_file(path) as temp:
        save_tensors(temp, {"noise": noise.float()}, {"key": key})
    return Inversion(noise, key, path, reused=False)
