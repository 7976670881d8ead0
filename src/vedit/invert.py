"""DDIM inversion of the clip's latents with the tuned model, cached in the project.

Running the deterministic DDIM sampler backwards from the clean latents (`sampler.ddim_invert`)
gives noise that the same model turns back into the clip; sampling from it under a new prompt
keeps the clip's structure and motion (Tune-A-Video, section 3.3). The original inverts with
the empty prompt and no guidance; `prompt` may be the source prompt instead.

The noise is stored in fp16 (the dtype the UNet reads it in on a GPU), half the disk of fp32
for a whole clip, keyed by everything it depends on; an interrupted inversion keeps its
progress beside it and a rerun continues.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vedit.errors import Interrupted
from vedit.progress import Reporter
from vedit.project import Project, cache_key
from vedit.tensorfiles import cached_tensors
from vedit.windows import ResumeFile, WindowPlan

if TYPE_CHECKING:
    from vedit.checkpoints import Checkpoint

#: Bump when an inversion for the same inputs would come out differently.
INVERSION_VERSION = 2  # 2: fp16 noise, windowed plans


@dataclass(frozen=True)
class Inversion:
    """Inverted noise `(1, c, f, h, w)` for the clip (fp16, as stored), and where it is cached."""

    noise: torch.Tensor
    key: str
    path: Path
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "reused": self.reused}


def inversion_key(checkpoint: Checkpoint, latents_key: str, steps: int, prompt: str,
                  scheduler_config: Any, plan: WindowPlan) -> str:
    """What an inversion depends on: the tuned weights, the clip, the steps, the prompt, the
    noise schedule and the windows."""
    schedule = {k: scheduler_config.get(k) for k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
        "timestep_spacing", "steps_offset", "set_alpha_to_one")}
    return cache_key("inversion", INVERSION_VERSION, checkpoint.record.get("id", checkpoint.name),
                     latents_key, steps, prompt, schedule, plan.describe())


def cached_inversion(project: Project, key: str, compute: Callable[[ResumeFile], torch.Tensor],
                     shape: Sequence[int], reporter: Reporter | None = None) -> Inversion:
    """The inversion of latents of `shape` stored under `key`, or `compute(resume_file)` now and
    stored (the caller holds the project lock). Interrupted, the finished work stays in
    `KEY.partial.safetensors` and the same call continues from it."""
    reporter = reporter or Reporter()
    path = project.inversion_file(key)
    resume = ResumeFile(project.inversion_progress_file(key), key)
    note = ("Reusing the cached inversion of an earlier edit (same checkpoint, steps and "
            "prompt: inversions/).")
    try:
        tensors, reused = cached_tensors(path, lambda: {"noise": compute(resume).half()},
                                         {"key": key}, note, reporter,
                                         shapes={"noise": shape})
    except KeyboardInterrupt:
        raise _interrupted(project, resume) from None
    resume.clear()  # stored whole now: the partial work is done with
    return Inversion(tensors["noise"], key, path, reused=reused)


def _interrupted(project: Project, resume: ResumeFile) -> Interrupted:
    """Say how far the inversion got and that a rerun continues from there."""
    saved = resume.saved
    if saved is None:
        return Interrupted("Inversion interrupted before its first window finished.",
                           "Rerun the same command to start it again.")
    where = f"after {_count(saved.step, 'step')}" + (
        f" and {_count(len(saved.outputs), 'window')} of the next" if saved.outputs else "")
    return Interrupted(f"Inversion interrupted {where}; that work is kept in "
                       f"{resume.path.relative_to(project.root)}.",
                       "Rerun the same command to continue from there.")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
