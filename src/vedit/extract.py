"""The extract stage: choose frames of a clip by time, size them, write PNGs, keep the audio.

Frames are chosen by timestamp, so a variable-frame-rate clip is sampled evenly in time: with
`stride` K the targets are K source frames apart at the clip's average rate, with `spread`
they divide the span evenly; each target takes the frame shown nearest to it.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from vedit import audio
from vedit.errors import BadInputError
from vedit.progress import Reporter
from vedit.project import (
    EXTRACT_SECTIONS,
    FORMAT,
    FRAMES_DIR,
    FRAMES_VERSION,
    NEW_MARK,
    RECORD_NAME,
    Project,
    atomic_dir,
    cache_key,
    default_project_dir,
    file_sha256,
    frame_file,
    temp_beside,
)
from vedit.settings import MAX_SIDE, ExtractSettings, FrameSize, as_record
from vedit.video import TIME_EPSILON, VideoInfo, first_frame_at, fit_frame, probe, read_frames


@dataclass(frozen=True)
class FramePlan:
    """Which source frames to take, and the size they are written at."""

    indices: list[int]
    times: list[float]
    interval: float  # seconds between consecutive sampled frames
    width: int
    height: int


@dataclass
class ExtractResult:
    """What `extract` produced; `reused` when the project already had these exact frames."""

    project: Path
    frames: list[Path]
    width: int
    height: int
    times: list[float]
    audio: Path | None
    reused: bool
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "project": str(self.project),
            "frames": [str(p) for p in self.frames],
            "frame_count": len(self.frames),
            "width": self.width,
            "height": self.height,
            "times": self.times,
            "audio": str(self.audio) if self.audio else None,
            "reused": self.reused,
            "source": self.source,
        }


def select_frames(frame_times: list[float], fps: Fraction, settings: ExtractSettings,
                  *, name: str = "the clip") -> tuple[list[int], float]:
    """Indices into `frame_times` to take, and the sampling interval in seconds."""
    first = first_frame_at(frame_times, settings.start)
    stop = len(frame_times) if settings.end is None else first_frame_at(frame_times, settings.end)
    window = frame_times[first:stop]
    if not window:
        raise BadInputError(
            f"{name} has no frames between {settings.start:g} s and "
            f"{_fmt_end(settings.end)} (it has {len(frame_times)} frames, "
            f"{frame_times[-1] if frame_times else 0:.2f} s).",
            "Choose --start/--end inside the clip.")
    if settings.spread:
        span_end = settings.end if settings.end is not None else window[-1] + float(1 / fps)
        interval = (span_end - window[0]) / settings.frame_count
        available = len(window)
    else:
        interval = float(settings.stride / fps)
        available = _available(window, interval)
    if settings.frame_count > available:
        raise BadInputError(_too_few_message(name, frame_times, window, fps, settings, available),
                            _too_few_hint(window, fps, settings, available))
    targets = [window[0] + i * interval for i in range(settings.frame_count)]
    return [first + _nearest(window, t) for t in targets], interval


def _nearest(times: list[float], target: float) -> int:
    """Index of the frame shown nearest to `target`; ties go to the earlier frame."""
    right = bisect.bisect_left(times, target)
    if right == 0:
        return 0
    if right == len(times):
        return len(times) - 1
    return right - 1 if target - times[right - 1] <= times[right] - target else right


def _fmt_end(end: float | None) -> str:
    return f"{end:g} s" if end is not None else "its end"


def _too_few_message(name: str, frame_times: list[float], window: list[float], fps: Fraction,
                     settings: ExtractSettings, available: int) -> str:
    span = f"{len(window)} frames from {window[0]:.2f} s" if window else "no frames"
    how = "spread evenly" if settings.spread else f"at stride {settings.stride}"
    return (f"{name} has {span} ({len(frame_times)} in all, {float(fps):.4g} fps): "
            f"{how} that gives {available} frames, but {settings.frame_count} were asked.")


def _available(window: list[float], interval: float) -> int:
    """How many targets `interval` apart fit between the window's first and last frame."""
    return int((window[-1] - window[0]) / interval + TIME_EPSILON) + 1


def _too_few_hint(window: list[float], fps: Fraction, settings: ExtractSettings,
                  available: int) -> str:
    options = [f"--frames {available}"]
    if not settings.spread:
        fitting = [s for s in range(settings.stride - 1, 0, -1)
                   if _available(window, float(s / fps)) >= settings.frame_count]
        if fitting:
            options.append(f"--stride {fitting[0]}")
    if settings.start > 0:
        options.append("an earlier --start")
    return "Use " + " or ".join(options) + "."


def output_size(width: int, height: int, size: FrameSize, crop: bool) -> tuple[int, int]:
    """Frame size for a source of `width` x `height`: short side kept to `size`, sides % 8."""
    if size.short_side is None:
        return size.width or 0, size.height or 0
    if crop:
        return size.short_side, size.short_side
    short, long = sorted((width, height))
    long_side = max(8, round(long * size.short_side / short / 8) * 8)
    return (long_side, size.short_side) if width >= height else (size.short_side, long_side)


def plan_frames(info: VideoInfo, settings: ExtractSettings) -> FramePlan:
    """Choose the frames and their size; raises BadInputError when the clip cannot give them."""
    indices, interval = select_frames(info.frame_times, info.fps, settings, name=info.path.name)
    width, height = output_size(info.width, info.height, settings.frame_size, settings.crop)
    if max(width, height) > MAX_SIDE:  # a very narrow clip: the long side follows the short
        raise BadInputError(
            f"{info.path.name} is {info.width}x{info.height}: at --size "
            f"{settings.frame_size} its frames would be {width}x{height}, over {MAX_SIDE} "
            "pixels a side.",
            "Give a smaller --size, an exact one (--size WIDTHxHEIGHT) or a square crop "
            "(--crop).")
    return FramePlan(indices=indices, times=[info.frame_times[i] for i in indices],
                     interval=interval, width=width, height=height)


def source_record(info: VideoInfo, sha256: str) -> dict[str, Any]:
    """The clip's facts as stored in the project record."""
    video = {"codec": info.codec, "width": info.width, "height": info.height,
             "rotation": info.rotation, "fps": float(info.fps), "fps_exact": str(info.fps),
             "frame_count": info.frame_count, "variable_rate": info.variable_rate}
    audio_facts = None
    if info.audio is not None:
        audio_facts = {"codec": info.audio.codec, "sample_rate": info.audio.sample_rate,
                       "channels": info.audio.channels, "offset": info.audio.offset,
                       "duration": info.audio.duration}
    return {"path": str(info.path.resolve()), "name": info.path.name, "sha256": sha256,
            "size_bytes": info.path.stat().st_size, "container": info.container,
            "duration": round(info.duration, 6), "video": video, "audio": audio_facts}


def extract(clip: Path, project_dir: Path | None = None, settings: ExtractSettings | None = None,
            reporter: Reporter | None = None) -> ExtractResult:
    """Take frames of `clip` into the project at `project_dir` (made if needed; default: the
    clip's name + .vedit, beside it), with its audio."""
    settings = settings or ExtractSettings()
    settings = dataclasses.replace(settings, frames=settings.frame_count)  # recorded as a number
    reporter = reporter or Reporter()
    project_dir = Path(project_dir) if project_dir is not None else default_project_dir(clip)
    Project.check_usable(project_dir, replacing=EXTRACT_SECTIONS)
    info = probe(Path(clip))
    plan = plan_frames(info, settings)
    created = not (project_dir / RECORD_NAME).exists()
    project = Project.open_or_create(project_dir, replacing=EXTRACT_SECTIONS)
    with project.lock("extract"):  # a second vedit here stops at once, touching nothing
        try:
            return _extract_into(project, info, plan, settings, reporter)
        except BaseException:
            if created:
                _remove_new_project(project)
            raise


def _extract_into(project: Project, info: VideoInfo, plan: FramePlan, settings: ExtractSettings,
                  reporter: Reporter) -> ExtractResult:
    started = time.monotonic()
    _settle(project)  # what an extract stopped midway left: put in place, or dropped
    with reporter.task("hashing the clip", total=None):
        sha256 = file_sha256(info.path)
    key = cache_key(FRAMES_VERSION, sha256, as_record(settings))
    frames = project.section("frames")
    suffix = audio.audio_suffix(info.audio.codec) if info.audio else None
    audio_path = project.audio_path(suffix) if suffix else None
    if frames and frames.get("key") == key and _outputs_present(project, frames, audio_path):
        reporter.info(f"Frames in {project.root} are up to date; nothing to do.")
        return _result(project, frames, info, sha256, reused=True)

    # The new frames and sound are written beside the old ones, and the record names them
    # once they are whole: at every moment it describes files that are all there, the old
    # ones or the new ones, never a mix (a kill included).
    new_audio = project.audio_path(suffix, new=True) if suffix else None
    audio_temp = _copy_audio(info, new_audio, reporter) if new_audio else None
    staging = temp_beside(project.new_frames_dir)
    staging.mkdir()
    try:
        with reporter.task("decoding frames", total=len(plan.indices)) as task:
            # plan.indices never decrease, so read_frames yields them in plan order.
            for position, (_, image) in enumerate(read_frames(info, plan.indices)):
                fitted = fit_frame(image.convert("RGB"), plan.width, plan.height)
                fitted.save(staging / frame_file(position), compress_level=1)
                task.advance()
        os.replace(staging, project.new_frames_dir)
        if audio_temp is not None and new_audio is not None:
            os.replace(audio_temp, new_audio)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if audio_temp is not None:
            audio_temp.unlink(missing_ok=True)
    if audio_temp is None:
        new_audio = None
        reporter.info(f"{info.path.name} has no audio; edits will be silent.")

    project.record.update(
        format=FORMAT,
        source=source_record(info, sha256) | {
            "audio_file": new_audio.relative_to(project.root).as_posix() if new_audio else None},
        extract=as_record(settings),
        frames={"key": key, "count": len(plan.indices), "width": plan.width,
                "height": plan.height, "interval": plan.interval,
                "fps": round(1 / plan.interval, 6), "times": plan.times,
                "source_indices": plan.indices, "dir": project.new_frames_dir.name,
                "seconds": round(time.monotonic() - started, 3)},
    )
    project.save()  # the new frames are the project's from here on
    _settle(project)
    return _result(project, project.record["frames"], info, sha256, reused=False)


def _settle(project: Project) -> None:
    """Give the frames and sound the record names under a new extract's names (frames.new/,
    source/audio.new.*) their usual ones, then remove what the record does not name. Each file
    is linked to its usual name before the record names that, so it always names whole files."""
    frames = project.section("frames")
    source = project.section("source")
    sound = project.source_audio()
    moved = False
    if frames is not None and frames.get("dir") == project.new_frames_dir.name:
        with atomic_dir(project.frames_dir) as staging:
            for image in sorted(project.frames_folder().glob("*.png")):
                _link_or_copy(image, staging / image.name)
        frames["dir"] = FRAMES_DIR
        moved = True
    if source is not None and sound is not None and NEW_MARK in sound.name:
        usual = project.audio_path(sound.name.split(NEW_MARK, 1)[1])
        temp = temp_beside(usual)
        _link_or_copy(sound, temp)
        os.replace(temp, usual)
        source["audio_file"] = usual.relative_to(project.root).as_posix()
        moved = True
    if moved:
        project.save()
    _drop_unnamed(project)


def _drop_unnamed(project: Project) -> None:
    """Remove frames and sound the record does not name: an earlier extract's, or those of an
    extract stopped before the record named them."""
    named = project.frames_folder() if project.section("frames") is not None else None
    for folder in (project.frames_dir, project.new_frames_dir):
        if folder != named and folder.is_dir():
            shutil.rmtree(folder)
    sound = project.source_audio()
    for stale in project.audio_files():
        if stale != sound:
            stale.unlink()


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a second name of `source` where the file system allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _copy_audio(info: VideoInfo, audio_path: Path, reporter: Reporter) -> Path | None:
    """The clip's audio packets copied beside their final place; None (and a warning) when the
    audio stream cannot be read, so a clip with broken sound still gives a (silent) project."""
    temp = temp_beside(audio_path)
    try:
        audio.copy_audio(info.path, temp)
    except BadInputError as exc:
        temp.unlink(missing_ok=True)
        reporter.warn(f"{exc.message} The project will be silent.")
        return None
    return temp


def _outputs_present(project: Project, frames: dict[str, Any], audio_path: Path | None) -> bool:
    audio_ok = audio_path is None or audio_path.is_file()
    return audio_ok and len(project.frame_paths()) == frames.get("count")


def _result(project: Project, frames: dict[str, Any], info: VideoInfo, sha256: str,
            *, reused: bool) -> ExtractResult:
    return ExtractResult(
        project=project.root, frames=project.frame_paths(), width=frames["width"],
        height=frames["height"], times=list(frames["times"]),
        audio=project.source_audio(), reused=reused,
        source=source_record(info, sha256),
    )


def _remove_new_project(project: Project) -> None:
    """Undo a project this call created, so a failed extract leaves nothing behind."""
    shutil.rmtree(project.root, ignore_errors=True)
