"""The edit stage: render the tuned clip under new prompts.

As a diffusers pipeline, in small named steps: load the tuned model, encode the prompts,
invert the clip's latents (cached, invert.py), sample each prompt with classifier-free
guidance, decode in slices, write `edits/NAME/` (video.mp4, compare.mp4, optional gif and
PNG frames, edit.toml). Under `accelerate launch` the prompts are split across processes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from vedit import __version__, tomlio
from vedit.checkpoints import Checkpoint, find_checkpoint, tuned_unet
from vedit.errors import BadInputError, OutOfMemoryError
from vedit.extract import frame_paths
from vedit.invert import Inversion, cached_inversion, ddim_invert, inversion_key, predict
from vedit.latents import frame_latents, latents_key
from vedit.models import Components, load_components
from vedit.progress import Reporter
from vedit.project import Project, atomic_dir
from vedit.prompts import encode_prompts
from vedit.settings import EditSettings, as_record
from vedit.video import write_gif, write_mp4

EDITS_DIR = "edits"
DECODE_SLICE = 8  # frames the VAE decodes at once: bounded memory for long clips


@dataclass
class EditOutput:
    """One rendered prompt."""

    name: str
    prompt: str
    folder: Path
    files: dict[str, str]
    seed: int
    checkpoint: str
    inversion: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "folder": str(self.folder),
                "files": self.files, "seed": self.seed, "checkpoint": self.checkpoint,
                "inversion": self.inversion}


@dataclass
class EditResult:
    project: Path
    edits: list[EditOutput]
    seconds: float
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {"project": str(self.project), "edits": [e.to_dict() for e in self.edits],
                "seconds": round(self.seconds, 3), "device": self.device}


def slug(text: str, limit: int = 48) -> str:
    """A folder name from a prompt: lower case, words joined by dashes."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "edit"


def unique_names(project: Project, prompts: Sequence[str], name: str | None) -> list[str]:
    """Edit folder names: `--name` (numbered for several prompts) or prompt slugs, never one
    that exists already."""
    taken = {p.name for p in (project.root / EDITS_DIR).glob("*")}
    names = []
    for index, prompt in enumerate(prompts):
        base = slug(name if name else prompt)
        if name and len(prompts) > 1:
            base = f"{base}-{index + 1}"
        candidate, number = base, 2
        while candidate in taken:
            candidate, number = f"{base}-{number}", number + 1
        taken.add(candidate)
        names.append(candidate)
    return names


def edit(project_dir: Path, prompts: Sequence[str], settings: EditSettings | None = None, *,
         name: str | None = None, reporter: Reporter | None = None) -> EditResult:
    """Render each prompt from the project's latest (or chosen) checkpoint."""
    from accelerate import PartialState

    settings = settings or EditSettings()
    reporter = reporter or Reporter()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise BadInputError("edit needs at least one prompt.",
                            'Add --prompt "..." or --prompts-file FILE.')
    started = time.monotonic()
    state = PartialState(cpu=not torch.cuda.is_available())
    project = Project.open(Path(project_dir))
    checkpoint = find_checkpoint(project, settings.checkpoint)
    names = unique_names(project, prompts, name)
    try:
        if state.is_main_process:
            with project.lock("edit"):
                outputs = _render(project, checkpoint, list(zip(prompts, names, strict=True)),
                                  settings, state, reporter)
        else:
            outputs = _render(project, checkpoint, list(zip(prompts, names, strict=True)),
                              settings, state, reporter)
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(
            "Editing ran out of GPU memory.",
            "Try --batch 1, fewer frames (vedit extract --frames) or a smaller --size.") from None
    return EditResult(project.root, outputs, time.monotonic() - started, str(state.device))


def _render(project: Project, checkpoint: Checkpoint, jobs: list[tuple[str, str]],
            settings: EditSettings, state: Any, reporter: Reporter) -> list[EditOutput]:
    components = load_components(checkpoint.record["base_model"], device=state.device,
                                 reporter=reporter)
    unet = tuned_unet(checkpoint, components.unet, components.fingerprint)
    with state.main_process_first():
        latents = frame_latents(project, components.vae, components.fingerprint, reporter)
        inversion = _inversion(project, checkpoint, components, unet, latents.mean, settings,
                               reporter) if settings.inversion else None
    outputs = []
    with state.split_between_processes(jobs) as mine:
        for start in range(0, len(mine), settings.batch):
            batch = mine[start:start + settings.batch]
            frames = _sample_and_decode(components, unet, latents.mean.shape, inversion,
                                        [p for p, _ in batch], settings, reporter)
            for (prompt, edit_name), video in zip(batch, frames, strict=True):
                outputs.append(write_edit(project, edit_name, prompt, video, checkpoint,
                                          inversion, settings))
    return _gather(outputs, state)


def _gather(outputs: list[EditOutput], state: Any) -> list[EditOutput]:
    if state.num_processes == 1:
        return outputs
    from accelerate.utils import gather_object

    return list(gather_object(outputs))


def _inversion(project: Project, checkpoint: Checkpoint, components: Components, unet: Any,
               latents: torch.Tensor, settings: EditSettings, reporter: Reporter) -> Inversion:
    prompt = checkpoint.record["settings"]["prompt"] if settings.inversion_prompt else ""
    key = inversion_key(checkpoint, latents_key(project, components.fingerprint),
                        settings.steps, prompt, components.scheduler.config)

    def compute() -> torch.Tensor:
        embeds = encode_prompts(components, [prompt], reporter)
        return ddim_invert(unet, components.scheduler.config, latents, embeds, settings.steps,
                           reporter)

    return cached_inversion(project, key, compute, reporter)


def _start_noise(shape: torch.Size, inversion: Inversion | None, count: int, seed: int,
                 device: torch.device) -> torch.Tensor:
    """Each prompt starts from the inverted noise, or (with --no-inversion) seeded noise."""
    if inversion is not None:
        return inversion.noise.to(device).expand(count, *shape[1:]).clone()
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn((count, *shape[1:]), generator=generator, device=device)


@torch.no_grad()
def ddim_sample(unet: Any, scheduler: Any, noise: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, guidance: float, steps: int,
                reporter: Reporter | None = None, label: str = "sampling") -> torch.Tensor:
    """DDIM from `noise` `(b, c, f, h, w)` with classifier-free guidance (one batched call for
    the unconditional and conditional halves; guidance 1 needs only the conditional one)."""
    reporter = reporter or Reporter()
    scheduler.set_timesteps(steps, device=noise.device)
    sample = noise.float()
    with reporter.task(label, total=len(scheduler.timesteps)) as task:
        for timestep in scheduler.timesteps:
            if guidance == 1.0:
                model_output = predict(unet, sample, timestep, cond)
            else:
                both = predict(unet, torch.cat([sample, sample]), timestep,
                               torch.cat([uncond, cond]))
                unconditional, conditional = both.chunk(2)
                model_output = unconditional + guidance * (conditional - unconditional)
            sample = scheduler.step(model_output, timestep, sample).prev_sample
            task.advance()
    return sample


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, slice_size: int = DECODE_SLICE,
                   reporter: Reporter | None = None) -> np.ndarray:
    """Latents `(c, f, h, w)` to RGB frames `(f, H, W, 3)` uint8, a slice of frames at a time."""
    reporter = reporter or Reporter()
    if next(vae.parameters()).dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.to(torch.float32)  # as diffusers' pipelines: this VAE overflows in fp16
    weight = next(vae.parameters())
    frames = rearrange(latents, "c f h w -> f c h w") / vae.config.scaling_factor
    images = []
    with reporter.task("decoding", total=len(frames)) as task:
        for start in range(0, len(frames), slice_size):
            chunk = frames[start:start + slice_size].to(weight.device, weight.dtype)
            image = vae.decode(chunk).sample.float()
            images.append(((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            task.advance(len(chunk))
    return rearrange(torch.cat(images), "f c h w -> f h w c").numpy()


def _sample_and_decode(components: Components, unet: Any, shape: torch.Size,
                       inversion: Inversion | None, prompts: list[str], settings: EditSettings,
                       reporter: Reporter) -> list[np.ndarray]:
    device = components.device
    cond = encode_prompts(components, prompts, reporter)
    uncond = encode_prompts(components, [settings.negative_prompt] * len(prompts), reporter)
    noise = _start_noise(shape, inversion, len(prompts), settings.seed, device)
    label = f"sampling {prompts[0][:40]!r}" + (f" (+{len(prompts) - 1})" if len(prompts) > 1
                                                else "")
    latents = ddim_sample(unet, components.scheduler, noise, cond, uncond, settings.guidance,
                          settings.steps, reporter, label)
    return [decode_latents(components.vae, clip, reporter=reporter) for clip in latents]


def write_edit(project: Project, name: str, prompt: str, frames: np.ndarray,
               checkpoint: Checkpoint, inversion: Inversion | None,
               settings: EditSettings) -> EditOutput:
    """Write `edits/NAME/` whole (a folder that exists is complete)."""
    record = project.require("frames", "extract")
    times, interval = list(record["times"]), float(record["interval"])
    folder = project.root / EDITS_DIR / name
    files = {"video": "video.mp4", "compare": "compare.mp4", "settings": "edit.toml"}
    with atomic_dir(folder) as staging:
        write_mp4(staging / "video.mp4", list(frames), times, interval)
        sources = [np.asarray(Image.open(p).convert("RGB")) for p in frame_paths(project)]
        write_mp4(staging / "compare.mp4", side_by_side(sources, list(frames), prompt), times,
                  interval)
        if "gif" in settings.format_list:
            write_gif(staging / "video.gif", list(frames), interval)
            files["gif"] = "video.gif"
        if "frames" in settings.format_list:
            (staging / "frames").mkdir()
            for index, frame in enumerate(frames):
                Image.fromarray(frame).save(staging / "frames" / f"{index:05d}.png")
            files["frames"] = "frames"
        inversion_facts = inversion.to_dict() if inversion else None
        (staging / "edit.toml").write_text(tomlio.dumps({
            "prompt": prompt, "checkpoint": checkpoint.name, "settings": as_record(settings),
            "inversion": inversion_facts, "frames": len(frames), "vedit": __version__,
        }), encoding="utf-8")
    return EditOutput(name, prompt, folder, {k: str(folder / v) for k, v in files.items()},
                      settings.seed, checkpoint.name, inversion_facts)


def side_by_side(sources: Sequence[np.ndarray], edits: Sequence[np.ndarray],
                 caption: str) -> list[np.ndarray]:
    """Source | edit, with the prompt written under them."""
    height, width = edits[0].shape[:2]
    bar = _caption_bar(caption, 2 * width, max(16, height // 8))
    joined = []
    for source, edited in zip(sources, edits, strict=True):
        if source.shape != edited.shape:
            source = np.asarray(Image.fromarray(source).resize((width, height)))
        joined.append(np.concatenate([np.concatenate([source, edited], axis=1), bar]))
    return joined


def _caption_bar(text: str, width: int, height: int) -> np.ndarray:
    height += height % 2
    bar = Image.new("RGB", (width, height), (16, 16, 16))
    draw = ImageDraw.Draw(bar)
    font = ImageFont.load_default(size=max(8, height * 3 // 5))
    shown = text
    while len(shown) > 1 and draw.textlength(shown, font=font) > width - 8:
        text = text[:-1]
        shown = text.rstrip() + "…"
    draw.text((4, height // 2), shown, fill=(235, 235, 235), font=font, anchor="lm")
    return np.asarray(bar)
