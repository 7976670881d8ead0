"""Sound with PyAV: keep a clip's audio stream untouched, and mux it back under a video.

The project keeps the source's audio packets bit for bit (in an .m4a where mp4 can hold the
codec, else .mka). Muxing copies those packets when mp4 can hold them and they cover the
video; otherwise it re-encodes to AAC, trimmed and padded with silence to the sample.
"""

from __future__ import annotations

import errno
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from vedit.errors import BadInputError
from vedit.video import encoder_stream, open_input, probe, time_base

#: Codecs the mp4 muxer takes as they are; others are re-encoded.
MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}
MP4_VIDEO = {"h264", "hevc", "mpeg4", "av1", "vp9"}

#: A packet with the time (seconds) it is ordered by when streams are interleaved.
Timed = tuple[float, "av.Packet[av.stream.Stream]"]


@dataclass(frozen=True)
class MuxResult:
    """What `mux` wrote: durations in seconds and how the sound got there."""

    path: Path
    video_duration: float
    audio_duration: float | None
    audio_mode: str  # "copy", "aac" (re-encoded) or "none"
    video_mode: str  # "copy" or "h264" (re-encoded)

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "video_duration": round(self.video_duration, 4),
                "audio_duration": None if self.audio_duration is None
                else round(self.audio_duration, 4),
                "audio": self.audio_mode, "video": self.video_mode}


def audio_suffix(codec: str) -> str:
    """Where a codec's packets can be kept without re-encoding: mp4 audio or Matroska."""
    return ".m4a" if codec in MP4_AUDIO else ".mka"


def copy_audio(source: Path, target: Path) -> int:
    """Copy the first audio stream's packets of `source` into `target`, bytes unchanged;
    returns how many. An audio stream with no readable packet is a BadInputError."""
    container_format = "ipod" if target.suffix == ".m4a" else "matroska"
    copied = 0
    try:
        with open_input(source) as inp, \
                av.open(str(target), "w", format=container_format) as out:
            in_stream = inp.streams.audio[0]
            out_stream = out.add_stream_from_template(in_stream)
            for packet in inp.demux(in_stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                if packet.dts is None:
                    packet.dts = packet.pts
                packet.stream = out_stream
                out.mux(packet)
                copied += 1
    except av.error.FFmpegError as exc:
        raise BadInputError(f"The audio of {source.name} could not be read ({exc.strerror}).",
                            "Re-encode the clip's sound with ffmpeg.") from None
    if not copied or not target.is_file():
        raise BadInputError(f"The audio stream of {source.name} has no readable sound.",
                            "Re-encode the clip's sound with ffmpeg.")
    return copied


def mux(video: Path, audio: Path | None, target: Path, *, audio_from: float = 0.0) -> MuxResult:
    """Write `target` (mp4): the video of `video` with the sound of `audio` from `audio_from`.

    `audio_from` is the time in the audio file, in seconds from its first sample, that lines
    up with the video's first frame. The sound lasts exactly as long as the video.
    """
    info = probe(video)  # one pass over the video's packets: its duration, its decode times
    duration = info.duration
    try:
        with open_input(video) as video_in, \
                av.open(str(target), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            video_packets, video_mode = _video_packets(video_in, out, copy=info.has_dts)
            if audio is None:
                for _, packet in video_packets:
                    out.mux(packet)
                return MuxResult(target, duration, None, "none", video_mode)
            with open_input(audio) as audio_in:
                audio_packets, audio_mode = _audio_packets(audio_in, out, audio_from, duration)
                for _, packet in heapq.merge(video_packets, audio_packets, key=lambda x: x[0]):
                    out.mux(packet)
        audio_duration = _audio_duration(target)
    except av.error.FFmpegError as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk, not a bad video: errors.py says so
        raise BadInputError(
            f"Could not mux {video.name}: {exc.strerror or exc}.",
            "Check that the video plays; re-encode it with ffmpeg if not.") from None
    return MuxResult(target, duration, audio_duration, audio_mode, video_mode)


def _video_packets(inp: av.container.InputContainer, out: av.container.OutputContainer, *,
                   copy: bool) -> tuple[Iterator[Timed], str]:
    """The video's packets copied when mp4 takes its codec and `copy` (it has the decode times
    mp4 needs; Matroska with B-frames leaves them out), else re-encoded to H.264."""
    stream = inp.streams.video[0]
    if stream.codec_context.name in MP4_VIDEO and copy:
        out_stream = out.add_stream_from_template(stream)
        return _copied(inp, stream, out_stream, start=None), "copy"
    return _reencoded_video(inp, stream, out), "h264"


def _copied(inp: av.container.InputContainer, stream: av.stream.Stream,
            out_stream: av.stream.Stream, start: int | None,
            stop: float | None = None) -> Iterator[Timed]:
    """Packets of `stream` re-addressed to `out_stream`, keyed by their time in seconds.

    With `start` (a pts), times are shifted so that pts `start` becomes 0. With `stop`
    (seconds from there), packets that start at or after it are dropped and the one that
    runs past it is cut short to end there: its payload is kept whole, and mp4 records the
    shorter duration (in the sample table and the edit list), as an encoder does for the
    padding of its last frame, so the stream lasts exactly until `stop`.
    """
    base = start
    unit = time_base(stream)
    stop_ts = None if stop is None else round(stop / unit)
    for packet in inp.demux(stream):
        if packet.size == 0 or packet.pts is None or (start is not None and packet.pts < start):
            continue  # the end-of-stream marker, an untimed packet, or before the start
        base = packet.pts if base is None else base
        if packet.dts is None:  # audio: decode time is presentation time
            packet.dts = packet.pts
        offset = packet.dts - base
        if stop_ts is not None and offset >= stop_ts:
            break
        if stop_ts is not None and packet.duration and offset + packet.duration > stop_ts:
            packet.duration = stop_ts - offset
        seconds = float(offset * unit)
        if start is not None:
            packet.pts -= base
            packet.dts -= base
        packet.stream = out_stream
        yield seconds, packet


def _reencoded_video(inp: av.container.InputContainer, stream: av.VideoStream,
                     out: av.container.OutputContainer) -> Iterator[Timed]:
    rate = stream.average_rate or Fraction(25)
    out_stream = encoder_stream(out, "libx264", rate=rate)
    out_stream.width = stream.codec_context.width - stream.codec_context.width % 2
    out_stream.height = stream.codec_context.height - stream.codec_context.height % 2
    out_stream.pix_fmt = "yuv420p"
    out_stream.time_base = stream.time_base
    out_stream.codec_context.time_base = stream.time_base

    def packets() -> Iterator[Timed]:
        for frame in inp.decode(stream):
            frame = frame.reformat(out_stream.width, out_stream.height, "yuv420p")
            for packet in out_stream.encode(frame):
                yield float(packet.dts * packet.time_base), packet
        for packet in out_stream.encode():
            yield float(packet.dts * packet.time_base), packet

    return packets()


def _audio_packets(inp: av.container.InputContainer, out: av.container.OutputContainer,
                   audio_from: float, duration: float) -> tuple[Iterator[Timed], str]:
    stream = inp.streams.audio[0]
    starts = _packet_starts(inp, stream)
    covers = bool(starts) and audio_from >= 0 and starts[-1][1] >= audio_from + duration
    if stream.codec_context.name in MP4_AUDIO and covers:
        begin = min(starts, key=lambda s: abs(s[0] - audio_from))
        inp.seek(0)
        out_stream = out.add_stream_from_template(stream)
        return _copied(inp, stream, out_stream, start=begin[2], stop=duration), "copy"
    inp.seek(0)
    return _reencoded_audio(inp, stream, out, audio_from, duration), "aac"


def _packet_starts(inp: av.container.InputContainer,
                   stream: av.stream.Stream) -> list[tuple[float, float, int]]:
    """(start, end, pts) of every audio packet, in seconds from the first one (one pass)."""
    inp.seek(0)
    spans = []
    first_pts: int | None = None
    unit = time_base(stream)
    for packet in inp.demux(stream):
        if packet.pts is None:
            continue
        first_pts = packet.pts if first_pts is None else first_pts
        start = float((packet.pts - first_pts) * unit)
        spans.append((start, start + float((packet.duration or 0) * unit), packet.pts))
    return spans


def _reencoded_audio(inp: av.container.InputContainer, stream: av.AudioStream,
                     out: av.container.OutputContainer, audio_from: float,
                     duration: float) -> Iterator[Timed]:
    """Decode, cut to [audio_from, audio_from + duration), pad with silence, encode AAC."""
    rate = stream.codec_context.sample_rate or 48000
    # Name the layout by channel count: "1 channels"-style layouts of raw PCM are not AAC's;
    # more than two channels are mixed down to stereo.
    layout = "mono" if stream.codec_context.channels == 1 else "stereo"
    out_stream = encoder_stream(out, "aac", rate=rate, layout=layout)
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    channels = len(out_stream.codec_context.layout.channels)
    total = round(duration * rate)
    skip = round(audio_from * rate)  # negative: silence before the sound starts

    def samples() -> Iterator[np.ndarray]:
        if skip < 0:
            yield np.zeros((channels, -skip), np.float32)
        position = 0
        for frame in inp.decode(stream):
            for chunk in resampler.resample(frame):
                data = chunk.to_ndarray()
                start = max(0, skip - position)
                position += data.shape[1]
                if start < data.shape[1]:
                    yield data[:, start:]
        yield np.zeros((channels, total), np.float32)  # padding; cut to length below

    def packets() -> Iterator[Timed]:
        frame_size = out_stream.codec_context.frame_size or 1024
        for pts, block in _blocks(samples(), total, frame_size):
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, pts
            for packet in out_stream.encode(frame):
                yield float(packet.pts * packet.time_base), packet
        for packet in out_stream.encode():
            yield float(packet.pts * packet.time_base), packet

    return packets()


def _blocks(chunks: Iterator[np.ndarray], total: int,
            size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Regroup sample chunks into blocks of `size` until `total` samples, the last one short."""
    pending: list[np.ndarray] = []
    held, written = 0, 0
    for chunk in chunks:
        pending.append(chunk)
        held += chunk.shape[1]
        while held >= size or (held and written + held >= total):
            joined = np.concatenate(pending, axis=1)
            take = min(size, total - written)
            yield written, np.ascontiguousarray(joined[:, :take])
            written += take
            rest = joined[:, take:]
            pending, held = ([rest], rest.shape[1]) if rest.shape[1] else ([], 0)
            if written >= total:
                return


def _audio_duration(path: Path) -> float | None:
    """The sound's playing time, as the container states it (after AAC priming is skipped)."""
    with open_input(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        if stream.duration:
            return float(stream.duration * time_base(stream))
        return float(container.duration or 0) / av.time_base
