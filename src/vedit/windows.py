"""Overlapping windows over a clip: which frames each UNet call sees and how the results blend.

`vedit edit --full` edits every frame of a clip's span, often ten times the tuned frames, with
GPU memory bounded by one window. At every step of the inversion and of sampling, each window
of at most `window` frames is denoised on its own; then every frame that windows share gets
the weighted average of their results, the weights fading linearly across each overlap. The
next step starts from one seamless clip, so no seam can form at any step. The windows are the
fewest that cover the clip with neighbours sharing at least `overlap` frames; the frames to
spare lengthen the overlaps evenly, and no frame is in more than two windows, so every fade
is a straight line from one window to the next. The clip's latents stay where the caller
keeps them (the CPU for whole clips); only a window visits the GPU.

The stride. The model was tuned on frames some source frames apart (extract's `--stride`),
so with `stride` K the clip is K interleaved sequences (frames r, r + K, r + 2K, ...), each
covered by its own windows: the UNet sees motion at the pace it was tuned on, and together
the sequences hold every frame. They share only the anchor.

The anchor. Tune-A-Video's sparse-causal attention lets every frame attend to the clip's
first frame, and that shared frame is what keeps the look of all frames alike. A window that
does not start at frame 0 gets the clip's frame 0 (its latents at the current step, so at the
same noise level as the rest) prepended as its own first frame, counted within the window, so
every window attends to the same anchor and the UNet never sees more than `window` frames.
Prepending, rather than handing the attention processors frame 0's keys and values, keeps the
model exactly the tuned one: every clip it was tuned on began with this same frame (the tuned
frames start where the span does), the frame-joint GroupNorms and the temporal attention see
the anchor as they saw it in tuning, and no per-layer state has to be carried from one window
to the next, so windows stay independent and memory stays bounded. The cost is one frame of
each later window, whose prediction is dropped, and that window's first own frame sees the
anchor as its previous frame; that frame lies at the start of an overlap, where the window
before it, which has its true previous frame, weighs the most.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vedit.errors import BadInputError
from vedit.progress import Reporter
from vedit.project import atomic_file
from vedit.tensorfiles import load_tensors, save_tensors

#: (window latents (b, c, f, h, w), timestep) -> the window's latents one step on.
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """Clip frames `start`, `start + step`, ... up to `stop - 1`, denoised together;
    `anchored`: frame 0 goes first."""

    start: int
    stop: int
    anchored: bool = False
    step: int = 1

    @property
    def own_frames(self) -> range:
        return range(self.start, self.stop, self.step)

    @property
    def frames(self) -> list[int]:
        """The clip frames the UNet sees, in order: the anchor (if any), then the window's own."""
        return ([0] if self.anchored else []) + list(self.own_frames)

    @property
    def own(self) -> int:
        return len(self.own_frames)


@dataclass(frozen=True)
class WindowPlan:
    """The windows that cover a clip of `num_frames` frames: `stride` interleaved sequences of
    every `stride`-th frame, each covered in order by windows of at most `window` frames that
    share at least `overlap` with their neighbours."""

    num_frames: int
    window: int
    overlap: int
    windows: tuple[Window, ...]
    stride: int = 1

    def __len__(self) -> int:
        return len(self.windows)

    def describe(self) -> list[list[int]]:
        """The plan as plain numbers, for cache keys: two settings giving it share results."""
        return [[w.start, w.stop, int(w.anchored)] + ([w.step] if w.step > 1 else [])
                for w in self.windows]

    def neighbours(self) -> list[tuple[int, int]]:
        """Pairs of windows (indices) that follow each other in one sequence (the windows are in
        order, sequence by sequence, and a sequence's frames all have one remainder)."""
        return [(i, i + 1) for i in range(len(self.windows) - 1)
                if self.windows[i].start % self.stride == self.windows[i + 1].start % self.stride]

    def overlaps(self) -> list[int]:
        """The frames each pair of neighbouring windows shares."""
        return [len(set(self.windows[a].own_frames) & set(self.windows[b].own_frames))
                for a, b in self.neighbours()]


def single_window(num_frames: int) -> WindowPlan:
    """All frames at once: the plain edit of the tuned frames."""
    return WindowPlan(num_frames, num_frames, 0, (Window(0, num_frames),))


def default_overlap(window: int) -> int:
    """A quarter of the window, and at least one frame, so that no window boundary is a seam."""
    return max(1, window // 4)


def plan_windows(num_frames: int, *, tuned_frames: int, window: int | None = None,
                 overlap: int | None = None, stride: int = 1) -> WindowPlan:
    """Windows of at most `window` frames (default `tuned_frames`) covering the clip.

    With `stride` K the clip is K interleaved sequences (frames r, r + K, r + 2K, ...), so
    the UNet sees frames as far apart as in tuning; each sequence is covered on its own. In a
    sequence the windows are the fewest that fit, spread evenly: neighbours share at least
    `overlap` frames (default `default_overlap`), the frames left over go to the overlaps
    (never differing by more than one) and then to the windows, every frame lies in one
    window or two, and the fades between them are linear. Every window but the one that starts
    at frame 0 holds the anchor as its first frame."""
    window = window or tuned_frames
    overlap = default_overlap(window) if overlap is None else overlap
    windows: list[Window] = []
    for phase in range(min(stride, num_frames)):
        frames = range(phase, num_frames, stride)
        head = 1 if phase == 0 else 0  # frame 0 is its sequence's first own frame, no anchor
        length = window - 1  # own frames of a window besides the anchor (or frame 0)
        if len(frames) - head > length:
            _check_fits(window, overlap, num_frames)
        for first, last in _even_windows(len(frames) - head, length, overlap):
            begin = frames[first + head] if (first or not head) else 0
            windows.append(Window(begin, frames[last + head - 1] + 1, anchored=begin != 0,
                                  step=stride))
    return WindowPlan(num_frames, window, overlap, tuple(windows), stride)


def _check_fits(window: int, overlap: int, num_frames: int) -> None:
    """Refuse windows that cannot cover the clip with every frame in at most two of them."""
    if window < 3:
        raise BadInputError(f"--window {window} is too small to edit the clip's {num_frames} "
                            "frames in windows: each holds the anchor frame, frames shared with "
                            "a neighbour and frames of its own.",
                            "Use --window 3 or more; the tuned frame count is a good choice.")
    if overlap < 1:
        raise BadInputError(f"--overlap {overlap} would leave a seam between windows: "
                            "neighbouring windows must share at least one frame.",
                            f"Use --overlap {default_overlap(window)} (the default).")
    if overlap > (window - 1) // 2:
        raise BadInputError(
            f"--overlap {overlap} is more than half of a window's {window - 1} frames besides "
            "the anchor, so frames would fall in three windows.",
            f"Use --overlap {(window - 1) // 2} or less, or a larger --window.")


def _even_windows(count: int, length: int, overlap: int) -> list[tuple[int, int]]:
    """Windows `(first, stop)` of at most `length` frames over `count` frames in a row: the
    fewest that share at least `overlap` with their neighbours; the frames to spare lengthen
    the overlaps evenly, as far as every frame stays in at most two windows, then the windows
    (the shortest first)."""
    if count <= length:
        return [(0, count)]
    number = 1 + -(-(count - length) // (length - overlap))
    # Two overlaps of a middle window must fit in it; the only one of two windows may fill them.
    widest = length if number == 2 else length // 2
    shared = _spread(min(number * length - count, (number - 1) * widest), number - 1)
    around = [a + b for a, b in zip([0, *shared], [*shared, 0], strict=True)]
    solo = _fill(count - sum(shared), around, [length - a for a in around])
    windows, first = [], 0
    for index, size in enumerate(a + s for a, s in zip(around, solo, strict=True)):
        windows.append((first, first + size))
        first += size - (shared[index] if index < len(shared) else 0)
    return windows


def _spread(total: int, parts: int) -> list[int]:
    """`total` in `parts` whole numbers that differ by at most one, the larger ones spread."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def _fill(total: int, sizes: list[int], room: list[int]) -> list[int]:
    """`total` frames added to windows of `sizes`, at most `room[i]` to window i, the smallest
    windows first, so the windows end up as even as their room allows."""
    def added(level: int) -> list[int]:
        return [min(max(level - size, 0), free) for size, free in zip(sizes, room, strict=True)]

    level = max(sizes) + max(room)
    while sum(added(level)) > total:
        level -= 1
    extra = added(level)
    open_ = [i for i, size in enumerate(sizes) if extra[i] < room[i] and size + extra[i] == level]
    for i in open_[:total - sum(extra)]:
        extra[i] += 1
    return extra


def blend_weights(plan: WindowPlan) -> list[torch.Tensor]:
    """Each window's weight for its own frames: 1, except across the frames it shares with a
    neighbour, where it fades linearly so that two windows' weights sum to 1 frame by frame."""
    before = [0] * len(plan.windows)
    after = [0] * len(plan.windows)
    for (a, b), shared in zip(plan.neighbours(), plan.overlaps(), strict=True):
        after[a], before[b] = shared, shared
    return [torch.tensor([min(1.0, (at + 1) / (rise + 1), (window.own - at) / (fall + 1))
                          for at in range(window.own)], dtype=torch.float32)
            for window, rise, fall in zip(plan.windows, before, after, strict=True)]


def blend(plan: WindowPlan, outputs: Sequence[torch.Tensor],
          weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The clip from its windows' results (own frames only): each frame the weighted average
    of the windows that hold it. A frame in one window only keeps that window's result
    exactly (weight 1), so a single window of all frames is the plain, unwindowed step."""
    first = outputs[0]
    shape = (first.shape[0], first.shape[1], plan.num_frames, *first.shape[3:])
    total = torch.zeros(shape, dtype=first.dtype, device=first.device)
    norm = torch.zeros(plan.num_frames, dtype=first.dtype, device=first.device)
    for window, output, weight in zip(plan.windows, outputs, weights, strict=True):
        weight = weight.to(first.device, first.dtype)
        frames = slice(window.start, window.stop, window.step)
        total[:, :, frames] += weight.view(1, 1, -1, 1, 1) * output
        norm[frames] += weight
    return total / norm.view(1, 1, -1, 1, 1)


@dataclass(frozen=True)
class WindowProgress:
    """Where a windowed run stands: `step` steps done; `latents`, the clip at the start of the
    next one; `outputs`, the results of that step's windows finished so far.

    Replaced whole after every window (never changed in place), so the record an interrupt
    finds is always consistent and resuming from it gives exactly the uninterrupted result."""

    step: int
    latents: torch.Tensor
    outputs: tuple[torch.Tensor, ...] = field(default=())


class ResumeFile:
    """A windowed run's progress in one safetensors file (fp32, so a rerun continues exactly):
    written when the run is interrupted or fails, and at a step's end now and then (so even a
    killed process loses little), removed by the caller once the result is stored."""

    def __init__(self, path: Path, key: str, save_every: float = 60.0) -> None:
        self.path = path
        self.key = key
        self.save_every = save_every
        self.saved: WindowProgress | None = None
        self._last_save = time.monotonic()

    def load(self, latents: torch.Tensor, plan: WindowPlan, steps: int) -> WindowProgress | None:
        """The stored progress of this run (same key and shapes), or None to start afresh."""
        if not self.path.is_file():
            return None
        try:
            tensors, metadata = load_tensors(self.path)
            stored = WindowProgress(int(metadata["step"]), tensors["latents"], tuple(
                tensors[f"window.{i}"] for i in range(int(metadata["windows"]))))
        except (BadInputError, KeyError, ValueError):
            return None  # unreadable: computing again is always right
        if metadata.get("key") != self.key or not _fits(stored, latents, plan, steps):
            return None
        device = latents.device
        self.saved = WindowProgress(stored.step, stored.latents.to(device),
                                    tuple(o.to(device) for o in stored.outputs))
        return self.saved

    def save(self, progress: WindowProgress) -> None:
        tensors = {"latents": progress.latents.float()}
        tensors |= {f"window.{i}": o.float() for i, o in enumerate(progress.outputs)}
        metadata = {"key": self.key, "step": str(progress.step),
                    "windows": str(len(progress.outputs))}
        with atomic_file(self.path) as temp:
            save_tensors(temp, tensors, metadata)
        self.saved = progress
        self._last_save = time.monotonic()

    def save_now_and_then(self, progress: WindowProgress) -> None:
        """Save at a step's end when `save_every` seconds have passed since the last save."""
        if time.monotonic() - self._last_save >= self.save_every:
            self.save(progress)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _fits(progress: WindowProgress, latents: torch.Tensor, plan: WindowPlan, steps: int) -> bool:
    """Whether stored progress belongs to a run on `latents` in `plan` for `steps` steps."""
    return (progress.latents.shape == latents.shape and 0 <= progress.step < steps
            and len(progress.outputs) < len(plan)
            and all(o.shape[2] == w.own for o, w in zip(progress.outputs, plan.windows,
                                                         strict=False)))


def denoise_in_windows(latents: torch.Tensor, timesteps: torch.Tensor, step_window: StepFn,
                       plan: WindowPlan, *, device: torch.device, label: str,
                       reporter: Reporter | None = None,
                       resume: ResumeFile | None = None) -> torch.Tensor:
    """Run `step_window` over every window at every timestep, blending after each step.

    `latents` `(b, c, f, h, w)` stay on their device; each window is moved to `device` for its
    step and back. With `resume`, an interrupted run's progress is saved and a rerun goes on
    from it. Progress shows steps and windows with an ETA."""
    reporter = reporter or Reporter()
    weights = blend_weights(plan)
    progress = _start(latents, len(timesteps), plan, resume, label, reporter)
    with reporter.task(label, total=len(timesteps) * len(plan)) as task:
        task.update(completed=progress.step * len(plan) + len(progress.outputs))
        try:
            while progress.step < len(timesteps):
                progress = _next_window(progress, timesteps, step_window, plan, weights, device)
                task.update(completed=progress.step * len(plan) + len(progress.outputs),
                            status=_status(progress, len(timesteps), plan))
                if resume is not None and not progress.outputs:
                    resume.save_now_and_then(progress)
        except BaseException:
            if resume is not None and (progress.step or progress.outputs):
                resume.save(progress)
            raise
    return progress.latents


def _start(latents: torch.Tensor, steps: int, plan: WindowPlan, resume: ResumeFile | None,
           label: str, reporter: Reporter) -> WindowProgress:
    """Where the run begins: the stored progress of an interrupted run, or the first step."""
    stored = resume.load(latents, plan, steps) if resume is not None else None
    if resume is None or stored is None:
        return WindowProgress(0, latents.float())
    reporter.info(f"Continuing {label} at step {stored.step + 1} of {steps}"
                  f"{_window_text(len(stored.outputs) + 1, plan)}: the work before is kept in "
                  f"{resume.path.name}.")
    return stored


def _next_window(progress: WindowProgress, timesteps: torch.Tensor, step_window: StepFn,
                 plan: WindowPlan, weights: list[torch.Tensor],
                 device: torch.device) -> WindowProgress:
    """Step the next window; after a step's last window, blend them into the next clip."""
    window = plan.windows[len(progress.outputs)]
    frames = torch.tensor(window.frames, device=progress.latents.device)
    sample = progress.latents.index_select(2, frames).to(device)
    result = step_window(sample, timesteps[progress.step])[:, :, int(window.anchored):]
    outputs = (*progress.outputs, result.to(progress.latents.device, torch.float32))
    if len(outputs) < len(plan):
        return WindowProgress(progress.step, progress.latents, outputs)
    return WindowProgress(progress.step + 1, blend(plan, outputs, weights))


def _status(progress: WindowProgress, steps: int, plan: WindowPlan) -> str:
    step = min(progress.step + 1, steps)
    return f"step {step}/{steps}{_window_text(len(progress.outputs) + 1, plan)}"


def _window_text(window: int, plan: WindowPlan) -> str:
    return f", window {window}/{len(plan)}" if len(plan) > 1 else ""
