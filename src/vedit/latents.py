"""VAE latents of the project's frames, encoded once and cached, keyed by frames and model.

The original Tune-A-Video re-encodes the clip with the VAE at every training step. The
encoder's output is a Gaussian per pixel of latent; vedit caches its mean and standard
deviation, so training still draws a fresh latent sample each step (`FrameLatents.sample`)
without running the VAE, and inversion uses the mean.

`edit --full` renders every frame of the clip's span instead: those frames are decoded from
the source clip on demand, in order, sized exactly as extract sized the tuned ones, encoded a
slice at a time, and their means cached in fp16 (a whole clip's worth), keyed by the span and
the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from vedit.errors import BadInputError, ProjectError
from vedit.progress import Reporter
from vedit.project import FRAMES_VERSION, Project, cache_key, file_sha256
from vedit.tensorfiles import cached_tensors
from vedit.video import VideoInfo, first_frame_at, fit_frame, probe, read_span

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

#: Bump when latents for the same frames and model would come out differently.
LATENTS_VERSION = 1
ENCODE_SLICE = 8  # frames read from the clip at once: bounded memory for long clips
#: The frame pixels the VAE encodes or decodes at once, in bytes of its dtype: four 512 x 512
#: frames in fp16. Its activations grow with the pixels (SD's VAE decode holds about 0.9 GB a
#: 512 px frame in fp16), so a slice of this size bounds them at any frame size and precision:
#: SD at 512 px in fp16 gets 4 frames a call, SDXL's fp32 VAE at 1024 px one.
VAE_SLICE_BYTES = 4 * 512 * 512 * 2
VAE_SLICE_MAX = 8  # frames a call at most, however small they are
#: A frame over this many times the VAE's tile area (512 x 512 for SD) is encoded in tiles, one
#: frame at a time: no single operation then runs for minutes, so Ctrl-C and SIGTERM are
#: honoured between tiles, the bar moves tile by tile and memory stays bounded. Frames at a
#: model's usual sizes are encoded whole, as before (tiles blend at their seams).
TILE_ABOVE = 4


@dataclass(frozen=True)
class FrameLatents:
    """Scaled latents of a clip, `(1, c, f, h, w)`: the encoder's mean and standard deviation."""

    mean: torch.Tensor
    std: torch.Tensor
    key: str  # what they were computed from: the frames and the model
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
        return FrameLatents(self.mean.to(device), self.std.to(device), self.key, self.path,
                            self.reused)


def read_frame(path: Path, width: int, height: int) -> np.ndarray:
    """A project frame as RGB `(h, w, 3)` uint8; one that is not a `width` x `height` image
    (damaged, or replaced by hand) is a ProjectError naming it."""
    try:
        with Image.open(path) as image:
            if image.size != (width, height):
                raise ProjectError(f"The frame {path} is {image.size[0]}x{image.size[1]}, not "
                                   f"{width}x{height} as the project's others.", _REEXTRACT)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ProjectError(f"The frame {path} is not a readable image ({exc}).",
                           _REEXTRACT) from None


_REEXTRACT = "Run `vedit extract` on the clip again to write the frames anew."


def load_frames(paths: list[Path], width: int, height: int) -> torch.Tensor:
    """PNG frames as one float tensor `(f, 3, h, w)` in [-1, 1], the VAE's input range."""
    return images_to_tensor([read_frame(p, width, height) for p in paths])


def latent_shape(vae: AutoencoderKL, num_frames: int, width: int, height: int
                 ) -> tuple[int, int, int, int, int]:
    """The shape `(1, c, f, h, w)` of `num_frames` frames' latents under `vae`."""
    factor = vae_scale(vae)
    return (1, int(vae.config.latent_channels), num_frames, height // factor, width // factor)


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB frames `(h, w, 3)` uint8 as one float tensor `(f, 3, h, w)` in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vae_scale(vae: AutoencoderKL) -> int:
    """How many pixels a latent spans on each side under `vae` (8 for SD's and SDXL's)."""
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def vae_slice(vae: AutoencoderKL, height: int, width: int) -> int:
    """Frames of `height` x `width` pixels the VAE takes in one call at its dtype: as many as fit
    `VAE_SLICE_BYTES`, at least one and at most `VAE_SLICE_MAX`."""
    itemsize = int(next(vae.parameters()).element_size())
    return max(1, min(VAE_SLICE_MAX, VAE_SLICE_BYTES // (height * width * itemsize)))


@torch.no_grad()
def encode_frames(vae: AutoencoderKL, frames: torch.Tensor, *,
                  slice_size: int | None = None, reporter: Reporter | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `(f, 3, h, w)` frames a slice at a time (`vae_slice` frames unless `slice_size`;
    a large frame in tiles); scaled mean and std, `(f, c, h, w)`."""
    reporter = reporter or Reporter()
    upcast_if_overflowing(vae)
    weight = next(vae.parameters())
    slice_size = slice_size or vae_slice(vae, frames.shape[-2], frames.shape[-1])
    scale = float(vae.config.scaling_factor)
    tiles = _tiles_per_frame(vae, frames.shape[-2], frames.shape[-1])
    means, stds = [], []
    with reporter.task("encoding frames", total=len(frames)) as task, \
            _tiled(vae, task.advance, tiles):
        for start in range(0, len(frames), 1 if tiles else slice_size):
            chunk = frames[start:start + (1 if tiles else slice_size)].to(weight.device,
                                                                         weight.dtype)
            dist = vae.encode(chunk).latent_dist
            check_finite(dist.mean, "The VAE encoded the frames to", weight.dtype)
            means.append(dist.mean.float() * scale)
            stds.append(dist.std.float() * scale)
            if not tiles:
                task.advance(len(chunk))
    return torch.cat(means), torch.cat(stds)


def upcast_if_overflowing(vae: AutoencoderKL) -> None:
    """Move an fp16 VAE whose config says it overflows in fp16 (`force_upcast`: SDXL's) to fp32,
    as diffusers' pipelines do; its frames would come out black or NaN otherwise."""
    if next(vae.parameters()).dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.to(torch.float32)


def check_finite(values: torch.Tensor, what: str, dtype: torch.dtype | None = None) -> None:
    """Refuse inf or NaN before they are cached or written as black frames; `what` names them
    ("The VAE encoded the frames to"), `dtype` the precision that computed them."""
    if not bool(torch.isfinite(values).logical_not().any()):  # (a memory trace reads False)
        return
    where = f" (computed in {str(dtype).removeprefix('torch.')})" if dtype is not None else ""
    raise BadInputError(
        f"{what} values that are not finite (inf or NaN){where}.",
        "The model overflowed: tune with --mixed-precision bf16 (or no), or use a VAE that runs "
        "in fp16 (e.g. an SDXL fine-tune with the fp16-fixed VAE); check the model's weights are "
        "whole (vedit fetch-models MODEL).")


def _tiles_per_frame(vae: AutoencoderKL, height: int, width: int) -> int:
    """How many tiles diffusers' tiled encode cuts a frame into; 0 where it is encoded whole."""
    tile = int(vae.tile_sample_min_size)
    if height * width <= TILE_ABOVE * tile * tile:
        return 0
    stride = int(tile * (1 - vae.tile_overlap_factor))
    return math.ceil(height / stride) * math.ceil(width / stride)


@contextmanager
def _tiled(vae: AutoencoderKL, advance: Callable[[float], None], tiles: int) -> Iterator[None]:
    """With `tiles`, the VAE encodes in tiles and each tile moves the bar by its share of a
    frame; the VAE is left as it was."""
    if not tiles:
        yield
        return
    was_tiling = vae.use_tiling
    vae.enable_tiling()
    hook = vae.encoder.register_forward_hook(lambda *_: advance(1 / tiles))
    try:
        yield
    finally:
        hook.remove()
        vae.use_tiling = was_tiling


def frame_latents(project: Project, vae: AutoencoderKL, model_fingerprint: str,
                  reporter: Reporter | None = None) -> FrameLatents:
    """The clip's latents from the cache, or encoded now and cached (caller holds the lock)."""
    reporter = reporter or Reporter()
    frames = project.require("frames", "extract")
    key = cache_key("latents", LATENTS_VERSION, frames["key"], model_fingerprint)
    path = project.latents_file(key)
    width, height = frames["width"], frames["height"]

    def encode() -> dict[str, torch.Tensor]:
        paths = project.frame_paths()
        if len(paths) != frames["count"]:
            raise ProjectError(f"{project.frames_folder()} holds {len(paths)} frames; the record "
                               f"says {frames['count']}.", _REEXTRACT)
        images = load_frames(paths, width, height)
        mean, std = encode_frames(vae, images, reporter=reporter)
        return {name: rearrange(t, "f c h w -> 1 c f h w").contiguous()
                for name, t in (("mean", mean), ("std", std))}

    metadata = {"frames_key": frames["key"], "model": model_fingerprint}
    shape = latent_shape(vae, frames["count"], width, height)
    note = "Reusing the frames' VAE latents from an earlier run (latents/)."
    tensors, reused = cached_tensors(path, encode, metadata, note, reporter,
                                     shapes={"mean": shape, "std": shape})
    return FrameLatents(tensors["mean"], tensors["std"], key, path, reused=reused)


# -- the whole span, for edit --full ---------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """The stretch of the source clip that `edit --full` renders: its frames `first` to
    `stop - 1` (from the first tuned frame to extract's --end), at the project's frame size."""

    info: VideoInfo
    first: int
    stop: int
    width: int
    height: int
    key: str

    @property
    def num_frames(self) -> int:
        return self.stop - self.first

    @property
    def times(self) -> list[float]:
        """Each frame's time in the source clip, seconds (a variable rate is kept)."""
        return self.info.frame_times[self.first:self.stop]

    @property
    def interval(self) -> float:
        """How long the last frame shows: one frame at the source's average rate."""
        return float(1 / self.info.fps)


def clip_span(project: Project, reporter: Reporter | None = None) -> Span:
    """The span of the project's source clip, checked to be the clip extract read."""
    reporter = reporter or Reporter()
    source = project.require("source", "extract")
    frames = project.require("frames", "extract")
    path = Path(source["path"])
    if not path.is_file():
        raise BadInputError(f"The source clip {path} is gone; --full reads every frame from it.",
                            "Put the clip back there, or run `vedit extract` on it where it is.")
    with reporter.task("checking the source clip", total=None):
        if file_sha256(path) != source["sha256"]:
            raise BadInputError(f"{path} has changed since `vedit extract` read it.",
                                "Restore the original clip, or extract and tune again.")
    info = probe(path)
    # The span starts at the first tuned frame (where remux starts the sound) and ends where
    # extract's --end does.
    first = int(frames["source_indices"][0])
    end = (project.section("extract") or {}).get("end")
    stop = info.frame_count if end is None else first_frame_at(info.frame_times, float(end))
    key = cache_key("span", FRAMES_VERSION, source["sha256"], first, stop, frames["width"],
                    frames["height"])
    return Span(info, first, stop, int(frames["width"]), int(frames["height"]), key)


def span_images(span: Span) -> Iterator[np.ndarray]:
    """The span's frames, decoded in order and sized exactly as extract sized the tuned ones."""
    for image in read_span(span.info, span.first, span.stop):
        yield np.asarray(fit_frame(image.convert("RGB"), span.width, span.height))


@dataclass(frozen=True)
class SpanLatents:
    """Scaled latent means of the whole span, `(1, c, f, h, w)` fp16 on the CPU."""

    mean: torch.Tensor
    key: str
    path: Path
    reused: bool


def span_latents_key(span: Span, model_fingerprint: str) -> str:
    return cache_key("span-latents", LATENTS_VERSION, span.key, model_fingerprint)


def span_latents(project: Project, span: Span, vae: AutoencoderKL, model_fingerprint: str,
                 reporter: Reporter | None = None) -> SpanLatents:
    """The span's latents from the cache, or encoded a slice at a time now and cached (the
    caller holds the lock); only a slice of frames is ever in memory at once."""
    reporter = reporter or Reporter()
    key = span_latents_key(span, model_fingerprint)
    path = project.latents_file(key)

    def encode() -> dict[str, torch.Tensor]:
        means = []
        with reporter.task(f"encoding {span.num_frames} frames", total=span.num_frames) as task:
            for chunk in _slices(span_images(span), ENCODE_SLICE):
                mean, _ = encode_frames(vae, images_to_tensor(chunk))
                means.append(mean.half().cpu())
                task.advance(len(chunk))
        return {"mean": rearrange(torch.cat(means), "f c h w -> 1 c f h w").contiguous()}

    note = (f"Reusing the VAE latents of the span's {span.num_frames} frames from an earlier "
            "edit --full (latents/).")
    shape = latent_shape(vae, span.num_frames, span.width, span.height)
    tensors, reused = cached_tensors(path, encode,
                                     {"span_key": span.key, "model": model_fingerprint}, note,
                                     reporter, shapes={"mean": shape})
    return SpanLatents(tensors["mean"], key, path, reused=reused)


def _slices(items: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
