"""The score stage: the metrics video-editing benchmarks publish, for any edit of any clip.

Every edit is scored against the frames it was made from and its prompt:

- `warp_error` and `motion_alignment` need no weights: optical flow (flow.py) of the source's
  and the edit's consecutive frames;
- `clip_frame_consistency` and `clip_text_alignment` (LOVEU-TGVE's definitions) need a CLIP,
  `pickscore` PickScore_v1 (clip_models.py); a default model that was never fetched leaves
  them null, with one notice saying what to fetch.

Frames are streamed: two of the edit's and two of the source's in memory at a time, plus one
batch for the CLIP models, so a `--full` edit of hundreds of frames scores in bounded memory.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vedit import tomlio
from vedit.clip_models import (
    DEFAULT_CLIP_MODEL,
    IMAGE_BATCH,
    PICKSCORE_MODEL,
    ClipModel,
    resolve_clip,
)
from vedit.errors import BadInputError, ModelNotFoundError, ProjectError
from vedit.flow import FlowEstimator, score_pair
from vedit.progress import Reporter
from vedit.project import EDIT_RECORD, EDIT_VIDEO, Project, atomic_file
from vedit.settings import ScoreSettings
from vedit.video import fit_frame, probe, read_span

if TYPE_CHECKING:
    import torch
    from rich.table import Table

METRICS = ("warp_error", "motion_alignment", "clip_frame_consistency", "clip_text_alignment",
           "pickscore")
LOWER_IS_BETTER = {"warp_error"}
#: Column headings in the table (the --json and --csv keys are the metric names).
HEADINGS = {"warp_error": "warp\nerror ↓", "motion_alignment": "motion\nalign ↑",
            "clip_frame_consistency": "CLIP\nconsist ↑", "clip_text_alignment": "CLIP\ntext ↑",
            "pickscore": "Pick\nScore ↑"}
#: Decimals shown in the table: each metric's published precision.
DECIMALS = {"warp_error": 4, "motion_alignment": 3, "clip_frame_consistency": 4,
            "clip_text_alignment": 2, "pickscore": 2}
TEXT_SCALE = 100.0  # CLIP score: 100 x cosine, LOVEU-TGVE's figure for OpenAI's CLIP


@dataclass(frozen=True)
class Frames:
    """Frames to score: what to call them, their times in seconds, and a way to read them (RGB
    uint8, in order, one at a time)."""

    label: str
    times: list[float]
    read: Callable[[], Iterator[np.ndarray]]


def video_frames(path: Path, label: str | None = None) -> Frames:
    """Every frame of a video file, upright."""
    info = probe(Path(path))
    return Frames(label or str(path), info.frame_times,
                  lambda: (np.asarray(image.convert("RGB"))
                           for image in read_span(info, 0, info.frame_count)))


def project_frames(project: Project) -> Frames:
    """A project's extracted (tuned) frames."""
    paths = project.frame_paths()
    times = [float(t) for t in project.require("frames", "extract")["times"]]
    return Frames(str(project.frames_folder()), times,
                  lambda: (np.asarray(Image.open(p).convert("RGB")) for p in paths))


def edit_source(project: Project, record: dict[str, Any]) -> Frames:
    """The frames an edit was made from: the tuned frames, or for a `--full` edit every frame of
    the clip's span, read from the source clip as `edit --full` read them."""
    if record.get("full") is None:
        return project_frames(project)
    from vedit.latents import clip_span, span_images  # torch and diffusers: only for --full

    span = clip_span(project)
    return Frames(f"{span.info.path} (frames {span.first} to {span.stop - 1})", span.times,
                  lambda: span_images(span))


# --- matching a video's frames to its source's ---------------------------------------------


@dataclass(frozen=True)
class Matching:
    """Which source frame each scored frame of the video is compared with."""

    video_indices: list[int]
    source_indices: list[int]
    note: str | None = None

    def __len__(self) -> int:
        return len(self.video_indices)


def match_frames(video: Frames, source: Frames) -> Matching:
    """Pair frames one for one when the counts agree; otherwise each video frame with the source
    frame nearest its time (both counted from their first frame), leaving out video frames with
    none within half a source frame. The note says what was matched when it was not one for one."""
    count, source_count = len(video.times), len(source.times)
    if count == source_count:
        note = None
        if count > 1 and abs(_rate(video.times) - _rate(source.times)) > 0.01 * _rate(
                source.times):
            note = (f"{video.label} and {source.label} have {count} frames each but different "
                    f"rates ({_rate(video.times):g} and {_rate(source.times):g} fps): frames "
                    "were matched one for one.")
        return Matching(list(range(count)), list(range(count)), note)
    starts = video.times[0], source.times[0]
    source_times = [t - starts[1] for t in source.times]
    tolerance = 0.5 * _interval(source.times) + 1e-6
    pairs = []
    for index, time in enumerate(t - starts[0] for t in video.times):
        nearest = _nearest(source_times, time)
        if abs(source_times[nearest] - time) <= tolerance:
            pairs.append((index, nearest))
    if not pairs:
        raise BadInputError(f"No frame of {video.label} falls within the time span of "
                            f"{source.label}.", "Score the video against the clip it was made "
                            "from (--source).")
    left_out = count - len(pairs)
    note = (f"{video.label} has {count} frames at {_rate(video.times):g} fps and {source.label} "
            f"{source_count} at {_rate(source.times):g} fps: each frame of the video was matched "
            f"to the source frame nearest its time (source frames {pairs[0][1]} to "
            f"{pairs[-1][1]})" + (f"; {left_out} frames of the video had none within half a "
                                  "source frame and were left out." if left_out else "."))
    return Matching([v for v, _ in pairs], [s for _, s in pairs], note)


def _interval(times: Sequence[float]) -> float:
    steps = [b - a for a, b in itertools.pairwise(times)]
    return statistics.median(steps) if steps else 0.0


def _rate(times: Sequence[float]) -> float:
    interval = _interval(times)
    return round(1 / interval, 3) if interval > 0 else 0.0


def _nearest(times: list[float], target: float) -> int:
    index = bisect.bisect_left(times, target)
    candidates = [i for i in (index - 1, index) if 0 <= i < len(times)]
    return min(candidates, key=lambda i: abs(times[i] - target))


def _pick(frames: Iterator[np.ndarray], indices: Iterable[int]) -> Iterator[np.ndarray]:
    """The frames at `indices` (never decreasing; repeats allowed) of a stream, in one pass."""
    position = -1
    current: np.ndarray
    for index in indices:
        while position < index:
            current = next(frames)
            position += 1
        yield current


# --- results -----------------------------------------------------------------------------------


@dataclass
class VideoScore:
    """The metrics of one video: the means over its frames, and the values frame by frame
    (pairs of consecutive frames for the two flow metrics)."""

    video: str
    source: str
    prompt: str | None
    frames: int
    metrics: dict[str, float | None]
    per_frame: dict[str, list[float | None]]
    name: str | None = None
    clip_model: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "video": self.video, "source": self.source,
                "prompt": self.prompt, "frames": self.frames, "metrics": self.metrics,
                "per_frame": self.per_frame, "clip_model": self.clip_model, "notes": self.notes}

    def record(self) -> dict[str, Any]:
        """The means for a TOML record (which has no null: missing metrics are left out)."""
        values = {k: v for k, v in self.metrics.items() if v is not None}
        return {"frames": self.frames, **values} | (
            {"clip_model": self.clip_model} if self.clip_model else {})


def format_metrics(metrics: dict[str, float | None]) -> str:
    """`warp_error 0.0123, motion_alignment -1.234, ...` for one line of human output."""
    return ", ".join(f"{name} {_shown(name, metrics.get(name))}" for name in METRICS)


def _shown(name: str, value: float | None) -> str:
    return "-" if value is None else f"{value:.{DECIMALS[name]}f}"


def best(scores: Sequence[VideoScore], metric: str) -> float | None:
    """The best value of a metric among the videos (lowest for warp_error, else highest)."""
    values = [value for s in scores if (value := s.metrics.get(metric)) is not None]
    if not values:
        return None
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def results_table(scores: Sequence[VideoScore]) -> Table:
    """One row per video, one column per metric; with several rows the best of each column is
    bold and starred."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left",
                  caption="↓ lower is better, ↑ higher is better"
                  + ("; * the best of a column" if len(scores) > 1 else ""))
    table.add_column("video", overflow="fold")
    table.add_column("frames", justify="right")
    for metric in METRICS:
        table.add_column(HEADINGS[metric], justify="right")
    winners = {metric: best(scores, metric) for metric in METRICS}
    for item in scores:
        cells = [item.name or Path(item.video).name, str(item.frames)]
        for metric in METRICS:
            value = item.metrics.get(metric)
            text = _shown(metric, value)
            if len(scores) > 1 and value is not None and value == winners[metric]:
                text = f"[bold]{text}*[/bold]"
            cells.append(text)
        table.add_row(*cells)
    return table


def write_csv(path: Path, scores: Sequence[VideoScore]) -> None:
    """One row per video (name, video, source, prompt, frames, the metrics), written atomically;
    missing metrics are empty cells."""
    with atomic_file(Path(path)) as temp, temp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "video", "source", "prompt", "frames", *METRICS])
        for item in scores:
            writer.writerow([item.name or "", item.video, item.source, item.prompt or "",
                             item.frames, *("" if item.metrics[m] is None else item.metrics[m]
                                            for m in METRICS)])


# --- scoring ---------------------------------------------------------------------------------


class Scorer:
    """Scores videos against their sources; loads its CLIP models once, on first use."""

    def __init__(self, settings: ScoreSettings | None = None, *,
                 device: str | torch.device | None = None,
                 reporter: Reporter | None = None) -> None:
        self.settings = settings or ScoreSettings()
        self.device = device
        self.reporter = reporter or Reporter()
        self._loaded: dict[str, ClipModel | None] = {}

    def score(self, video: Frames, source: Frames, prompt: str | None = None, *,
              name: str | None = None) -> VideoScore:
        """Score `video` against the frames it was made from, and against `prompt`."""
        matching = match_frames(video, source)
        notes = [matching.note] if matching.note else []
        clip = self.clip_model()
        pick = self.pickscore_model() if prompt else None  # PickScore scores against a prompt
        flow = FlowEstimator()
        flow_scores, batch = [], []
        embeds: dict[str, list[torch.Tensor]] = {"clip": [], "pick": []}
        previous: tuple[np.ndarray, np.ndarray] | None = None
        pairs = zip(_pick(video.read(), matching.video_indices),
                    _pick(source.read(), matching.source_indices), strict=True)
        with self.reporter.task(f"scoring {name or video.label}", total=len(matching)) as task:
            for edited, original in pairs:
                original = _sized_like(original, edited, notes, source.label, video.label)
                if previous is not None:
                    flow_scores.append(score_pair(flow, (previous[1], original),
                                                  (previous[0], edited)))
                previous = edited, original
                batch.append(edited)
                if len(batch) == IMAGE_BATCH:
                    _embed(batch, clip, pick, embeds)
                    batch = []
                task.advance()
            _embed(batch, clip, pick, embeds)
        for note in notes:
            self.reporter.info(note)
        per_frame: dict[str, list[float | None]] = {
            "warp_error": [s.warp_error for s in flow_scores],
            "motion_alignment": [-s.end_point_error for s in flow_scores],
            **self._clip_scores(embeds, clip, pick, prompt)}
        metrics = {m: _mean(per_frame[m]) for m in METRICS}
        return VideoScore(video.label, source.label, prompt, len(matching), metrics, per_frame,
                          name=name, clip_model=clip.source.name if clip else None, notes=notes)

    def clip_model(self) -> ClipModel | None:
        """The CLIP, loaded the first time; None (with a notice) for the default one when it is
        not on disk. A CLIP asked for by name must be there."""
        if "clip" not in self._loaded:
            named = self.settings.clip_model
            self._loaded["clip"] = self._load(named or DEFAULT_CLIP_MODEL, required=bool(named))
            if self._loaded["clip"] is None:
                self.reporter.warn(
                    f"The CLIP metrics are null: {DEFAULT_CLIP_MODEL} is not in the Hugging Face "
                    "cache. Run `vedit fetch-models --scoring` once with network (CLIP ViT-L/14 "
                    f"and PickScore), or `vedit fetch-models {DEFAULT_CLIP_MODEL}` for CLIP "
                    "alone.")
        return self._loaded["clip"]

    def pickscore_model(self) -> ClipModel | None:
        """PickScore, loaded the first time; None when it is not on disk (with a notice, unless
        the CLIP's notice already named it)."""
        if "pick" not in self._loaded:
            self._loaded["pick"] = self._load(PICKSCORE_MODEL, required=False)
            if self._loaded["pick"] is None and self.clip_model() is not None:
                self.reporter.info(f"pickscore is null: run `vedit fetch-models "
                                   f"{PICKSCORE_MODEL}` to add it.")
        return self._loaded["pick"]

    def _load(self, spec: str, *, required: bool) -> ClipModel | None:
        try:
            source = resolve_clip(spec)
        except ModelNotFoundError:
            if required:
                raise
            return None
        with self.reporter.task(f"Loading {source.name}", total=None):
            return ClipModel(source, self._device(), self.reporter)

    def _device(self) -> Any:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _clip_scores(self, embeds: dict[str, list[torch.Tensor]], clip: ClipModel | None,
                     pick: ClipModel | None, prompt: str | None) -> dict[str, list[float | None]]:
        """Per frame: its mean cosine similarity to every other frame (the mean over frames is
        the mean over all pairs, as LOVEU-TGVE's), 100 x its cosine with the prompt, PickScore."""
        count = sum(len(e) for e in embeds["clip"])
        nulls: list[float | None] = [None] * count
        consistency, alignment, pickscore = nulls, nulls, nulls
        if clip is not None:
            import torch

            images = torch.cat(embeds["clip"])
            if count > 1:
                others = images @ images.sum(dim=0) - (images * images).sum(dim=1)
                consistency = (others / (count - 1)).tolist()
            if prompt:
                alignment = (TEXT_SCALE * images @ clip.text_embedding(prompt)).tolist()
        if pick is not None and prompt:
            import torch

            images = torch.cat(embeds["pick"])
            pickscore = (pick.logit_scale * images @ pick.text_embedding(prompt)).tolist()
        return {"clip_frame_consistency": consistency, "clip_text_alignment": alignment,
                "pickscore": pickscore}


def _embed(batch: list[np.ndarray], clip: ClipModel | None, pick: ClipModel | None,
           embeds: dict[str, list[torch.Tensor]]) -> None:
    for key, model in (("clip", clip), ("pick", pick)):
        if model is not None and batch:
            embeds[key].append(model.image_embeddings(batch))


def _sized_like(frame: np.ndarray, like: np.ndarray, notes: list[str], label: str,
                like_label: str) -> np.ndarray:
    """A source frame at the edit's size (scaled to cover and centre-cropped, as extract sizes
    frames); noted once."""
    if frame.shape == like.shape:
        return frame
    height, width = like.shape[:2]
    note = (f"The frames of {label} ({frame.shape[1]}x{frame.shape[0]}) were scaled to "
            f"{like_label}'s size ({width}x{height}) to be compared.")
    if note not in notes:
        notes.append(note)
    return np.asarray(fit_frame(Image.fromarray(frame), width, height))


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# --- the stage -----------------------------------------------------------------------------


def score_project(project_dir: Path, edits: Sequence[str] | None = None,
                  settings: ScoreSettings | None = None, *,
                  reporter: Reporter | None = None) -> list[VideoScore]:
    """Score a project's edits (every one when none is named) against the frames each was made
    from and its prompt. Reads the project; writes nothing."""
    project = Project.open(Path(project_dir))
    scorer = Scorer(settings, reporter=reporter)
    results = []
    for folder in edit_folders(project, edits):
        record = tomlio.loads((folder / EDIT_RECORD).read_text(encoding="utf-8"))
        video = video_frames(folder / EDIT_VIDEO)
        results.append(scorer.score(video, edit_source(project, record), record.get("prompt"),
                                    name=folder.name))
    return results


def edit_folders(project: Project, names: Sequence[str] | None) -> list[Path]:
    """The folders of the named edits, or of every edit, in name order."""
    found = {n: project.edit_dir(n) for n in project.edit_names()
             if (project.edit_dir(n) / EDIT_RECORD).is_file()}
    if not found:
        raise ProjectError(f"Project {project.root} has no edits yet.",
                           f"Run `vedit edit {project.root} --prompt ...` first.")
    unknown = [n for n in names or [] if n not in found]
    if unknown:
        raise BadInputError(f"No edit {', '.join(unknown)} in {project.edits_dir}.",
                            f"Its edits: {', '.join(found)}.")
    return [found[n] for n in names] if names else list(found.values())


def score_video(video: Path, source: Path, prompt: str | None = None,
                settings: ScoreSettings | None = None, *,
                reporter: Reporter | None = None) -> VideoScore:
    """Score any video against the clip it was made from (a video file, or a project folder for
    its extracted frames) and, given one, a prompt."""
    source = Path(source)
    frames = project_frames(Project.open(source)) if source.is_dir() else video_frames(source)
    return Scorer(settings, reporter=reporter).score(video_frames(Path(video)), frames, prompt)
