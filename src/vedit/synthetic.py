"""Make short test clips in code: moving shapes, an optional tone, rotation or a variable rate.

Shipped in the package (not only the tests) so that `vedit demo` and users' bug reports can
make the same clips the tests use, with no file to download.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vedit.video import encoder_stream


def make_clip(
    path: Path,
    *,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    seconds: float = 2.0,
    audio: bool = True,
    sample_rate: int = 44100,
    tone_hz: float = 440.0,
    rotation: int = 0,
    frame_times: list[float] | None = None,
) -> Path:
    """Write an H.264 clip of a square crossing a gradient, with an AAC tone when `audio`.

    `rotation` stores display-matrix metadata (degrees counter-clockwise, as ffmpeg reads it)
    without rotating the pixels. `frame_times` (seconds) makes a variable-frame-rate clip;
    otherwise frames are 1/fps apart for `seconds`.
    """
    if frame_times is None:
        frame_times = [i / fps for i in range(round(seconds * fps))]
    times = frame_times
    time_base = Fraction(1, fps * 1000)
    with av.open(str(path), "w") as container:
        video = encoder_stream(container, "libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.time_base = time_base
        video.codec_context.time_base = time_base
        video.options = {"preset": "ultrafast", "crf": "18", "bf": "0"}
        if rotation:
            video.set_display_rotation(rotation)
        sound = encoder_stream(container, "aac", rate=sample_rate, layout="mono") if audio else None
        for index, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(pattern(width, height, index, len(times)), "rgb24")
            frame.pts = round(Fraction(t).limit_denominator(10**6) / time_base)
            frame.time_base = time_base
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            duration = times[-1] + 1 / fps if times else 0.0
            _write_tone(container, sound, duration, sample_rate, tone_hz)
    return path


def pattern(width: int, height: int, index: int, count: int) -> np.ndarray:
    """A horizontal gradient with a white square moving left to right and a frame-coloured bar."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    image = np.concatenate([np.broadcast_to(x, (height, width, 1)),
                            np.broadcast_to(y, (height, width, 1)),
                            np.full((height, width, 1), 96, np.float32)], axis=2).copy()
    side = max(4, min(width, height) // 4)
    left = round((width - side) * index / max(1, count - 1))
    top = (height - side) // 2
    image[top:top + side, left:left + side] = 255
    image[: max(2, height // 16), :, 2] = (index * 37) % 256
    frame: np.ndarray = image.astype(np.uint8)
    return frame


def _write_tone(container: av.container.OutputContainer, stream: av.AudioStream,
                seconds: float, sample_rate: int, tone_hz: float) -> None:
    frame_size = stream.codec_context.frame_size or 1024
    total = math.ceil(seconds * sample_rate)
    for start in range(0, total, frame_size):
        n = min(frame_size, total - start)
        t = (np.arange(start, start + n) / sample_rate).astype(np.float32)
        samples = (0.2 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


if __name__ == "__main__":
    import sys

    print(make_clip(Path(sys.argv[1] if len(sys.argv) > 1 else "demo.mp4"), seconds=3.0))
