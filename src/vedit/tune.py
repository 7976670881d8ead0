"""The tune stage: LoRA-tune the inflated UNet on one clip under accelerate.

As Tune-A-Video: the clip's latents are noised at a random timestep, the inflated UNet predicts
the noise (or the velocity, for v-prediction bases) under the clip's prompt, and the mean
squared error trains the temporal attention and, instead of full query projections, LoRA
adapters on them. Unlike it, the clip is encoded by the VAE once (latents.py), the frozen
weights stay in half precision on a GPU, and only the trained weights are checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.nn.functional as F

from vedit import __version__
from vedit.checkpoints import (
    Checkpoint,
    check_base,
    check_frames,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    next_run,
    training_state,
    write_checkpoint,
)
from vedit.errors import (
    BadInputError,
    Interrupted,
    OutOfMemoryError,
    ProjectError,
    is_out_of_memory,
)
from vedit.extract import ExtractResult, extract
from vedit.inflate import InflatedUNet, inflate_unet
from vedit.latents import FrameLatents, frame_latents
from vedit.lora import (
    add_lora,
    lora_state_dict,
    temporal_state_dict,
    trainable_parameters,
)
from vedit.memory.gpu import Gpu, measured_peak_gb, target_gpu
from vedit.model_files import ModelSource
from vedit.models import (
    frames_for_base,
    load_components,
    native_bf16,
    native_resolution,
    resolve_model,
)
from vedit.progress import Reporter
from vedit.project import TUNE_SECTIONS, Project, open_no_follow, write_text_atomic
from vedit.prompts import encode_conditioning
from vedit.settings import ExtractSettings, TuneSettings, as_record
from vedit.video import check_clip

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

MAX_GRAD_NORM = 1.0  # as the original's configs
ADAM_WEIGHT_DECAY = 1e-2
EVAL_DRAWS = 8  # fixed noise/timestep draws on which the loss is reported before and after
_SMOOTHING = 0.9
#: Frames whose short side is over this many times the base model's native one are far from
#: what it was trained on: tune warns, with the run's predicted memory, before the heavy work.
OVERSIZED = 2
#: The section of the record tune writes (a damaged one is simply written anew).


@dataclass
class TuneResult:
    """What a `tune` call did."""

    project: Path
    steps: int
    start_step: int
    checkpoints: list[Path]
    loss_log: Path
    device: str
    mixed_precision: str
    seconds: float
    latents_reused: bool
    run: str = ""
    training_seconds: float = 0.0  # the training steps' own time: no loading, evaluation, saving
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    smoothed_loss: float | None = None
    peak_memory_gb: float | None = None
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        trained = self.steps - self.start_step
        return {
            "project": str(self.project), "run": self.run, "steps": self.steps,
            "start_step": self.start_step,
            "checkpoints": [str(p) for p in self.checkpoints], "loss_log": str(self.loss_log),
            "device": self.device, "mixed_precision": self.mixed_precision,
            "seconds": round(self.seconds, 3),
            "training_seconds": round(self.training_seconds, 3),
            "seconds_per_step": round(self.training_seconds / trained, 4) if trained else None,
            "latents_reused": self.latents_reused,
            "eval_loss_before": self.eval_loss_before, "eval_loss_after": self.eval_loss_after,
            "smoothed_loss": self.smoothed_loss, "peak_memory_gb": self.peak_memory_gb,
            "processes": self.processes,
        }


@dataclass
class TrainingRun:
    """Everything a training step needs, built once by `build_run` (the benchmarks build it on
    random full-size shapes, so they time exactly what `vedit tune` runs)."""

    unet: torch.nn.Module  # the InflatedUNet, as accelerate prepared it (wrapped under DDP)
    scheduler: DDPMScheduler
    prediction_type: str
    latents: FrameLatents
    prompt_embeds: torch.Tensor
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    accelerator: Accelerator
    settings: TuneSettings
    record: dict[str, Any]
    trained: list[torch.nn.Parameter]
    #: The noise generator's state when the current step began: what a checkpoint stores, so
    #: a run resumed from it draws what the uninterrupted run drew, even when the step was cut
    #: short after its draws.
    step_start_rng: torch.Tensor
    step: int = 0  # optimizer steps done
    #: An SDXL base's added conditioning of the clip (`text_embeds`, `time_ids`, batch 1).
    added: Mapping[str, torch.Tensor] | None = None


def mixed_precision_for(setting: str, device: torch.device, bf16: bool | None = None) -> str:
    """`auto`: bf16 where the GPU has it (`bf16`, default: this machine's GPU), else fp16; no
    mixed precision on the CPU."""
    if device.type != "cuda":
        return "no"
    if setting != "auto":
        return setting
    return "bf16" if (native_bf16() if bf16 is None else bf16) else "fp16"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """Frozen weights live in the compute dtype; trained ones stay fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def make_accelerator(settings: TuneSettings) -> Accelerator:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = mixed_precision_for(settings.mixed_precision,
                                    torch.device("cuda" if cuda else "cpu"))
    return Accelerator(mixed_precision=precision, cpu=not cuda,
                       gradient_accumulation_steps=settings.grad_accum)


def tune(project: Project | Path, settings: TuneSettings, *, resume: bool = False,
         reporter: Reporter | None = None) -> TuneResult:
    """Tune the inflated UNet on the project's frames; checkpoints go to
    `checkpoints/RUN/step-N/`, a new run's folder beside the earlier ones (or, with `resume`,
    the latest run's)."""
    return _tune(project, settings, resume, reporter or Reporter(), base=None)


def tune_clip(clip: Path, settings: TuneSettings, frames: ExtractSettings | None = None, *,
              project_dir: Path | None = None, resume: bool = False,
              reporter: Reporter | None = None) -> tuple[ExtractResult, TuneResult]:
    """The one-shot form: extract `clip` into `project_dir` (default: CLIP.vedit beside it),
    at the base model's native size unless `frames.size` says otherwise, then tune it."""
    reporter = reporter or Reporter()
    frames = frames or ExtractSettings()
    check_clip(clip)  # the clip and the prompt first: they are the user's, and cheap to check
    _require_prompt(settings)
    base = resolve_model(settings.model, reporter=reporter)
    if frames.size is not None:
        size = frames.frame_size
        check_frame_size(size.short_side or min(size.width or 0, size.height or 0), base,
                         clip, settings, frames, reporter)
    extracted = extract(clip, project_dir, frames_for_base(frames, base), reporter)
    return extracted, _tune(extracted.project, settings, resume, reporter, base=base)


def check_frame_size(short_side: int, base: ModelSource, target: Path, settings: TuneSettings,
                     frames: ExtractSettings | None, reporter: Reporter,
                     gpu: Gpu | None = None) -> None:
    """Frames over OVERSIZED times the base model's native side: a warning with the predicted
    peak GPU memory of tuning `target` (a clip taken with `frames`, or a project), or an
    OutOfMemoryError where that cannot fit `gpu` (default: this machine's). Frames of a
    sensible size cost nothing: nothing is predicted for them."""
    native = native_resolution(base)
    if short_side <= OVERSIZED * native:
        return
    from vedit.memory.predict import (
        out_of_memory_hint,
        predict_tune,
        prediction_or_none,
        tune_plan,
    )

    on = gpu or target_gpu()
    # The training step only: at such sizes it is the peak (the VAE encodes a tile at a time),
    # and its trace takes as long at any size, where the encode's grows with the tiles.
    with reporter.task("predicting the memory of these frames"):
        prediction = prediction_or_none(lambda: predict_tune(
            tune_plan(target, settings, frames).with_(encodes_frames=False), on))
    what = (f"Frames of {short_side} px on the short side are {short_side / native:.1f}x the "
            f"{native} px that {base.name} was trained at")
    smaller = f"Give --size {native}, the model's own size."
    if prediction is not None and prediction.fits is False:
        raise OutOfMemoryError(
            f"{what}: tuning on them would need a predicted {prediction.peak_gb:.1f} GB of GPU "
            f"memory at its peak, more than {on.describe()} has.",
            out_of_memory_hint(lambda: prediction, smaller))
    memory = ("" if prediction is None else
              f"; on a GPU its training steps would peak at a predicted "
              f"{prediction.peak_gb:.1f} GB"
              + ("" if prediction.fits is None else f", which fits {on.describe()}"))
    reporter.warn(f"{what}: so far above it, Stable Diffusion repeats and breaks up what it "
                  f"draws{memory}. {smaller} `--dry-run` predicts other settings' memory.")


def _tune(project: Project | Path, settings: TuneSettings, resume: bool, reporter: Reporter, *,
          base: ModelSource | None) -> TuneResult:
    """`base`: `settings.model` resolved already (the one-shot form sized the frames by it and
    checked their size before extracting them)."""
    _require_prompt(settings)
    if not isinstance(project, Project):
        project = Project.open(Path(project), replacing=TUNE_SECTIONS)
    frames = project.require("frames", "extract")
    if base is None:
        base = resolve_model(settings.model, reporter=reporter)
        check_frame_size(min(int(frames["width"]), int(frames["height"])), base,
                         project.root, settings, None, reporter)
    accelerator = make_accelerator(settings)
    with _main_process_lock(project, accelerator):
        return _tune_locked(project, settings, resume, accelerator, reporter, base)


def _require_prompt(settings: TuneSettings) -> None:
    if not settings.prompt.strip():
        raise BadInputError("tune needs the prompt that describes the clip.",
                            'Add --prompt "a man is skiing" (what the clip shows).')


@contextmanager
def _main_process_lock(project: Project, accelerator: Accelerator) -> Iterator[None]:
    """Under `accelerate launch`, the main process holds the project lock for all of them."""
    if accelerator.is_main_process:
        with project.lock("tune"):
            yield
    else:
        yield


def _tune_locked(project: Project, settings: TuneSettings, resume: bool, accelerator: Accelerator,
                 reporter: Reporter, base: ModelSource | None) -> TuneResult:
    started = time.monotonic()
    device = accelerator.device
    precision = accelerator.mixed_precision
    checkpoint = _checkpoint_to_resume(project, reporter) if resume else None
    run_name = checkpoint.run if checkpoint is not None else next_run(project)
    if checkpoint is not None and checkpoint.step >= settings.steps:
        return TuneResult(project=project.root, steps=checkpoint.step,
                          start_step=checkpoint.step, checkpoints=[],
                          loss_log=project.loss_log(run_name), device=str(device),
                          mixed_precision=precision, seconds=time.monotonic() - started,
                          latents_reused=False, run=run_name,
                          processes=accelerator.num_processes)
    try:
        run = _prepare(project, settings, accelerator, reporter, checkpoint, base, run_name)
        if checkpoint is not None:
            start_step = _resume_from(checkpoint, run, reporter)
        else:
            start_step = 0
            _announce_new_run(project, run_name, reporter)
        before = _evaluate(run, "before", reporter) if start_step == 0 else None
        written, smoothed, training_seconds = _loop(project, run, start_step, reporter)
        after = _evaluate(run, "after", reporter)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        fallback = ("Try fewer frames (vedit extract --frames), a smaller --size, "
                    "--gradient-checkpointing, or a lower --rank.")
        if not isinstance(exc, torch.OutOfMemoryError):  # the CPU's allocator: nothing to predict
            raise OutOfMemoryError("Tuning ran out of CPU memory.", fallback) from None
        from vedit.memory.predict import out_of_memory_hint, predict_tune, tune_plan

        hint = out_of_memory_hint(
            lambda: predict_tune(tune_plan(project.root, settings), target_gpu()), fallback)
        raise OutOfMemoryError(f"Tuning ran out of GPU memory ({_memory_summary(device)}).",
                               hint) from None
    return TuneResult(
        project=project.root, steps=settings.steps, start_step=start_step,
        checkpoints=written, loss_log=project.loss_log(run_name), device=str(device),
        mixed_precision=precision, seconds=time.monotonic() - started,
        latents_reused=run.latents.reused, run=run_name, training_seconds=training_seconds,
        eval_loss_before=before, eval_loss_after=after, smoothed_loss=smoothed,
        peak_memory_gb=measured_peak_gb(device), processes=accelerator.num_processes)


def _announce_new_run(project: Project, run_name: str, reporter: Reporter) -> None:
    """Say that a new run starts beside the earlier ones, which it leaves as they are."""
    earlier = list(dict.fromkeys(c.run or "checkpoints/step-N" for c in list_checkpoints(project)))
    if earlier:
        reporter.info(f"Starting tuning run {run_name} beside {', '.join(earlier)}, which "
                      "stay as they are (--resume would continue the latest).")


def _prepare(project: Project, settings: TuneSettings, accelerator: Accelerator, reporter: Reporter,
             resuming: Checkpoint | None, base: ModelSource | None, run_name: str) -> TrainingRun:
    """Load the base model, cache the latents and prompt, inflate, add LoRA, build the optimizer.

    A checkpoint to resume is checked against the model and frames before any work is done."""
    dtype = weight_dtype(accelerator.mixed_precision)
    components = load_components(base or settings.model, device=accelerator.device,
                                 dtype=dtype, reporter=reporter)
    frames = project.require("frames", "extract")
    record = {"settings": as_record(settings), "lora_targets": list(settings.targets),
              "base_model": components.model_id, "base_fingerprint": components.fingerprint,
              "prediction_type": components.prediction_type, "frames_key": frames["key"],
              "run": run_name, "vedit": __version__}
    if resuming is not None:
        check_compatible(resuming, record)
    short_side, native = min(frames["width"], frames["height"]), components.native_resolution
    if short_side != native and short_side <= OVERSIZED * native:  # larger: warned of already
        reporter.info(f"The frames are {frames['width']}x{frames['height']}; "
                      f"{components.model_id} was trained at {components.native_resolution} px.")
    with accelerator.main_process_first():
        latents = frame_latents(project, components.vae, components.fingerprint, reporter)
    latents = latents.to(accelerator.device)
    time_ids = None
    if components.text_encoder_2 is not None:
        from vedit.sdxl import project_time_ids

        time_ids = project_time_ids(project.record)
    conditioning = encode_conditioning(components, [settings.prompt], time_ids, reporter)
    for encoder in (components.vae, components.text_encoder, components.text_encoder_2):
        if encoder is not None:
            encoder.to("cpu")
    return build_run(components.unet, components.scheduler, components.prediction_type,
                     latents, conditioning.states, settings, accelerator, record,
                     added=conditioning.added)


def build_run(unet2d: UNet2DConditionModel, scheduler: DDPMScheduler, prediction_type: str,
              latents: FrameLatents, prompt_embeds: torch.Tensor, settings: TuneSettings,
              accelerator: Accelerator, record: dict[str, Any] | None = None, *,
              added: Mapping[str, torch.Tensor] | None = None, fused: bool | None = None,
              inflate: Callable[[UNet2DConditionModel], InflatedUNet] = inflate_unet
              ) -> TrainingRun:
    """Inflate the base UNet, add LoRA, keep the trained weights in fp32 (the frozen rest stays
    in its dtype), set checkpointing, build AdamW (`fused`: default on a GPU) and let
    accelerate prepare it all. `added`: an SDXL base's added conditioning of the clip. `inflate`
    makes the video UNet; the benchmarks pass one that
    leaves it 2D, to price inflation with everything else equal."""
    # The new layers' random initial weights follow --seed, so a run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        unet = inflate(unet2d)
        add_lora(unet, rank=settings.rank, targets=settings.targets)
    trained = trainable_parameters(unet)
    for param in trained:
        param.data = param.data.float()
    gradient_checkpointing = settings.gradient_checkpointing
    if gradient_checkpointing is None:
        gradient_checkpointing = accelerator.device.type == "cuda"
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if fused is None:
        fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(unet, settings), weight_decay=ADAM_WEIGHT_DECAY,
                                  fused=fused)
    prepared, optimizer = accelerator.prepare(unet, optimizer)
    generator = torch.Generator(accelerator.device).manual_seed(
        settings.seed + accelerator.process_index)
    record = (record or {}) | {"gradient_checkpointing": gradient_checkpointing}
    return TrainingRun(prepared, scheduler, prediction_type, latents, prompt_embeds, optimizer,
                       generator, accelerator, settings, record, trained, generator.get_state(),
                       added=added)


def train_step(run: TrainingRun) -> torch.Tensor:
    """One batch: loss, backward, clipping and the optimizer step once gradients are accumulated.
    Returns the (detached) loss.

    The update and the step count that records it happen together or not at all (Ctrl-C and
    SIGTERM wait for them), so a checkpoint saved on an interrupt is always of a whole step."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.unet):
        loss = training_loss(run, run.generator, run.settings.batch)
        accelerator.backward(loss)
        with _interrupts_held():
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(run.trained, MAX_GRAD_NORM)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                run.step += 1
                run.step_start_rng = run.generator.get_state()
    return loss.detach()


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has run, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in previous:
        signal.signal(number, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
    if held:
        raise KeyboardInterrupt


def _param_groups(unet: InflatedUNet, settings: TuneSettings) -> list[dict[str, Any]]:
    lora = [p for n, p in unet.unet.named_parameters() if p.requires_grad and ".lora_" in n]
    temporal = [p for n, p in unet.unet.named_parameters()
                if p.requires_grad and ".attn_temp." in n]
    return [{"params": temporal, "lr": settings.lr}, {"params": lora, "lr": settings.lora_lr}]


def _unwrapped(run: TrainingRun) -> InflatedUNet:
    unet: InflatedUNet = run.accelerator.unwrap_model(run.unet)
    return unet


def noisy_batch(run: TrainingRun, generator: torch.Generator, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents of the clip noised at random timesteps, and the target the UNet should predict."""
    scheduler = run.scheduler
    latents = torch.cat([run.latents.sample(generator) for _ in range(batch)])
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                              generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if run.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, timesteps, target


def training_loss(run: TrainingRun, generator: torch.Generator, batch: int) -> torch.Tensor:
    noisy, timesteps, target = noisy_batch(run, generator, batch)
    prompts = run.prompt_embeds.expand(batch, -1, -1)
    if run.added is None:
        prediction = run.unet(noisy, timesteps, prompts)
    else:
        added = {name: value.expand(batch, -1) for name, value in run.added.items()}
        prediction = run.unet(noisy, timesteps, prompts, added)
    return F.mse_loss(prediction.float(), target.float())


@torch.no_grad()
def fixed_draw_loss(run: TrainingRun, draws: int = EVAL_DRAWS,
                    on_draw: Callable[[], None] | None = None) -> float:
    """The loss on the same noise and timestep draws every time: a number to compare before and
    after tuning (the training loss itself jumps with each step's random timestep). `on_draw`
    is called after each draw, for progress."""
    generator = torch.Generator(run.accelerator.device).manual_seed(1234)
    was_training = run.unet.training
    run.unet.eval()
    losses = []
    with run.accelerator.autocast():
        for _ in range(draws):
            losses.append(training_loss(run, generator, 1).item())
            if on_draw is not None:
                on_draw()
    run.unet.train(was_training)
    return round(sum(losses) / len(losses), 6)


def _evaluate(run: TrainingRun, when: str, reporter: Reporter) -> float | None:
    """The fixed-draw loss as a phase of its own, with progress; None with `--no-eval`."""
    if not run.settings.eval:
        return None
    with reporter.task(f"loss {when} tuning", total=EVAL_DRAWS) as task:
        return fixed_draw_loss(run, on_draw=task.advance)


def _loop(project: Project, run: TrainingRun, start_step: int,
          reporter: Reporter) -> tuple[list[Path], float | None, float]:
    """Train to `settings.steps`; returns the checkpoints written, the smoothed loss and the
    seconds the training steps themselves took."""
    accelerator, settings = run.accelerator, run.settings
    run.step, smoothed, written = start_step, None, []
    log = _LossLog(project.loss_log(run.record["run"]), start_step,
                   accelerator.is_main_process)
    training = 0.0
    try:
        with reporter.task("tuning", total=settings.steps) as task:
            task.update(completed=start_step)
            while run.step < settings.steps:
                tick = time.monotonic()
                loss = train_step(run)
                if not accelerator.sync_gradients:
                    training += time.monotonic() - tick
                    continue
                step = run.step
                value = accelerator.gather(loss).mean().item()
                training += time.monotonic() - tick
                if not math.isfinite(value):
                    raise BadInputError(f"The loss became {value} at step {step}.",
                                        "Lower --lr/--lora-lr, or use --mixed-precision bf16.")
                smoothed = value if smoothed is None else _smooth(smoothed, value)
                log.write(step, value, smoothed)
                rate = (step - start_step) / max(training, 1e-9)
                task.update(completed=step, status=_status(smoothed, rate, accelerator.device))
                if step == settings.steps or (settings.checkpoint_every
                                              and step % settings.checkpoint_every == 0):
                    written.append(save(project, run, step))
    except KeyboardInterrupt:
        if run.step == start_step:
            raise Interrupted(f"Tuning interrupted before step {run.step + 1} was done; nothing "
                              "new was saved, and every checkpoint is as it was.",
                              "Rerun the same command to start again.") from None
        saved = save(project, run, run.step)
        raise Interrupted(f"Tuning interrupted at step {run.step}; saved "
                          f"{saved.relative_to(project.root)}.",
                          f"Continue with `vedit tune {project.root} --resume --steps "
                          f"{settings.steps}`.") from None
    finally:
        log.close()
    return written, smoothed, training


def _smooth(smoothed: float, value: float) -> float:
    return _SMOOTHING * smoothed + (1 - _SMOOTHING) * value


def _status(smoothed: float, rate: float, device: torch.device) -> str:
    memory = measured_peak_gb(device)
    text = f"loss {smoothed:.4f} · {speed_text(rate)}"
    return text + (f" · {memory:.1f} GB" if memory is not None else "")


def speed_text(rate: float) -> str:
    """Steps per second as people read them: `2.31 it/s`, or `50 s/it` below one a second."""
    if rate >= 1:
        return f"{rate:.2f} it/s"
    seconds = 1 / max(rate, 1e-9)
    return f"{seconds:.1f} s/it" if seconds < 10 else f"{seconds:.0f} s/it"


def _logged_step(line: str) -> float:
    """The step of a loss-log line; a line a killed run left half-written counts as none."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return float("inf")


class _LossLog:
    """A run's `tune.jsonl`: one JSON line per step, for plotting; a resume cuts it at its step.
    A new run's log (and so its folder) appears with its first step."""

    def __init__(self, path: Path, start_step: int, enabled: bool) -> None:
        self.path = path
        self.handle: TextIO | None = None
        self.enabled = enabled
        if not enabled:
            return
        if start_step and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _logged_step(line) <= start_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
            self.handle = os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND), "a",
                                    encoding="utf-8")
        else:
            path.unlink(missing_ok=True)  # what a run interrupted before its first step left

    def write(self, step: int, loss: float, smoothed: float) -> None:
        if self.enabled and self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = os.fdopen(open_no_follow(self.path, os.O_WRONLY | os.O_APPEND
                                                   | os.O_CREAT), "a", encoding="utf-8")
        if self.handle is not None:
            self.handle.write(json.dumps({"step": step, "loss": round(loss, 6),
                                          "smoothed": round(smoothed, 6),
                                          "time": round(time.time(), 3)}) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def save(project: Project, run: TrainingRun, step: int) -> Path:
    """Write `checkpoints/RUN/step-N/`, then name it in the project record (main process only;
    the others wait): the record only ever names a checkpoint that is there."""
    folder = project.checkpoint_dir(run.record["run"], step)
    if run.accelerator.is_main_process:
        unet = _unwrapped(run)
        metadata = {"base_model": run.record["base_model"],
                    "base_fingerprint": run.record["base_fingerprint"],
                    "rank": str(run.settings.rank), "lora_alpha": str(run.settings.rank),
                    "lora_targets": ",".join(run.record["lora_targets"]), "step": str(step),
                    "vedit": __version__}
        record = run.record | {"step": step, "id": uuid.uuid4().hex}
        write_checkpoint(folder, record, lora_state_dict(unet),
                         temporal_state_dict(unet),
                         training_state(run.optimizer, {"noise": run.step_start_rng},
                                        run.accelerator.scaler), metadata)
        project.record["tune"] = run.record | {
            "last_step": step, "checkpoint": Project.checkpoint_name(run.record["run"], step)}
        project.save()
    run.accelerator.wait_for_everyone()
    return folder


def _checkpoint_to_resume(project: Project, reporter: Reporter) -> Checkpoint:
    latest = latest_checkpoint(project, reporter)
    if latest is None:
        raise ProjectError(f"Project {project.root} has no checkpoint to resume from.",
                           "Run tune without --resume first.")
    return latest


def _resume_from(checkpoint: Checkpoint, run: TrainingRun, reporter: Reporter) -> int:
    """Load a checkpoint's weights and optimizer state; returns its step."""
    load_weights(checkpoint, _unwrapped(run))
    load_training_state(checkpoint, run.optimizer, {"noise": run.generator},
                        run.accelerator.scaler)
    run.step_start_rng = run.generator.get_state()
    reporter.info(f"Resuming from {checkpoint.name}.")
    return checkpoint.step


def check_compatible(checkpoint: Checkpoint, record: dict[str, Any]) -> None:
    """Refuse a checkpoint tuned on another base model, other frames or another LoRA shape."""
    mine = checkpoint.record
    check_base(checkpoint, record["base_model"], record["base_fingerprint"],
               f"Use --model {mine.get('base_model')} or tune again from the start.")
    check_frames(checkpoint, record["frames_key"])
    ours = (record["settings"]["rank"], record["lora_targets"])
    theirs = (mine.get("settings", {}).get("rank"), mine.get("lora_targets"))
    if ours != theirs:
        raise BadInputError(f"{checkpoint.name} has LoRA rank {theirs[0]} on {theirs[1]}, "
                            f"not rank {ours[0]} on {ours[1]}.",
                            "Resume with the --rank and --lora-targets it was tuned with.")


def _memory_summary(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU"
    free, total = torch.cuda.mem_get_info(device)
    return f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GB in use"
