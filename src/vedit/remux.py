"""The remux stage: put the project's original sound back under an edit's video.

The sound is taken from the time the project's first frame was taken at, for exactly as long
as the video lasts, so it lines up with the motion it came with.
"""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

from vedit.audio import MuxResult, mux
from vedit.errors import BadInputError, ProjectError, UsageError
from vedit.progress import Reporter
from vedit.project import EDIT_VIDEO, FINAL_VIDEO, Project, atomic_file


def audio_start(project: Project) -> float:
    """Seconds into the project's audio file where its first frame's sound begins."""
    frames = project.require("frames", "extract")
    source = project.require("source", "extract")
    offset = float((source.get("audio") or {}).get("offset", 0.0))
    return float(frames["times"][0]) - offset


def check_output(target: Path) -> None:
    """An output is a new path or a regular file it replaces: never a folder, a device (as
    root, `-o /dev/null` would become a file) or a link, which the final rename would replace."""
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
                else "not a regular file")
        raise BadInputError(f"--output {target} is {kind}.",
                            "Give the path of a new file (or of a video file to replace).")


def default_output(video: Path) -> Path:
    return video.with_name(f"{video.stem}.final.mp4")


def remux(project_dir: Path, edits: list[str] | None = None, *, video: Path | None = None,
          output: Path | None = None, reporter: Reporter | None = None) -> list[MuxResult]:
    """Mux the named edits (all when none are named), or any `video`, with the project's sound."""
    reporter = reporter or Reporter()
    if video is not None and edits:
        raise UsageError("Name edits or give --video, not both.",
                         "`vedit remux P` muxes every edit; --video muxes one other file.")
    if video is None and output is not None:
        raise UsageError("--output goes with --video only.",
                         "Edits are written to edits/NAME/final.mp4.")
    project = Project.open(Path(project_dir))
    sound = project.source_audio()
    start = audio_start(project)
    if sound is None:
        reporter.info("The source clip has no audio: the result has video only.")
    if video is not None:
        return [_mux_one(Path(video), sound, output or default_output(Path(video)), start)]
    names = edits or project.edit_names()
    if not names:
        raise ProjectError(f"Project {project.root} has no edits yet.",
                           "Run `vedit edit` first, or give any video with --video FILE.")
    results = []
    with project.lock("remux"), reporter.task("muxing", total=len(names)) as task:
        for name in names:
            video_file = project.edit_file(name, EDIT_VIDEO)
            if not video_file.is_file():
                known = ", ".join(project.edit_names()) or "none"
                raise BadInputError(f"No edit named {name!r} in {project.root}.",
                                    f"Known edits: {known}.")
            results.append(_mux_one(video_file, sound, project.edit_file(name, FINAL_VIDEO),
                                    start))
            task.advance()
    return results


def _mux_one(video: Path, sound: Path | None, target: Path, start: float) -> MuxResult:
    if not video.is_file():
        raise BadInputError(f"{video} does not exist.", "Check the --video path.")
    if target.resolve() == video.resolve():
        raise BadInputError(f"--output {target} would overwrite the input video.",
                            "Choose another --output.")
    check_output(target)
    with atomic_file(target) as temp:
        result = mux(video, sound, temp, audio_from=start)
    return dataclasses.replace(result, path=target)
