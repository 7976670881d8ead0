"""The edit stage: render the tuned clip under new prompts.

As a diffusers pipeline, in small named steps: load the tuned model, encode the prompts,
invert the clip's latents (cached, invert.py), sample each prompt with classifier-free
guidance (sampler.py), decode in slices, write `edits/NAME/` (video.mp4, compare.mp4, optional
gif and PNG frames, edit.toml). Under `accelerate launch` the prompts are split across
processes.

The clip is the tuned frames, or with `full` every frame of the source's span at its own
frame rate. Both go through the same code: the tuned frames are one window of all frames,
the span overlapping windows blended at every step (windows.py). The clip's latents and
noise stay on the CPU, in fp16 as stored; only one window at a time visits the GPU.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from vedit import __version__, tomlio
from vedit.checkpoints import Checkpoint, check_frames, find_checkpoint, tuned_unet
from vedit.conditioning import Conditioning
from vedit.errors import BadInputError, OutOfMemoryError, is_out_of_memory
from vedit.inflate import InflatedUNet
from vedit.invert import Inversion, cached_inversion, inversion_key
from vedit.latents import (
    check_finite,
    clip_span,
    frame_latents,
    read_frame,
    span_images,
    span_latents,
    upcast_if_overflowing,
    vae_scale,
    vae_slice,
)
from vedit.memory.gpu import measured_peak_gb
from vedit.models import Components, load_components
from vedit.progress import Reporter
from vedit.project import EDIT_RECORD, EDIT_VIDEO, Project, atomic_dir, frame_file
from vedit.prompts import encode_conditioning, negative_conditioning
from vedit.sampler import Denoiser, ddim_invert, ddim_sample
from vedit.score import Frames, Scorer, VideoScore, video_frames
from vedit.settings import EditSettings, ScoreSettings, as_record, edit_prompts
from vedit.video import Mp4Writer, write_gif
from vedit.windows import (
    ResumeFile,
    WindowPlan,
    plan_windows,
    single_window,
)

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import AutoencoderKL


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
    frames: int
    full: dict[str, Any] | None = None
    scores: dict[str, float | None] | None = None  # with --score: the means of vedit.score

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "folder": str(self.folder),
                "files": self.files, "seed": self.seed, "checkpoint": self.checkpoint,
                "inversion": self.inversion, "frames": self.frames, "full": self.full,
                "scores": self.scores}


@dataclass(frozen=True)
class EditClip:
    """What an edit renders: the clip's latents, its frames' times, the windows it is denoised
    in, and a way to read its source frames again (for the side-by-side)."""

    latents: torch.Tensor  # (1, c, f, h, w), fp16 as stored, on the CPU
    latents_key: str
    times: list[float]
    interval: float
    plan: WindowPlan
    sources: Callable[[], Iterator[np.ndarray]]
    full: dict[str, Any] | None  # --full's facts; None for the tuned frames
    time_ids: torch.Tensor | None  # an SDXL base's size conditioning of the frames `(1, 6)`

    @property
    def num_frames(self) -> int:
        return len(self.times)


@dataclass(frozen=True)
class EditModels:
    """A checkpoint's models, loaded for editing: the base model's components and the tuned
    UNet. Load them once with `load_edit_models` to run several `edit` calls on them."""

    components: Components
    unet: InflatedUNet
    checkpoint_id: str


@dataclass
class EditResult:
    project: Path
    edits: list[EditOutput]
    seconds: float
    device: str
    peak_memory_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"project": str(self.project), "edits": [e.to_dict() for e in self.edits],
                "seconds": round(self.seconds, 3), "device": self.device,
                "peak_memory_gb": self.peak_memory_gb}


def slug(text: str, limit: int = 48) -> str:
    """A folder name from a prompt: lower case, words joined by dashes."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "edit"


def unique_names(project: Project, prompts: Sequence[str], name: str | None) -> list[str]:
    """Edit folder names: `--name` (numbered for several prompts) or prompt slugs, never one
    that exists already."""
    taken = {p.name for p in project.edits_dir.glob("*")}
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


def load_edit_models(checkpoint: Checkpoint, device: torch.device | str,
                     reporter: Reporter | None = None) -> EditModels:
    """Load the checkpoint's base model on `device` and put the tuned weights in its UNet."""
    components = load_components(checkpoint.record["base_model"], device=device,
                                 reporter=reporter)
    unet = tuned_unet(checkpoint, components.unet, components.fingerprint)
    return EditModels(components, unet, _checkpoint_id(checkpoint))


def _checkpoint_id(checkpoint: Checkpoint) -> str:
    return str(checkpoint.record.get("id", checkpoint.path))


def edit(project_dir: Path, prompts: Sequence[str], settings: EditSettings | None = None, *,
         name: str | None = None, scoring: ScoreSettings | None = None,
         reporter: Reporter | None = None, models: EditModels | None = None) -> EditResult:
    """Render each prompt from the project's latest (or chosen) checkpoint: the tuned frames,
    or with `settings.full` every frame of the clip's span, in windows. With `settings.score`
    each edit is scored (with the models of `scoring`) as it is written. `models`, from
    `load_edit_models` for that checkpoint, are used as they are instead of loading them."""
    from accelerate import PartialState

    settings = settings or EditSettings()
    reporter = reporter or Reporter()
    prompts = edit_prompts(prompts)
    if settings.negative_prompt and settings.guidance <= 1:
        reporter.info(f"--negative-prompt has no effect at --guidance {settings.guidance:g}: "
                      "only a guidance above 1 uses it.")
    started = time.monotonic()
    state = PartialState(cpu=not torch.cuda.is_available())
    project = Project.open(Path(project_dir))
    checkpoint = find_checkpoint(project, settings.checkpoint, reporter)
    check_frames(checkpoint, project.require("frames", "extract")["key"])
    if models is not None and models.checkpoint_id != _checkpoint_id(checkpoint):
        raise BadInputError(f"The models given were loaded for another checkpoint than "
                            f"{checkpoint.name} of {project.root}.",
                            "Load them with load_edit_models for this checkpoint.")
    names = unique_names(project, prompts, name)
    jobs = list(zip(prompts, names, strict=True))
    try:
        if state.is_main_process:
            with project.lock("edit"):
                outputs = _render(project, checkpoint, jobs, settings, state, scoring, reporter,
                                  models)
        else:
            outputs = _render(project, checkpoint, jobs, settings, state, scoring, reporter,
                              models)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        fallback = ("Try a smaller --window (or --batch 1)." if settings.full else
                    "Try --batch 1, fewer frames (vedit extract --frames) or a smaller --size.")
        if not isinstance(exc, torch.OutOfMemoryError):  # the CPU's allocator: nothing to predict
            raise OutOfMemoryError("Editing ran out of CPU memory.", fallback) from None
        from vedit.memory.gpu import target_gpu
        from vedit.memory.predict import edit_plan, out_of_memory_hint, predict_edit

        hint = out_of_memory_hint(
            lambda: predict_edit(edit_plan(project.root, settings, prompts=len(prompts)),
                                 target_gpu()), fallback)
        raise OutOfMemoryError("Editing ran out of GPU memory.", hint) from None
    return EditResult(project.root, outputs, time.monotonic() - started, str(state.device),
                      measured_peak_gb(state.device))


def _render(project: Project, checkpoint: Checkpoint, jobs: list[tuple[str, str]],
            settings: EditSettings, state: PartialState, scoring: ScoreSettings | None,
            reporter: Reporter, models: EditModels | None) -> list[EditOutput]:
    models = models or load_edit_models(checkpoint, state.device, reporter)
    components, unet = models.components, models.unet
    with state.main_process_first():
        clip = (span_clip(project, components, settings, reporter) if settings.full
                else tuned_clip(project, components, reporter))
        inversion = _inversion(project, checkpoint, components, unet, clip, settings,
                               reporter) if settings.inversion else None
    scorer = Scorer(scoring, device=state.device, reporter=reporter) if settings.score else None
    outputs = []
    with state.split_between_processes(jobs) as mine:
        # The negative prompt is encoded once (and warned about once if cut short).
        uncond = negative_conditioning(components, settings.negative_prompt, clip.time_ids,
                                       reporter)
        for start in range(0, len(mine), settings.batch):
            batch = mine[start:start + settings.batch]
            latents = _sample(components, unet, clip, inversion, [p for p, _ in batch], uncond,
                              settings, reporter)
            for (prompt, edit_name), video in zip(batch, latents, strict=True):
                frames = decode_frames(components.vae, video, reporter=reporter)
                outputs.append(write_edit(project, edit_name, prompt, frames, checkpoint,
                                          inversion, settings, clip, scorer))
    return _gather(outputs, state)


def tuned_clip(project: Project, components: Components, reporter: Reporter) -> EditClip:
    """The tuned frames, all in one window. Their latents are rounded to fp16, as a span's are
    stored, so that a span of the same frames gives exactly this edit (the UNet reads fp16 on
    a GPU anyway)."""
    latents = frame_latents(project, components.vae, components.fingerprint, reporter)
    frames = project.require("frames", "extract")
    paths = project.frame_paths()
    return EditClip(
        latents=latents.mean.half().cpu(),
        latents_key=latents.key,
        times=[float(t) for t in frames["times"]], interval=float(frames["interval"]),
        plan=single_window(latents.num_frames),
        sources=lambda: (read_frame(p, frames["width"], frames["height"]) for p in paths),
        full=None, time_ids=_time_ids(project, components))


def span_clip(project: Project, components: Components, settings: EditSettings,
              reporter: Reporter) -> EditClip:
    """Every frame of the clip's span at the source's rate, in windows of the tuned frame count
    (or `settings.window`) whose frames lie as far apart as the tuned ones (or
    `settings.full_stride`)."""
    span = clip_span(project, reporter)
    frames = project.require("frames", "extract")
    stride = settings.full_stride or tuned_stride(frames["source_indices"])
    plan = plan_windows(span.num_frames, tuned_frames=int(frames["count"]),
                        window=settings.window, overlap=settings.overlap, stride=stride)
    latents = span_latents(project, span, components.vae, components.fingerprint, reporter)
    overlaps = plan.overlaps()
    facts = {"window": plan.window, "overlap": plan.overlap, "stride": plan.stride,
             "windows": len(plan), "overlaps": overlaps, "span_frames": span.num_frames,
             "start": round(span.times[0], 6), "end": round(span.times[-1] + span.interval, 6),
             "fps": float(span.info.fps)}
    how = "one window" if len(plan) == 1 else f"{len(plan)} windows of up to {plan.window} frames"
    if overlaps:
        low, high = min(overlaps), max(overlaps)
        how += f" (overlaps {low}{f' to {high}' if high > low else ''})"
    apart = f", each window's frames {stride} apart as in tuning," if stride > 1 else ""
    reporter.info(f"Editing all {span.num_frames} frames of the clip{apart} in {how}.")
    return EditClip(latents=latents.mean, latents_key=latents.key, times=span.times,
                    interval=span.interval, plan=plan, sources=lambda: span_images(span),
                    full=facts, time_ids=_time_ids(project, components))


def _time_ids(project: Project, components: Components) -> torch.Tensor | None:
    """The frames' size conditioning where the base is SDXL; None for SD 1.x/2.x."""
    if components.text_encoder_2 is None:
        return None
    from vedit.sdxl import project_time_ids

    return project_time_ids(project.record)


def tuned_stride(source_indices: Sequence[int]) -> int:
    """How many source frames apart the tuned frames lie, on average (`--stride`, or what
    `--spread` gave): the spacing the tuned model knows."""
    if len(source_indices) < 2:
        return 1
    return max(1, round((source_indices[-1] - source_indices[0]) / (len(source_indices) - 1)))


def _gather(outputs: list[EditOutput], state: PartialState) -> list[EditOutput]:
    if state.num_processes == 1:
        return outputs
    from accelerate.utils import gather_object

    return list(gather_object(outputs))


def _inversion(project: Project, checkpoint: Checkpoint, components: Components, unet: Denoiser,
               clip: EditClip, settings: EditSettings, reporter: Reporter) -> Inversion:
    prompt = checkpoint.record["settings"]["prompt"] if settings.inversion_prompt else ""
    key = inversion_key(checkpoint, clip.latents_key, settings.steps, prompt,
                        components.scheduler.config, clip.plan)

    def compute(resume: ResumeFile) -> torch.Tensor:
        embeds = encode_conditioning(components, [prompt], clip.time_ids, reporter)
        return ddim_invert(unet, components.scheduler, clip.latents.float(), embeds,
                           settings.steps, reporter, plan=clip.plan, resume=resume)

    return cached_inversion(project, key, compute, clip.latents.shape, reporter)


def _start_noise(shape: torch.Size, inversion: Inversion | None, count: int,
                 seed: int) -> torch.Tensor:
    """Each prompt starts from the inverted noise, or (with --no-inversion) noise seeded on the
    CPU: the same seed gives the same noise on every device, and a whole clip's noise never
    sits on the GPU."""
    if inversion is not None:
        return inversion.noise.float().expand(count, *shape[1:]).clone()
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *shape[1:]), generator=generator)


def decode_frames(vae: AutoencoderKL, latents: torch.Tensor, slice_size: int | None = None,
                  reporter: Reporter | None = None) -> Iterator[np.ndarray]:
    """Latents `(c, f, h, w)` to RGB frames `(H, W, 3)` uint8, one at a time, the VAE decoding a
    slice of frames at once (`vae_slice` frames unless `slice_size`): memory holds a slice, not
    the clip."""
    for pixels in decoded_slices(vae, latents, slice_size, reporter):
        yield from pixels.numpy()


def decoded_slices(vae: Any, latents: torch.Tensor, slice_size: int | None = None,
                   reporter: Reporter | None = None) -> Iterator[torch.Tensor]:
    """`decode_frames`' work on the device: each slice's frames `(f, H, W, 3)` uint8, on the
    CPU (the memory prediction traces this)."""
    reporter = reporter or Reporter()
    upcast_if_overflowing(vae)
    weight = next(vae.parameters())
    check_finite(latents, "Sampling gave latents with")
    frames = rearrange(latents, "c f h w -> f c h w") / vae.config.scaling_factor
    factor = vae_scale(vae)
    slice_size = slice_size or vae_slice(vae, frames.shape[-2] * factor, frames.shape[-1] * factor)
    with reporter.task("decoding", total=len(frames)) as task:
        for start in range(0, len(frames), slice_size):
            chunk = frames[start:start + slice_size].to(weight.device, weight.dtype)
            with torch.no_grad():
                image = vae.decode(chunk).sample.float()
            check_finite(image, "The VAE decoded the latents to", weight.dtype)
            pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            yield rearrange(pixels, "f c h w -> f h w c")
            task.advance(len(chunk))


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, slice_size: int | None = None,
                   reporter: Reporter | None = None) -> np.ndarray:
    """All frames of `decode_frames` as one array `(f, H, W, 3)`."""
    return np.stack(list(decode_frames(vae, latents, slice_size, reporter)))


def _sample(components: Components, unet: Denoiser, clip: EditClip, inversion: Inversion | None,
            prompts: list[str], uncond: Conditioning, settings: EditSettings,
            reporter: Reporter) -> torch.Tensor:
    """The edited latents `(b, c, f, h, w)` of a batch of prompts, on the CPU; `uncond` is the
    negative prompt's conditioning, the same for every prompt."""
    cond = encode_conditioning(components, prompts, clip.time_ids, reporter)
    uncond = uncond.expand(len(prompts))
    noise = _start_noise(clip.latents.shape, inversion, len(prompts), settings.seed)
    label = f"sampling {prompts[0][:40]!r}" + (f" (+{len(prompts) - 1})" if len(prompts) > 1
                                                else "")
    return ddim_sample(unet, components.scheduler, noise, cond, uncond, settings.guidance,
                       settings.steps, reporter, label, plan=clip.plan)


def write_edit(project: Project, name: str, prompt: str, frames: Iterable[np.ndarray],
               checkpoint: Checkpoint, inversion: Inversion | None, settings: EditSettings,
               clip: EditClip, scorer: Scorer | None = None) -> EditOutput:
    """Write `edits/NAME/` whole (a folder that exists is complete), streaming `frames` into
    every output at once, so a long clip never waits whole in memory. A `scorer` scores the
    written video (as `vedit score` would read it) before edit.toml records it."""
    folder = project.edit_dir(name)
    files = {"video": EDIT_VIDEO, "compare": "compare.mp4", "settings": EDIT_RECORD}
    wanted = settings.format_list
    gif_frames: list[np.ndarray] = []
    count = 0
    with atomic_dir(folder) as staging:
        if "frames" in wanted:
            (staging / "frames").mkdir()
            files["frames"] = "frames"
        with Mp4Writer(staging / EDIT_VIDEO, clip.times, clip.interval) as video, \
                Mp4Writer(staging / "compare.mp4", clip.times, clip.interval) as compare:
            bar = None
            for source, frame in zip(clip.sources(), frames, strict=True):
                video.add(frame)
                bar = bar if bar is not None else caption_bar(prompt, frame)
                compare.add(side_by_side(source, frame, bar))
                if "frames" in wanted:
                    Image.fromarray(frame).save(staging / "frames" / frame_file(count))
                if "gif" in wanted:
                    gif_frames.append(frame)
                count += 1
        if gif_frames:
            write_gif(staging / "video.gif", gif_frames, clip.interval)
            files["gif"] = "video.gif"
        inversion_facts = inversion.to_dict() if inversion else None
        record = {"prompt": prompt, "checkpoint": checkpoint.name,
                  "settings": as_record(settings), "inversion": inversion_facts,
                  "frames": count, "vedit": __version__}
        if clip.full is not None:
            record["full"] = clip.full
        scores = _score(scorer, staging / EDIT_VIDEO, folder, prompt, clip) if scorer else None
        if scores is not None:
            record["score"] = scores.record()
        (staging / EDIT_RECORD).write_text(tomlio.dumps(record), encoding="utf-8")
    return EditOutput(name, prompt, folder, {k: str(folder / v) for k, v in files.items()},
                      settings.seed, checkpoint.name, inversion_facts, count, clip.full,
                      scores.metrics if scores else None)


def _score(scorer: Scorer, video: Path, folder: Path, prompt: str,
           clip: EditClip) -> VideoScore:
    """Score a written edit against the frames it was made from."""
    source = Frames("the source frames", clip.times, clip.sources)
    return scorer.score(video_frames(video, str(folder / video.name)), source, prompt,
                        name=folder.name)


def side_by_side(source: np.ndarray, edited: np.ndarray, bar: np.ndarray) -> np.ndarray:
    """Source | edit, with the caption bar under them."""
    if source.shape != edited.shape:
        height, width = edited.shape[:2]
        source = np.asarray(Image.fromarray(source).resize((width, height)))
    return np.concatenate([np.concatenate([source, edited], axis=1), bar])


def caption_bar(text: str, frame: np.ndarray) -> np.ndarray:
    """The prompt, written under a side-by-side of two frames like `frame`."""
    height, width = frame.shape[:2]
    return _caption_bar(text, 2 * width, max(16, height // 8))


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
