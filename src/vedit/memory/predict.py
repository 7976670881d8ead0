"""Predicted GPU memory of `vedit tune` and `vedit edit`, from a model's configs alone.

Each prediction traces the functions the stage itself runs, on a simulated GPU (trace.py), with
the base model built from its configs (no weights are read, so a folder from `vedit
fetch-models --configs-only` will do):

- tune, in `tune._prepare`'s order: the three models loaded in the frozen dtype, the clip
  encoded by `latents.encode_frames` (when its latents are not cached yet), the prompt by
  `prompts.encode_conditioning`, the VAE and text encoders moved off the GPU, then
  `tune.build_run` and one `tune.train_step` (a batch per accumulated step) with the
  optimizer's state already made, as at every step after the first;
- edit: the models loaded, the UNet inflated with its LoRA adapters as `tuned_unet` makes it,
  two steps of `sampler.ddim_invert` and of `sampler.ddim_sample` (each step is the same, so two
  show the steady state), and `edit.decoded_slices` over the clip.

The peak is the caching allocator's (allocator.py) over the whole trace, where the section it
fell in is named; `fits` replays the trace on the device's memory, releasing cached blocks
when it runs short, as PyTorch does. When it does not fit, `advise_*` searches for settings
that do: the peak grows about linearly with frames and with pixels, so two traces give an
estimate and one more checks it.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

from vedit.memory.accelerator import prime_optimizer
from vedit.memory.gpu import GIB, Gpu
from vedit.memory.trace import Simulation, Trace, simulated_gpu
from vedit.model_files import ModelSource, read_json
from vedit.models import Components, frames_for_base, native_resolution, resolve_model
from vedit.sampler import ddim_scheduler
from vedit.settings import EditSettings, ExtractSettings, TuneSettings, parse_targets

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from vedit.conditioning import Conditioning
    from vedit.latents import FrameLatents

_CUDA = torch.device("cuda")
#: Inversion and sampling steps traced: every step is the same, two show the steady state.
TRACED_STEPS = 2
_SIDE_STEP = 64  # the size advice moves the short side in steps the UNet takes whole


@dataclass(frozen=True)
class TunePlan:
    """A `vedit tune` run to predict: base model, frames, their size and the settings."""

    model: ModelSource
    frames: int
    height: int
    width: int
    settings: TuneSettings
    encodes_frames: bool = True  # False when the project has the clip's latents cached

    @property
    def gradient_checkpointing(self) -> bool:
        """As tune decides it on a GPU: on unless turned off."""
        return self.settings.gradient_checkpointing is not False

    def with_(self, **changes: Any) -> TunePlan:
        settings = {k: changes.pop(k) for k in list(changes) if k == "gradient_checkpointing"}
        return dataclasses.replace(self, **changes,
                                   settings=dataclasses.replace(self.settings, **settings))


@dataclass(frozen=True)
class EditPlan:
    """A `vedit edit` run to predict; `frames` is what the UNet sees at once (the window with
    --full); `rank` and `lora_targets` are the checkpoint's."""

    model: ModelSource
    frames: int
    height: int
    width: int
    settings: EditSettings
    rank: int
    lora_targets: tuple[str, ...]

    def with_(self, **changes: Any) -> EditPlan:
        batch = changes.pop("batch", None)
        settings = self.settings if batch is None else dataclasses.replace(self.settings,
                                                                           batch=batch)
        return dataclasses.replace(self, **changes, settings=settings)


@dataclass(frozen=True)
class Advice:
    """A change of settings that fits, with its predicted peak."""

    change: str
    peak_bytes: int

    @property
    def peak_gb(self) -> float:
        return _gb(self.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "predicted_peak_gb": self.peak_gb}


@dataclass(frozen=True)
class MemoryPrediction:
    """The predicted peaks of a run on `gpu`, whether it fits there, and what would."""

    peak_bytes: int
    reserved_bytes: int
    peak_during: str
    gpu: Gpu
    fits: bool | None
    advice: tuple[Advice, ...] = ()

    @property
    def peak_gb(self) -> float:
        return _gb(self.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        memory = self.gpu.total_bytes
        return {"predicted_peak_gb": self.peak_gb,
                "predicted_reserved_gb": _gb(self.reserved_bytes),
                "device_memory_gb": _gb(memory) if memory else None, "fits": self.fits,
                "advice": [a.to_dict() for a in self.advice], "gpu": self.gpu.describe(),
                "peak_during": self.peak_during}

    def summary(self) -> str:
        """One line for people: the peak, where it falls, and whether it fits."""
        text = (f"Predicted peak GPU memory: {self.peak_gb:.1f} GB "
                f"({_gb(self.reserved_bytes):.1f} GB reserved), during {self.peak_during}")
        if self.fits is None:
            return text + "; give --gpu-memory GB to check it against a card."
        verdict = "fits" if self.fits else "does not fit"
        return text + f"; {verdict} {self.gpu.describe()}."


def _gb(nbytes: int) -> float:
    return round(nbytes / GIB, 2)


def predict(trace: Trace, gpu: Gpu) -> MemoryPrediction:
    """The peaks of a trace, and whether it fits `gpu` (None when its memory is unknown)."""
    unlimited = trace.replay()
    usable = gpu.usable_bytes
    fits = None if usable is None else trace.replay(usable).fits
    return MemoryPrediction(unlimited.peak_allocated, unlimited.peak_reserved,
                            trace.section_at(unlimited.peak_at), gpu, fits)


def measured_against_predicted(measured_gb: float, predict_run: Callable[[], MemoryPrediction]
                               ) -> dict[str, float] | None:
    """A real run's measured peak next to the prediction for it: the model's error on this GPU
    (None when the prediction cannot be made: a finished run must not fail for it)."""
    prediction = prediction_or_none(predict_run)
    if prediction is None:
        return None
    predicted = prediction.peak_gb
    return {"measured_peak_gb": measured_gb, "predicted_peak_gb": predicted,
            "error_percent": round(100 * (predicted - measured_gb) / measured_gb, 1)}


def out_of_memory_hint(predict_run: Callable[[], MemoryPrediction], fallback: str) -> str:
    """The hint of an out-of-memory error: the predicted peak and the settings that fit
    (`fallback` when the prediction cannot be made: the hint must never hide the error)."""
    prediction = prediction_or_none(predict_run)
    if prediction is None:
        return fallback
    text = f"The predicted peak is {prediction.peak_gb:.1f} GB on {prediction.gpu.describe()}."
    if not prediction.advice:
        return f"{text} {fallback}"
    return text + " These fit: " + "; ".join(
        f"{a.change} ({a.peak_gb:.1f} GB)" for a in prediction.advice) + "."


def prediction_or_none(predict_run: Callable[[], MemoryPrediction]) -> MemoryPrediction | None:
    """The prediction, or None where it fails: for what reports a real run, which it must not
    break (a kernel the fake tensors lack, a model folder moved since)."""
    try:
        return predict_run()
    except Exception:  # noqa: BLE001 - any failure of it: the run's own result comes first
        return None


# --- the models, from their configs ---------------------------------------------------------


def _build_components(source: ModelSource, dtype: torch.dtype) -> Components:
    """What `models.load_components` returns, built from the configs (no weights read), frozen,
    in `dtype`, on the device of the mode in force (fake tensors inside a simulation)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = str(source.path)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(folder, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    sdxl = source.family == "sdxl"
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")) if sdxl else None
    for module in (unet, vae, text_encoder, text_encoder_2):
        # nn.Module.to: diffusers' own `to` warns about models built without a torch_dtype.
        if module is not None:
            torch.nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    scheduler = ddim_scheduler(source.path)
    tokenizers = {name: CLIPTokenizer.from_pretrained(folder, subfolder=name,
                                                      local_files_only=True)
                  for name in ("tokenizer", "tokenizer_2")[:1 + sdxl]}
    index = read_json(source.path / "model_index.json")
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizers["tokenizer"],
        scheduler=scheduler, source=source, device=torch.device("cuda"), dtype=dtype,
        prediction_type=scheduler.config.prediction_type,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        native_resolution=native_resolution(source), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizers.get("tokenizer_2"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))


def _time_ids(components: Components, height: int, width: int) -> torch.Tensor | None:
    """An SDXL base's size ids of frames `height` x `width` (their values change no memory)."""
    if components.text_encoder_2 is None:
        return None
    from vedit.sdxl import add_time_ids

    return add_time_ids((height, width), (0, 0), (height, width))


def _latent_shape(components: Components, frames: int, height: int, width: int
                  ) -> tuple[int, ...]:
    factor = components.vae_scale_factor
    return (1, components.unet.config.in_channels, frames, height // factor, width // factor)


# --- tune -----------------------------------------------------------------------------------


def trace_tune(plan: TunePlan, gpu: Gpu) -> Trace:
    """Trace a `vedit tune` run of `plan` on `gpu` (see the module docstring)."""
    from vedit.tune import build_run, mixed_precision_for, train_step, weight_dtype

    settings = dataclasses.replace(plan.settings,
                                   gradient_checkpointing=plan.gradient_checkpointing)
    precision = mixed_precision_for(settings.mixed_precision, _CUDA, bf16=gpu.bf16)
    with simulated_gpu(gpu) as sim:
        unet, scheduler, latents, embeds = _tune_inputs(plan, weight_dtype(precision), sim)
        gc.collect()  # the VAE and text encoders are gone: tune moves them to the CPU now
        accelerator = sim.accelerator(precision, settings.grad_accum)
        with sim.trace.section("preparing the training"):
            run = build_run(unet, scheduler, scheduler.config.prediction_type, latents,
                            embeds.states, settings, accelerator, added=embeds.added,
                            fused=True)
        with sim.untraced():
            prime_optimizer(run.optimizer)
        with sim.trace.section("the training step"):
            for _ in range(settings.grad_accum):
                train_step(run)
    return sim.trace


def _tune_inputs(plan: TunePlan, dtype: torch.dtype, sim: Simulation
                 ) -> tuple[UNet2DConditionModel, Any, FrameLatents, Conditioning]:
    """`tune._prepare` up to `build_run`: the models loaded, the clip's latents (encoded by
    `latents.encode_frames` unless cached) and the prompt's embeddings; only the UNet is kept."""
    from vedit.latents import FrameLatents, encode_frames
    from vedit.prompts import encode_conditioning

    # The clip's frames and cached latents live on the CPU: real tensors, not counted.
    pixels = torch.zeros(plan.frames, 3, plan.height, plan.width) if plan.encodes_frames else None
    with sim.untraced():
        components = _build_components(plan.model, dtype)
    shape = _latent_shape(components, plan.frames, plan.height, plan.width)
    if pixels is None:
        mean = std = torch.zeros(shape)
    else:
        with sim.trace.section("encoding the frames"):
            mean, std = (rearrange(t, "f c h w -> 1 c f h w").contiguous()
                         for t in encode_frames(components.vae, pixels))
    latents = FrameLatents(mean, std, "traced", Path("latents"), reused=pixels is None)
    with sim.trace.section("encoding the prompt"):
        embeds = encode_conditioning(components, [plan.settings.prompt or "a video"],
                                     _time_ids(components, plan.height, plan.width))
    return components.unet, components.scheduler, latents, embeds


def predict_tune(plan: TunePlan, gpu: Gpu, *, advise: bool = True) -> MemoryPrediction:
    """The predicted peak of `plan` on `gpu`; with `advise`, settings that fit when it does not."""
    prediction = predict(trace_tune(plan, gpu), gpu)
    if advise and prediction.fits is False:
        prediction = dataclasses.replace(prediction, advice=advise_tune(plan, gpu, prediction))
    return prediction


def advise_tune(plan: TunePlan, gpu: Gpu, prediction: MemoryPrediction) -> tuple[Advice, ...]:
    """Settings near `plan` that fit `gpu`: checkpointing, the most frames at this size, the
    largest size at these frames."""
    advice = []
    if not plan.gradient_checkpointing:
        checkpointed = plan.with_(gradient_checkpointing=True)
        on = predict_tune(checkpointed, gpu, advise=False)
        if on.fits:
            return (Advice("--gradient-checkpointing", on.peak_bytes),)
        plan, prediction = checkpointed, on
        advice_note = " --gradient-checkpointing"
    else:
        advice_note = ""

    def tune_at(frames: int, side: int) -> MemoryPrediction:
        return predict_tune(_resized(plan, side).with_(frames=frames), gpu, advise=False)

    side = min(plan.height, plan.width)
    found = _largest(lambda f: tune_at(f, side), plan.frames, prediction, gpu)
    if found is not None:
        advice.append(Advice(f"--frames {found[0]}{advice_note} (at {plan.width}x{plan.height})",
                             found[1]))
    found = _largest_side(lambda s: tune_at(plan.frames, s), side, prediction, gpu)
    if found is not None:
        advice.append(Advice(f"--size {found[0]}{advice_note} (at {plan.frames} frames)",
                             found[1]))
    return tuple(advice)


# --- edit -----------------------------------------------------------------------------------


def trace_edit(plan: EditPlan, gpu: Gpu) -> Trace:
    """Trace a `vedit edit` run of `plan` on `gpu` (see the module docstring)."""
    from vedit.edit import decoded_slices
    from vedit.inflate import inflate_unet
    from vedit.lora import add_lora
    from vedit.prompts import encode_conditioning, negative_conditioning
    from vedit.sampler import ddim_invert, ddim_sample
    from vedit.tune import mixed_precision_for, weight_dtype
    from vedit.windows import single_window

    settings = plan.settings
    dtype = weight_dtype(mixed_precision_for("auto", _CUDA, bf16=gpu.bf16))
    steps = min(settings.steps, TRACED_STEPS)
    window = single_window(plan.frames)
    with simulated_gpu(gpu) as sim:
        with sim.untraced():
            components = _build_components(plan.model, dtype)
            unet = inflate_unet(components.unet)  # as checkpoints.tuned_unet makes it
            add_lora(unet, rank=plan.rank, targets=plan.lora_targets)
            unet = unet.to(dtype=dtype).eval().requires_grad_(False)
        # The clip's latents and noise stay on the CPU, as edit keeps them: real tensors.
        latents = torch.zeros(_latent_shape(components, plan.frames, plan.height, plan.width))
        time_ids = _time_ids(components, plan.height, plan.width)
        if settings.inversion:
            with sim.trace.section("the inversion"):
                embeds = encode_conditioning(components, [""], time_ids)
                noise = ddim_invert(unet, components.scheduler, latents, embeds, steps,
                                    plan=window)
        else:
            noise = latents
        with sim.trace.section("sampling"):
            cond = encode_conditioning(components, ["a video"] * settings.batch, time_ids)
            uncond = negative_conditioning(components, settings.negative_prompt,
                                           time_ids).expand(settings.batch)
            start = noise.expand(settings.batch, *noise.shape[1:]).clone()
            sample = ddim_sample(unet, components.scheduler, start, cond, uncond,
                                 settings.guidance, steps, plan=window)
        with sim.trace.section("decoding"):
            for _ in decoded_slices(components.vae, sample[0]):
                pass
    return sim.trace


def predict_edit(plan: EditPlan, gpu: Gpu, *, advise: bool = True) -> MemoryPrediction:
    """The predicted peak of `plan` on `gpu`; with `advise`, settings that fit when it does not."""
    prediction = predict(trace_edit(plan, gpu), gpu)
    if advise and prediction.fits is False:
        prediction = dataclasses.replace(prediction, advice=advise_edit(plan, gpu, prediction))
    return prediction


def advise_edit(plan: EditPlan, gpu: Gpu, prediction: MemoryPrediction) -> tuple[Advice, ...]:
    """Settings near `plan` that fit `gpu`: one prompt at a time, the largest window (--full)
    or frame count, the largest size."""
    if plan.settings.batch > 1:
        single = predict_edit(plan.with_(batch=1), gpu, advise=False)
        if single.fits:
            return (Advice("--batch 1", single.peak_bytes),)
        plan, prediction = plan.with_(batch=1), single

    def edit_at(frames: int, side: int) -> MemoryPrediction:
        return predict_edit(_resized(plan, side).with_(frames=frames), gpu, advise=False)

    side = min(plan.height, plan.width)
    advice = []
    found = _largest(lambda f: edit_at(f, side), plan.frames, prediction, gpu)
    if found is not None:
        option = "--window" if plan.settings.full else "--frames"
        advice.append(Advice(f"{option} {found[0]} (at {plan.width}x{plan.height})", found[1]))
    if not plan.settings.full:
        found = _largest_side(lambda s: edit_at(plan.frames, s), side, prediction, gpu)
        if found is not None:
            advice.append(Advice(f"--size {found[0]} (at {plan.frames} frames)", found[1]))
    return tuple(advice)


# --- the search -----------------------------------------------------------------------------


def _resized(plan: Any, side: int) -> Any:
    """`plan` with its short side `side`, the aspect kept (sides rounded to multiples of 8)."""
    short = min(plan.height, plan.width)
    if side == short:
        return plan
    height, width = (round(s * side / short / 8) * 8 for s in (plan.height, plan.width))
    return plan.with_(height=height, width=width)


def _largest(predict_at: Callable[[int], MemoryPrediction], value: int,
             at_value: MemoryPrediction, gpu: Gpu, *, step: int = 1,
             checks: int = 3) -> tuple[int, int] | None:
    """The largest setting below `value` (in `step`s) found to fit in `checks` traces, and its
    peak: halving until one fits, then between the largest that fits and the smallest that does
    not, where the reserved memory meets the device's (it grows about linearly), else halfway."""
    usable = gpu.usable_bytes
    if usable is None:
        return None
    high, at_high = value, at_value
    low: int | None = None
    at_low = at_value
    for _ in range(checks):
        if low is None:
            candidate = max(step, high // 2 // step * step)
        else:
            span = at_high.reserved_bytes - at_low.reserved_bytes
            guess = (low + (usable - at_low.reserved_bytes) * (high - low) / span if span > 0
                     else (low + high) / 2)
            candidate = int(guess) // step * step
            if not low < candidate < high:
                candidate = (low + high) // 2 // step * step
        if not (low or 0) < candidate < high:
            break
        result = predict_at(candidate)
        if result.fits:
            low, at_low = candidate, result
        else:
            high, at_high = candidate, result
    return None if low is None else (low, at_low.peak_bytes)


def _largest_side(predict_at: Callable[[int], MemoryPrediction], side: int,
                  at_side: MemoryPrediction, gpu: Gpu) -> tuple[int, int] | None:
    """The largest short side below `side`, in steps of 64 px, found to fit."""
    return _largest(predict_at, side, at_side, gpu, step=_SIDE_STEP)


# --- the runs a command would make ----------------------------------------------------------


def tune_plan(target: Path, settings: TuneSettings,
              extract_settings: ExtractSettings | None = None) -> TunePlan:
    """The run `vedit tune TARGET` would make, read without writing anything: for a clip, the
    frames extract would take (at the base model's native size unless --size); for a project,
    its frames, and whether their latents for this model are cached."""
    from vedit.extract import plan_frames
    from vedit.latents import LATENTS_VERSION
    from vedit.project import Project, cache_key
    from vedit.video import probe

    source = resolve_model(settings.model, configs_only=True)
    if Path(target).is_dir():
        project = Project.open(Path(target))
        frames = project.require("frames", "extract")
        latents = project.latents_file(cache_key("latents", LATENTS_VERSION, frames["key"],
                                                 source.fingerprint))
        return TunePlan(source, int(frames["count"]), int(frames["height"]),
                        int(frames["width"]), settings, encodes_frames=not latents.is_file())
    chosen = plan_frames(probe(Path(target)),
                         frames_for_base(extract_settings or ExtractSettings(), source))
    return TunePlan(source, len(chosen.indices), chosen.height, chosen.width, settings)


def edit_plan(project_dir: Path, settings: EditSettings, *, prompts: int | None = None
              ) -> EditPlan:
    """The run `vedit edit PROJECT` would make: the chosen checkpoint's base model and LoRA
    (before any tuning: the project's tune settings, else the defaults), the frames the UNet
    sees at once (the window with --full) at the project's frame size, `settings.batch`
    prompts at once (fewer when only `prompts` are given)."""
    if prompts:
        settings = dataclasses.replace(settings, batch=min(settings.batch, prompts))
    from vedit.checkpoints import find_checkpoint, list_checkpoints
    from vedit.project import Project

    project = Project.open(Path(project_dir))
    frames = project.require("frames", "extract")
    if settings.checkpoint is not None or list_checkpoints(project):
        record = find_checkpoint(project, settings.checkpoint).record
    else:
        record = project.section("tune") or {}
    tuned = record.get("settings", {})
    model = record.get("base_model") or tuned.get("model") or TuneSettings.model
    targets = record.get("lora_targets") or parse_targets([tuned.get("lora_targets",
                                                                     TuneSettings.lora_targets)])
    count = int(frames["count"])
    if settings.full:
        count = settings.window or count
    return EditPlan(resolve_model(model, configs_only=True), count, int(frames["height"]),
                    int(frames["width"]), settings, int(tuned.get("rank", TuneSettings.rank)),
                    tuple(targets))
