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


# -- other containers, made the way ffmpeg users make them -----------------------------------

CONTAINER_SIZE = (128, 96)
CONTAINER_FRAMES = 50  # 2 s at 25 fps


def _bframe_clip(path: Path) -> Path:
    """H.264 with B-frames (x264's defaults) and an AAC tone, frames numbered by their bar."""
    from vedit.synthetic import pattern

    width, height = CONTAINER_SIZE
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "12", "bf": "2", "g": "12"}
        for i in range(CONTAINER_FRAMES):
            image = pattern(width, height, i, CONTAINER_FRAMES)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, "rgb24")))
        container.mux(video.encode())
    return path


def remux_packets(source: Path, target: Path, *, container_format: str | None = None,
                  cut: float = 0.0, kinds: tuple[str, ...] = ("video", "audio")) -> Path:
    """Copy the packets of `source` into another container, as `ffmpeg -c copy` does; `cut`
    seconds start earlier (negative times), which mp4 writes as an edit list, as
    `ffmpeg -ss CUT -i in.mp4 -c copy out.mp4` does."""
    with av.open(str(source)) as inp, \
            av.open(str(target), "w", format=container_format) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams
                   if s.type in kinds}
        for packet in inp.demux():
            if packet.size == 0 or packet.stream.index not in streams:
                continue
            shift = round(cut / packet.stream.time_base)
            packet.pts = None if packet.pts is None else packet.pts - shift
            packet.dts = None if packet.dts is None else packet.dts - shift
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return target


def _mpeg2_ts(path: Path) -> Path:
    from vedit.synthetic import pattern

    width, height = CONTAINER_SIZE
    with av.open(str(path), "w", format="mpegts") as container:
        video = container.add_stream("mpeg2video", rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"qscale": "2", "bf": "2", "g": "12"}
        for i in range(CONTAINER_FRAMES):
            frame = av.VideoFrame.from_ndarray(pattern(width, height, i, CONTAINER_FRAMES),
                                               "rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
    return path


#: name -> (file name, index of the source frame shown first, frame count)
CONTAINERS = {
    "mp4 with an edit list": ("cut.mp4", 18, CONTAINER_FRAMES - 18),
    "H.264 in MPEG-TS": ("h264.ts", 0, CONTAINER_FRAMES),
    "MPEG-2 in MPEG-TS": ("mpeg2.ts", 0, CONTAINER_FRAMES),
    "raw H.264": ("raw.h264", 0, CONTAINER_FRAMES),
    "JPEG still": ("still.jpg", 3, 1),
}


@pytest.fixture(scope="session")
def container_clips(clip_dir: Path) -> dict[str, Path]:
    """One clip of each kind in CONTAINERS, made in code."""
    from PIL import Image

    from vedit.synthetic import pattern

    base = _bframe_clip(clip_dir / "bframes.mp4")
    with_sound = make_clip(clip_dir / "sound.mp4", width=CONTAINER_SIZE[0],
                           height=CONTAINER_SIZE[1], fps=25, seconds=2.0)
    folder = clip_dir / "containers"
    folder.mkdir()
    made = {
        "mp4 with an edit list": remux_packets(with_sound, folder / "cut.mp4", cut=0.72),
        "H.264 in MPEG-TS": remux_packets(base, folder / "h264.ts", container_format="mpegts"),
        "MPEG-2 in MPEG-TS": _mpeg2_ts(folder / "mpeg2.ts"),
        "raw H.264": remux_packets(base, folder / "raw.h264", container_format="h264",
                                   kinds=("video",)),
    }
    still = folder / "still.jpg"
    Image.fromarray(pattern(*CONTAINER_SIZE, 3, CONTAINER_FRAMES)).save(still, quality=95)
    made["JPEG still"] = still
    return made


def frame_number(image: np.ndarray, count: int = CONTAINER_FRAMES) -> int:
    """Which frame of `vedit.synthetic.pattern` (of `count`) an image shows, from where its
    white square is: it moves about two pixels a frame at 128 pixels wide."""
    height, width = image.shape[:2]
    side = max(4, min(width, height) // 4)
    white = np.flatnonzero(image[height // 2, :, 1:].min(axis=1) > 200)
    left = float(white.mean()) - (side - 1) / 2
    return round(left * (count - 1) / (width - side))
