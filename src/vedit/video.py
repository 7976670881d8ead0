"""Reading clips with PyAV: probe a file's facts, then decode chosen frames upright.

Times are seconds of clip time: 0 is the presentation time of the clip's first video frame,
so the same numbers address video frames and, shifted by the audio's offset, the sound.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np
from PIL import Image

from vedit.errors import BadInputError, EnvironmentProblem

#: Times closer than this (seconds) are the same time: a frame exactly at --end is past it.
TIME_EPSILON = 1e-6


@dataclass(frozen=True)
class AudioInfo:
    """The clip's first audio stream, as found; it is copied untouched into the project."""

    codec: str
    sample_rate: int
    channels: int
    offset: float  # seconds from the first video frame to the audio's first sample
    duration: float | None


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a clip: enough to choose frames without decoding them all."""

    path: Path
    container: str
    codec: str
    width: int  # as displayed, after rotation
    height: int
    rotation: int  # counter-clockwise degrees of the display matrix
    fps: Fraction  # average frame rate
    frame_times: list[float] = field(repr=False)  # clip time of every frame, in order
    frame_pts: list[int] = field(repr=False)  # their pts, to find them while decoding
    has_dts: bool  # every packet has a decode time (mp4 needs them to copy the stream)
    time_base: Fraction = Fraction(1)
    audio: AudioInfo | None = None

    @property
    def frame_count(self) -> int:
        return len(self.frame_times)

    @property
    def duration(self) -> float:
        """From the first frame's start to the last frame's end."""
        return self.frame_times[-1] + float(1 / self.fps) if self.frame_times else 0.0

    @property
    def variable_rate(self) -> bool:
        times = self.frame_times
        steps = {round(b - a, 4) for a, b in itertools.pairwise(times)}
        return len(steps) > 1


def open_input(path: Path) -> av.container.InputContainer:
    """Open a media file for reading; tags that are not UTF-8 are read leniently, not fatally."""
    return av.open(str(path), metadata_errors="replace")


def probe(path: Path) -> VideoInfo:
    """Read a clip's facts: streams, codecs, rotation, and every frame's timestamp."""
    path = Path(path)
    check_clip(path)
    try:
        with open_input(path) as container:
            if not container.streams.video:
                kind = "audio only" if container.streams.audio else "no video stream"
                raise BadInputError(f"{path} has no video ({kind}).", "Give a video clip.")
            stream = container.streams.video[0]
            frame_pts, has_dts = _video_pts(container, stream)
            first = _first_frame(container, stream, path)
            audio = _audio_info(container, frame_pts, time_base(stream))
            fps = _frame_rate(stream, frame_pts)
            return _video_info(path, container, stream, first, fps, frame_pts, audio, has_dts)
    except av.error.FFmpegError as exc:
        raise BadInputError(f"{path} is not a video vedit can read ({_reason(exc)}).",
                            "Check the file plays; re-encode it with ffmpeg if it does.") from None


def check_clip(path: Path) -> None:
    """Refuse a clip path that cannot be a video (missing, a folder, empty) before any work."""
    if not path.exists():
        raise BadInputError(f"{path} does not exist.", "Check the clip's path.")
    if path.is_dir():
        raise BadInputError(f"{path} is a folder, not a clip.", "Give a video file.")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path} is empty (0 bytes).",
                            "The file was not fully written; fetch it again.")


def _video_pts(container: av.container.InputContainer,
               stream: av.VideoStream) -> tuple[list[int], bool]:
    """Every video packet's pts in presentation order, read without decoding, and whether every
    packet has a decode time too."""
    pts: list[int] = []
    has_dts = True
    for index, packet in enumerate(container.demux(stream)):
        if packet.size == 0:
            continue
        pts.append(packet.pts if packet.pts is not None else index)
        has_dts = has_dts and packet.dts is not None
    if not pts:
        raise BadInputError(f"{container.name} has a video stream with no frames.",
                            "The file is truncated or empty; fetch it again.")
    return sorted(set(pts)), has_dts


def _first_frame(container: av.container.InputContainer, stream: av.VideoStream,
                 path: Path) -> av.VideoFrame:
    container.seek(0, stream=stream)
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError:
        pass
    raise BadInputError(f"{path}: its video could not be decoded.",
                        "The file is truncated or damaged; fetch it again.")


def _audio_info(container: av.container.InputContainer, frame_pts: list[int],
                video_time_base: Fraction) -> AudioInfo | None:
    if not container.streams.audio:
        return None
    audio = container.streams.audio[0]
    context = audio.codec_context
    if context is None:  # a stream whose codec FFmpeg does not know: nothing to keep
        return None
    start = float((audio.start_time or 0) * audio.time_base) if audio.time_base else 0.0
    video_start = float(frame_pts[0] * video_time_base)
    duration = (float(audio.duration * audio.time_base)
                if audio.duration and audio.time_base else None)
    return AudioInfo(codec=context.name or "unknown", sample_rate=context.sample_rate or 0,
                     channels=context.channels or 0, offset=round(start - video_start, 6),
                     duration=duration)


def time_base(stream: av.stream.Stream) -> Fraction:
    """The unit of a stream's timestamps; one without any cannot be timed, so is refused."""
    if stream.time_base is None:
        raise BadInputError(f"A stream of {stream.container.name} has no time base.",
                            "Re-encode the file with ffmpeg.")
    return stream.time_base


def _frame_rate(stream: av.VideoStream, frame_pts: list[int]) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return Fraction(rate)
    if len(frame_pts) > 1:
        span = (frame_pts[-1] - frame_pts[0]) * time_base(stream)
        return Fraction(len(frame_pts) - 1) / span
    return Fraction(25)


def _video_info(path: Path, container: av.container.InputContainer, stream: av.VideoStream,
                first: av.VideoFrame, fps: Fraction, frame_pts: list[int],
                audio: AudioInfo | None, has_dts: bool) -> VideoInfo:
    rotation = round(first.rotation or 0) % 360
    width, height = first.width, first.height
    if rotation in (90, 270):
        width, height = height, width
    unit = time_base(stream)
    origin = frame_pts[0]
    return VideoInfo(
        path=path, container=container.format.name, codec=stream.codec_context.name,
        width=width, height=height, rotation=rotation, fps=fps,
        frame_times=[float((p - origin) * unit) for p in frame_pts],
        frame_pts=frame_pts, has_dts=has_dts, time_base=unit, audio=audio,
    )


def read_frames(info: VideoInfo, indices: Sequence[int]) -> Iterator[tuple[int, Image.Image]]:
    """Decode the frames at `indices` (into `info.frame_times`), upright, in order of index.

    Frames are found by pts, so variable frame rates and B-frames cannot shift them.
    """
    wanted: dict[int, list[int]] = {}
    for index in indices:
        wanted.setdefault(info.frame_pts[index], []).append(index)
    remaining = len(indices)
    try:
        with open_input(info.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            container.seek(min(wanted), stream=stream, backward=True)
            for frame in container.decode(stream):
                for index in wanted.pop(frame.pts, []) if frame.pts is not None else []:
                    yield index, upright(frame.to_image(), info.rotation)
                    remaining -= 1
                if remaining == 0:
                    return
    except av.error.FFmpegError as exc:
        raise BadInputError(f"{info.path} could not be decoded ({_reason(exc)}).",
                            "The file is truncated or damaged; fetch it again.") from None
    missing = sorted(i for group in wanted.values() for i in group)
    raise BadInputError(f"{info.path}: frames {missing[:5]} could not be decoded.",
                        "The file is truncated or damaged; fetch it again.")


def read_span(info: VideoInfo, first: int, stop: int) -> Iterator[Image.Image]:
    """Frames `first` to `stop - 1`, upright, one at a time in order: one decoding pass that
    holds a single frame, however long the span."""
    for _, image in read_frames(info, range(first, stop)):
        yield image


def upright(image: Image.Image, rotation: int) -> Image.Image:
    """Apply a display rotation (counter-clockwise degrees) to the pixels."""
    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_270}
    return image.transpose(turns[rotation]) if rotation in turns else image


def fit_frame(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover `width` x `height` keeping the aspect, then crop the centre."""
    cover, (left, top) = cover_and_crop(image.width, image.height, width, height)
    if cover != image.size:
        image = image.resize(cover, Image.Resampling.LANCZOS)
    return image.crop((left, top, left + width, top + height))


def cover_and_crop(source_width: int, source_height: int, width: int,
                   height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`fit_frame`'s geometry: the scaled size (w, h) that covers `width` x `height`, and the
    (left, top) corner of the centre crop in it."""
    scale = max(width / source_width, height / source_height)
    cover = (max(width, round(source_width * scale)), max(height, round(source_height * scale)))
    return cover, ((cover[0] - width) // 2, (cover[1] - height) // 2)


def first_frame_at(frame_times: Sequence[float], seconds: float) -> int:
    """Index of the first frame shown at or after `seconds` (len(frame_times) if none is)."""
    return bisect.bisect_left(frame_times, seconds - TIME_EPSILON)


def _reason(exc: av.error.FFmpegError) -> str:
    return (exc.strerror or type(exc).__name__).rstrip(".").lower()


# -- writing ---------------------------------------------------------------------------------


def encoder_stream(container: av.container.OutputContainer, codec: str,
                   **options: Any) -> Any:
    """A new stream encoding with `codec`. A PyAV build without that encoder is this machine's
    problem, not the input's: it says so, with exit code 9."""
    try:
        return container.add_stream(codec, **options)
    except (ValueError, av.error.FFmpegError) as exc:
        raise EnvironmentProblem(f"This PyAV cannot encode {codec} ({exc}).",
                                 "Run `vedit doctor`; PyAV's wheels from PyPI bundle FFmpeg with "
                                 "x264 and AAC.") from None


class Mp4Writer:
    """H.264 yuv420p mp4 (plays in browsers and phones) written a frame at a time, each at its
    timestamp, so a long edit streams to disk instead of waiting whole in memory.

    `times` are seconds (a variable rate is kept; the first frame starts the video);
    `interval` is how long the last frame shows, so the video lasts `times[-1] - times[0] +
    interval`. Use as a context manager; `add` the frames in order."""

    def __init__(self, path: Path, times: Sequence[float], interval: float) -> None:
        self.times, self.count = list(times), 0
        self.rate = Fraction(1 / interval).limit_denominator(1001)
        self.time_base = Fraction(1, 90000)
        self.container = av.open(str(path), "w", format="mp4",
                                 options={"movflags": "+faststart"})
        self.stream: Any = None

    def add(self, image: np.ndarray) -> None:
        if self.stream is None:
            self.stream = encoder_stream(self.container, "libx264", rate=self.rate)
            self.stream.height, self.stream.width = image.shape[:2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.time_base = self.stream.codec_context.time_base = self.time_base
            self.stream.options = {"crf": "17", "preset": "medium"}
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = round((self.times[self.count] - self.times[0]) / self.time_base)
        frame.time_base = self.time_base
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.stream is not None and exc[0] is None:
                self.container.mux(self.stream.encode())
        finally:
            self.container.close()


def write_mp4(path: Path, frames: Iterable[np.ndarray], times: Sequence[float],
              interval: float) -> None:
    """Write RGB frames as an H.264 mp4 at their timestamps (see `Mp4Writer`)."""
    with Mp4Writer(path, times, interval) as writer:
        for image in frames:
            writer.add(image)


def write_gif(path: Path, frames: Sequence[np.ndarray], interval: float) -> None:
    """A looping animated GIF, each frame shown for `interval` seconds."""
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(interval * 1000)), loop=0)
