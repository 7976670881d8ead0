"""Real encoded clips for the tests, made once per session with `vedit.synthetic.make_clip`."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from vedit.synthetic import make_clip


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="session")
def clip_720p(clip_dir: Path) -> Path:
    """1280x720, 25 fps, 2 s, with an AAC tone."""
    return make_clip(clip_dir / "wide.mp4", width=1280, height=720, fps=25, seconds=2.0)


@pytest.fixture(scope="session")
def clip_qcif(clip_dir: Path) -> Path:
    """176x144 (an odd, small size), 30 fps, 1 s, with sound."""
    return make_clip(clip_dir / "qcif.mp4", width=176, height=144, fps=30, seconds=1.0)


@pytest.fixture(scope="session")
def clip_rotated(clip_dir: Path) -> Path:
    """Stored 176x144 with a 90 degree display rotation: shown as 144x176."""
    return make_clip(clip_dir / "rotated.mp4", width=176, height=144, fps=30, seconds=1.0,
                     rotation=90, audio=False)


@pytest.fixture(scope="session")
def clip_silent(clip_dir: Path) -> Path:
    return make_clip(clip_dir / "silent.mp4", width=160, height=120, fps=24, seconds=1.0,
                     audio=False)


VFR_TIMES = [0.0, 0.04, 0.2, 0.22, 0.3, 0.5, 0.52, 0.54, 0.9, 1.0, 1.3, 1.32]


@pytest.fixture(scope="session")
def clip_vfr(clip_dir: Path) -> Path:
    """Frames at irregular times (VFR_TIMES), nominal 25 fps."""
    return make_clip(clip_dir / "vfr.mp4", width=160, height=120, fps=25, frame_times=VFR_TIMES)


@pytest.fixture(scope="session")
def audio_only(clip_dir: Path) -> Path:
    path = clip_dir / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100, layout="mono")
        samples = (0.1 * np.sin(np.arange(44100) / 10)).astype(np.float32)
        for start in range(0, 44100, 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 44100, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def clip_pcm_mkv(clip_dir: Path) -> Path:
    """A Matroska clip with PCM sound, which mp4 cannot hold as it is."""
    path = clip_dir / "pcm.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        for i in range(25):
            image = np.full((48, 64, 3), i * 10, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, "rgb24")))
        container.mux(video.encode())
        tone = (3000 * np.sin(np.arange(16000) / 5)).astype(np.int16)
        for start in range(0, 16000, 800):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 800], format="s16",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(sound.encode(frame))
        container.mux(sound.encode())
    return path


def audio_packets(path: Path) -> list[bytes]:
    """The payload of every packet of a file's first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [bytes(p) for p in container.demux(stream) if p.dts is not None]


def stream_durations(path: Path) -> dict[str, float]:
    """Seconds each stream type plays for, as the container states it."""
    with av.open(str(path)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams if s.duration}
