"""remux: the original sound under an edit, from the right moment, for exactly as long."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
from clips import audio_packets, stream_durations

from vedit.errors import BadInputError, ProjectError, UsageError
from vedit.extract import extract
from vedit.remux import remux
from vedit.settings import ExtractSettings
from vedit.synthetic import make_clip
from vedit.video import probe

AAC_FRAME = 1024 / 44100  # seconds of sound in one AAC packet of the test clips
SAMPLE = 1 / 44100


def audio_end(path: Path) -> float:
    """Seconds at which a file's last audio packet ends, as its sample table times it."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        last = [p for p in container.demux(stream) if p.pts is not None][-1]
        return float((last.pts + last.duration) * stream.time_base)


def assert_sound_lasts_as_the_video(path: Path, seconds: float) -> None:
    """The video lasts `seconds`, and the sound ends with it, to the sample: the container's
    duration and the last packet's end (cut short where a copied packet ran past)."""
    durations = stream_durations(path)
    assert durations["video"] == pytest.approx(seconds, abs=1e-3)
    assert durations["audio"] == pytest.approx(durations["video"], abs=SAMPLE)
    assert audio_end(path) == pytest.approx(durations["video"], abs=SAMPLE)


def _edit(project: Path, name: str, seconds: float) -> Path:
    """Stand in for `vedit edit`: an edit folder with its silent video.mp4."""
    folder = project / "edits" / name
    folder.mkdir(parents=True)
    return make_clip(folder / "video.mp4", width=64, height=64, fps=25, seconds=seconds,
                     audio=False)


@pytest.fixture()
def project(tmp_path: Path, clip_720p: Path) -> Path:
    # 8 frames every 2nd frame from 0.4 s: they span 0.4 s to 1.04 s of the clip.
    extract(clip_720p, tmp_path / "p", ExtractSettings(frames=8, start=0.4, size="64"))
    return tmp_path / "p"


def test_every_edit_gets_the_sound_of_its_span(project: Path, clip_720p: Path) -> None:
    _edit(project, "cat", 0.64)
    _edit(project, "dog", 0.64)
    results = remux(project)
    assert [r.path for r in results] == [project / "edits" / n / "final.mp4"
                                         for n in ("cat", "dog")]
    source_packets = audio_packets(clip_720p)
    first = round(0.4 / AAC_FRAME)  # the packet that starts nearest 0.4 s
    for result in results:
        assert result.audio_mode == "copy"
        assert_sound_lasts_as_the_video(result.path, 0.64)
        assert result.audio_duration == pytest.approx(0.64, abs=SAMPLE)
        final_packets = audio_packets(result.path)
        assert final_packets == source_packets[first:first + len(final_packets)]  # untouched
        assert probe(result.path).frame_count == 16


def test_named_edits_only(project: Path) -> None:
    _edit(project, "cat", 0.64)
    _edit(project, "dog", 0.64)
    results = remux(project, ["dog"])
    assert [r.path.parent.name for r in results] == ["dog"]
    assert not (project / "edits" / "cat" / "final.mp4").exists()


def test_unknown_edit_and_no_edits_are_clear_errors(project: Path) -> None:
    with pytest.raises(ProjectError, match="no edits yet"):
        remux(project)
    _edit(project, "cat", 0.64)
    with pytest.raises(BadInputError, match="No edit named 'bird'") as caught:
        remux(project, ["bird"])
    assert "cat" in caught.value.hint
    with pytest.raises(ProjectError, match="outside the project"):
        remux(project, ["../../etc"])


def test_any_video_can_be_given(project: Path, tmp_path: Path) -> None:
    render = make_clip(tmp_path / "render.mp4", width=64, height=48, fps=25, seconds=1.2,
                       audio=False)
    [result] = remux(project, video=render)
    assert result.path == tmp_path / "render.final.mp4"
    assert result.audio_mode == "copy"
    assert_sound_lasts_as_the_video(result.path, 1.2)
    [elsewhere] = remux(project, video=render, output=tmp_path / "out" / "x.mp4")
    assert elsewhere.path.is_file()
    with pytest.raises(BadInputError, match="overwrite the input"):
        remux(project, video=render, output=render)


def test_sound_shorter_than_the_video_is_padded_to_length(project: Path, tmp_path: Path) -> None:
    # The clip's sound ends at 2.0 s; a 2.4 s render from 0.4 s needs 0.8 s of silence added.
    render = make_clip(tmp_path / "long.mp4", width=64, height=48, fps=25, seconds=2.4,
                       audio=False)
    [result] = remux(project, video=render)
    assert result.audio_mode == "aac"
    assert_sound_lasts_as_the_video(result.path, 2.4)


def test_a_silent_source_gives_video_only(tmp_path: Path, clip_silent: Path) -> None:
    extract(clip_silent, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    _edit(tmp_path / "p", "cat", 0.5)
    [result] = remux(tmp_path / "p")
    assert result.audio_mode == "none"
    assert set(stream_durations(result.path)) == {"video"}


def test_sound_mp4_cannot_hold_is_re_encoded_to_the_exact_length(tmp_path: Path,
                                                                   clip_pcm_mkv: Path) -> None:
    extract(clip_pcm_mkv, tmp_path / "p", ExtractSettings(frames=4, stride=1, size="64"))
    _edit(tmp_path / "p", "cat", 0.6)
    [result] = remux(tmp_path / "p")
    assert result.audio_mode == "aac"
    assert_sound_lasts_as_the_video(result.path, 0.6)


def test_a_video_mp4_cannot_hold_as_is_is_re_encoded(project: Path, clip_pcm_mkv: Path,
                                                     tmp_path: Path) -> None:
    # Matroska with B-frames carries no decode timestamps, which mp4 needs.
    [result] = remux(project, video=clip_pcm_mkv, output=tmp_path / "x.mp4")
    assert result.video_mode == "h264"
    assert probe(result.path).frame_count == 25


def test_options_that_do_not_go_together(project: Path, tmp_path: Path) -> None:
    render = make_clip(tmp_path / "render.mp4", width=64, height=48, fps=25, seconds=0.5,
                       audio=False)
    with pytest.raises(UsageError, match="--output goes with --video"):
        remux(project, output=tmp_path / "x.mp4")
    with pytest.raises(UsageError, match="not both"):
        remux(project, ["cat"], video=render)
