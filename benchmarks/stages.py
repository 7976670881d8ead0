"""vedit's own stage functions, timed as `vedit tune` and `vedit edit` run them.

The per-step rows (recipes.py) time one piece of a run; these time the functions the CLI
calls, on a project made from a synthetic clip by `vedit.extract.extract` and a model of the
benchmark's shapes on disk (random weights, the diffusers layout), so everything a user's run
does is in: loading, the VAE encode, the evaluations before and after tuning, the per-step
gather, log and progress, the checkpoint writes; for editing, the latents kept on the CPU and
blended there every step, the inversion cached in fp16, two mp4s written from the source PNGs.

The stages are not touched: their own progress tasks, seen through a `Timeline` reporter,
say where the time went (each task's ends are sync points: the stages read the loss or move
the latents to the CPU there). The import of a stage is timed in a fresh interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import torch
from recipes import Bench, reset_accelerate, synchronize
from shapes import write_model

from vedit import edit as edit_stage
from vedit.checkpoints import find_checkpoint
from vedit.extract import extract
from vedit.progress import Reporter, Task
from vedit.project import Project
from vedit.settings import EditSettings, ExtractSettings, TuneSettings
from vedit.synthetic import make_clip
from vedit.tune import tune

TUNE_PROMPT = "a square moves across a gradient"
EDIT_PROMPT = "a red square moves across a sunset"
#: The run `vedit tune` does by default, which the short run is projected to.
DEFAULT_STEPS = TuneSettings.steps
CLIP_FPS = 25


@dataclass
class TaskTimes:
    """One progress task of a stage: when it started and ended, and each (time, completed)."""

    description: str
    started: float
    ended: float = float("nan")
    marks: list[tuple[float, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class _TimedTask(Task):
    def __init__(self, times: TaskTimes) -> None:
        super().__init__(None, None)
        self.times = times

    def advance(self, amount: float = 1.0) -> None:
        done = self.times.marks[-1][1] if self.times.marks else 0.0
        self.times.marks.append((time.perf_counter(), done + amount))

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, status: str | None = None) -> None:
        if completed is not None:
            self.times.marks.append((time.perf_counter(), completed))


class Timeline(Reporter):
    """A silent Reporter that records when each of a stage's progress tasks starts, moves and
    ends: the stage's own account of where its time goes."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[TaskTimes] = []

    @contextmanager
    def task(self, description: str, total: float | None = None, *,
             in_bytes: bool = False) -> Iterator[Task]:
        times = TaskTimes(description, time.perf_counter())
        self.tasks.append(times)
        try:
            yield _TimedTask(times)
        finally:
            times.ended = time.perf_counter()

    def seconds(self, prefix: str) -> float:
        """Total seconds of the tasks whose description starts with `prefix`."""
        return sum(t.seconds for t in self.tasks if t.description.startswith(prefix))

    def one(self, prefix: str) -> TaskTimes:
        found = [t for t in self.tasks if t.description.startswith(prefix)]
        if len(found) != 1:
            raise ValueError(f"expected one {prefix!r} task, found {len(found)}")
        return found[0]


def import_seconds(module: str) -> float:
    """Seconds `import module` takes in a fresh interpreter (the start of every command)."""
    code = ("import time; started = time.perf_counter(); "
            f"import {module}; print(time.perf_counter() - started)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env=os.environ.copy())
    return float(done.stdout.strip().splitlines()[-1])


class Workspace:
    """A scratch folder with a model of the bench's shapes on disk and clips to extract."""

    def __init__(self, root: Path, bench: Bench) -> None:
        self.root, self.bench = root, bench
        self._model: Path | None = None
        self._clips: dict[int, Path] = {}
        self._count = 0

    @property
    def model(self) -> Path:
        """The model folder, written on first use."""
        if self._model is None:
            self._model = write_model(self.bench.shapes, self.root / "model", self.bench.device)
        return self._model

    def project(self, frames: int) -> Path:
        """A new project with `frames` frames at the bench's size, as `vedit extract` makes it."""
        clip = self._clips.get(frames)
        if clip is None:
            clip = make_clip(self.root / f"clip-{frames}.mp4", width=self.bench.width,
                             height=self.bench.height, fps=CLIP_FPS,
                             seconds=(frames + 1) / CLIP_FPS, audio=False)
            self._clips[frames] = clip
        self._count += 1
        folder = self.root / f"project-{self._count}"
        size = f"{self.bench.width}x{self.bench.height}"
        extract(clip, folder, ExtractSettings(frames=frames, stride=1, size=size))
        return folder


# -- tune -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneRun:
    """One `vedit.tune.tune` call of `steps` steps, and where its time went."""

    steps: int
    command_s: float  # the whole call
    load_s: float  # loading the base model
    loop_s: float  # the training loop, checkpoint writes included
    step_s: float  # the median step in the loop, steps after a checkpoint write left out
    checkpoint_s: float  # the last checkpoint's write
    checkpoints: int
    peak_gb: float | None  # what tune itself reports: the whole command's peak

    @property
    def projected_s(self) -> float:
        """The default run of 500 steps (a checkpoint at 250 and at 500, as this run writes
        two): this run, plus its median step for each step more."""
        return self.command_s + (DEFAULT_STEPS - self.steps) * self.step_s


def tune_settings(model: Path, steps: int) -> TuneSettings:
    """vedit tune's defaults, for `steps` steps with two checkpoints, as the default run has."""
    return TuneSettings(prompt=TUNE_PROMPT, model=str(model), steps=steps,
                        checkpoint_every=max(1, steps // 2))


def tune_as_run(workspace: Workspace, frames: int, steps: int) -> TuneRun:
    """Extract a new project and run `vedit.tune.tune` on it, timed."""
    project = workspace.project(frames)
    settings = tune_settings(workspace.model, steps)
    timeline = Timeline()
    reset_accelerate()
    device = workspace.bench.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = tune(project, settings, reporter=timeline)
    synchronize(device)
    command = time.perf_counter() - started
    return read_tune_run(timeline, settings, command, result.peak_memory_gb)


def read_tune_run(timeline: Timeline, settings: TuneSettings, command_s: float,
                  peak_gb: float | None) -> TuneRun:
    """Where a tune call's time went, from its progress tasks: the "tuning" task marks each
    step's end (after the loss is read); a checkpoint is written after its step's mark, so the
    step after one is left out, and the last one, written before the task ends, is timed."""
    loop = timeline.one("tuning")
    ends = {int(done): at for at, done in loop.marks}
    every = settings.checkpoint_every
    saved = {s for s in range(1, settings.steps + 1) if s == settings.steps or s % every == 0}
    steps = [ends[s] - ends[s - 1] for s in range(2, settings.steps + 1) if s - 1 not in saved]
    return TuneRun(steps=settings.steps, command_s=command_s,
                   load_s=timeline.seconds("Loading"), loop_s=loop.seconds,
                   step_s=median(steps), checkpoint_s=loop.ended - ends[settings.steps],
                   checkpoints=len(saved), peak_gb=peak_gb)


# -- edit -------------------------------------------------------------------------------------


def edit_project(workspace: Workspace, frames: int) -> Path:
    """A project tuned for one step: frames, cached latents and a checkpoint, as after tune."""
    project = workspace.project(frames)
    reset_accelerate()
    tune(project, TuneSettings(prompt=TUNE_PROMPT, model=str(workspace.model), steps=1,
                               checkpoint_every=0))
    return project


def load_models(project: Path, device: torch.device) -> tuple[edit_stage.EditModels, float]:
    """The project's checkpoint's models, as `vedit edit` loads them, and the seconds it took."""
    checkpoint = find_checkpoint(Project.open(project))
    started = time.perf_counter()
    models = edit_stage.load_edit_models(checkpoint, device)
    synchronize(device)
    return models, time.perf_counter() - started


class StageEdit:
    """`vedit.edit.edit` on one project with the models in memory, as a benchmark callable."""

    def __init__(self, project: Path, models: edit_stage.EditModels, device: torch.device
                 ) -> None:
        self.project, self.models, self.device = project, models, device
        self.inversion: Path | None = None

    def __call__(self, steps: int, guidance: float, cached: bool) -> dict[str, float]:
        """One edit of one prompt; with `cached` the inversion the last call stored is reused,
        else it is deleted first. Returns the seconds of the call and of its sections."""
        if not cached and self.inversion is not None:
            self.inversion.unlink(missing_ok=True)
        settings = EditSettings(steps=steps, guidance=guidance)
        timeline = Timeline()
        started = time.perf_counter()
        result = edit_stage.edit(self.project, [EDIT_PROMPT], settings, reporter=timeline,
                                 models=self.models)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        (output,) = result.edits
        self.inversion = Path(output.inversion["path"])
        if cached and not output.inversion["reused"]:
            raise RuntimeError("the cached edit computed its inversion again")
        shutil.rmtree(output.folder)
        return {"total": seconds, "invert": timeline.seconds("inverting"),
                "sample": timeline.seconds("sampling"),
                "decode_write": timeline.seconds("decoding")}
