"""VAE latents of the project's frames, encoded once and cached, keyed by frames and model.

The original Tune-A-Video re-encodes the clip with the VAE at every training step. The
encoder's output is a Gaussian per pixel of latent; vedit caches its mean and standard
deviation, so training still draws a fresh latent sample each step (`FrameLatents.sample`)
without running the VAE, and inversion uses the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from vedit.checkpoints import load_tensors, save_tensors
from vedit.extract import frame_paths
from vedit.progress import Reporter
from vedit.project import Project, atomic_file, cache_key

#: Bump when latents for the same frames and model would come out differently.
LATENTS_VERSION = 1
LATENTS_DIR = "latents"


@dataclass(frozen=True)
class FrameLatents:
    """Scaled latents of a clip, `(1, c, f, h, w)`: the encoder's mean and standard deviation."""

    mean: torch.Tensor
    std: torch.Tensor
    path: Path
    reused: bool

    @property
    def num_frames(self) -> int:
        return self.mean.shape[2]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the encoder's distribution, as the original's `latent_dist.sample()`."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def to(self, device: torch.device | str) -> FrameLatents:
        return FrameLatents(self.mean.to(device), self.std.to(device), self.path, self.reused)


def load_frames(paths: list[Path]) -> torch.Tensor:
    """PNG frames as one float tensor `(f, 3, h, w)` in [-1, 1], the VAE's input range."""
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_frames(vae: torch.nn.Module, frames: torch.Tensor, *,
                  slice_size: int = 8, reporter: Reporter | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `(f, 3, h, w)` frames a slice at a time; scaled mean and std, `(f, c, h, w)`."""
    reporter = reporter or Reporter()
    weight = next(vae.parameters())
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    with reporter.task("encoding frames", total=len(frames)) as task:
        for start in range(0, len(frames), slice_size):
            chunk = frames[start:start + slice_size].to(weight.device, weight.dtype)
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean.float() * scale)
            stds.append(dist.std.float() * scale)
            task.advance(len(chunk))
    return torch.cat(means), torch.cat(stds)


def latents_key(project: Project, model_fingerprint: str) -> str:
    frames = project.require("frames", "extract")
    return cache_key("latents", LATENTS_VERSION, frames["key"], model_fingerprint)


def frame_latents(project: Project, vae: torch.nn.Module, model_fingerprint: str,
                  reporter: Reporter | None = None) -> FrameLatents:
    """The clip's latents from the cache, or encoded now and cached (caller holds the lock)."""
    reporter = reporter or Reporter()
    key = latents_key(project, model_fingerprint)
    path = project.root / LATENTS_DIR / f"{key}.safetensors"
    if path.is_file():
        tensors, _ = load_tensors(path)
        reporter.info(f"Reusing the cached latents {path.name}.")
        return FrameLatents(tensors["mean"], tensors["std"], path, reused=True)
    mean, std = encode_frames(vae, load_frames(frame_paths(project)), reporter=reporter)
    mean, std = (rearrange(t, "f c h w -> 1 c f h w").contiguous() for t in (mean, std))
    with atomic_file(path) as temp:
        save_tensors(temp, {"mean": mean, "std": std},
                     {"frames_key": project.require("frames", "extract")["key"],
                      "model": model_fingerprint})
    return FrameLatents(mean, std, path, reused=False)
