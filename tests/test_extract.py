"""The extract stage on real clips made in code: frame choice, sizes, rotation, audio, record."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from clips import VFR_TIMES, audio_packets
from PIL import Image

from vedit.errors import BadInputError, ProjectError
from vedit.extract import extract, output_size, plan_frames, select_frames
from vedit.project import Project
from vedit.settings import ExtractSettings, FrameSize
from vedit.video import VideoInfo, probe

# -- choosing frames (pure) ------------------------------------------------------------------

CFR_10 = [i / 10 for i in range(80)]  # 80 frames at 10 fps, like car-turn.mp4


def test_stride_takes_every_kth_frame_from_the_start() -> None:
    indices, interval = select_frames(CFR_10, Fraction(10), ExtractSettings(frames=24, stride=2))
    assert indices == list(range(0, 48, 2))
    assert interval == pytest.approx(0.2)


def test_start_and_end_bound_the_frames() -> None:
    settings = ExtractSettings(frames=5, stride=3, start=1.0, end=4.0)
    indices, _ = select_frames(CFR_10, Fraction(10), settings)
    assert indices == [10, 13, 16, 19, 22]


def test_spread_divides_the_span_evenly() -> None:
    indices, interval = select_frames(CFR_10, Fraction(10),
                                      ExtractSettings(frames=8, spread=True))
    assert indices == list(range(0, 80, 10))
    assert interval == pytest.approx(1.0)
    indices, _ = select_frames(CFR_10, Fraction(10),
                               ExtractSettings(frames=4, spread=True, start=2.0, end=4.0))
    assert indices == [20, 25, 30, 35]


def test_variable_frame_rate_is_sampled_by_time_not_by_index() -> None:
    # Nominal 25 fps, stride 5: targets every 0.2 s; each takes the frame shown nearest to it.
    indices, interval = select_frames(VFR_TIMES, Fraction(25), ExtractSettings(frames=7, stride=5))
    assert interval == pytest.approx(0.2)
    assert [VFR_TIMES[i] for i in indices] == [0.0, 0.2, 0.5, 0.54, 0.9, 1.0, 1.3]


def test_too_many_frames_says_how_many_there_are_and_what_fits() -> None:
    with pytest.raises(BadInputError) as caught:
        select_frames(CFR_10, Fraction(10), ExtractSettings(frames=48, stride=2), name="car.mp4")
    assert "car.mp4 has 80 frames" in caught.value.message
    assert "gives 40 frames, but 48 were asked" in caught.value.message
    assert caught.value.hint == "Use --frames 40 or --stride 1."


def test_a_window_with_no_frames_is_refused() -> None:
    with pytest.raises(BadInputError, match="no frames between 9"):
        select_frames(CFR_10, Fraction(10), ExtractSettings(frames=2, start=9.0))


@pytest.mark.parametrize(("source", "size", "crop", "expected"), [
    ((1280, 720), FrameSize(short_side=512), False, (912, 512)),  # 910.2 rounded to % 8
    ((176, 144), FrameSize(short_side=512), False, (624, 512)),
    ((720, 1280), FrameSize(short_side=512), False, (512, 912)),
    ((718, 718), FrameSize(short_side=512), False, (512, 512)),
    ((1280, 720), FrameSize(short_side=256), True, (256, 256)),
    ((1280, 720), FrameSize(width=768, height=432), False, (768, 432)),
])
def test_output_size(source: tuple[int, int], size: FrameSize, crop: bool,
                     expected: tuple[int, int]) -> None:
    assert output_size(*source, size, crop) == expected


def test_the_side_limit_holds_for_the_long_side_too() -> None:
    narrow = VideoInfo(path=Path("narrow.mp4"), container="mp4", codec="h264", width=4098,
                       height=16, rotation=0, fps=Fraction(10), frame_times=[0.0, 0.1, 0.2],
                       frame_pts=[0, 1, 2], has_dts=True)
    with pytest.raises(BadInputError, match="would be 262272x1024, over 4096 pixels a side"):
        plan_frames(narrow, ExtractSettings(frames=2, size="1024"))
    assert plan_frames(narrow, ExtractSettings(frames=2, size="1024x64")).width == 1024


# -- real clips ------------------------------------------------------------------------------


def test_extract_720p_clip(tmp_path: Path, clip_720p: Path) -> None:
    result = extract(clip_720p, tmp_path / "p", ExtractSettings(frames=12))
    assert len(result.frames) == 12
    for path in result.frames:
        assert Image.open(path).size == (912, 512)
    assert result.times == pytest.approx([i * 0.08 for i in range(12)])
    assert result.audio is not None and result.audio.suffix == ".m4a"
    assert audio_packets(result.audio) == audio_packets(clip_720p)  # bit for bit

    record = Project.open(tmp_path / "p").record
    assert record["source"]["video"]["fps"] == 25
    assert record["source"]["video"]["frame_count"] == 50
    assert record["source"]["duration"] == pytest.approx(2.0)
    assert record["source"]["video"]["codec"] == "h264"
    assert record["source"]["audio"]["codec"] == "aac"
    assert record["source"]["audio"]["sample_rate"] == 44100
    assert record["frames"]["source_indices"] == list(range(0, 24, 2))
    assert record["frames"]["fps"] == pytest.approx(12.5)
    assert record["extract"]["frames"] == 12


def test_frames_show_the_source_pixels(tmp_path: Path, clip_qcif: Path) -> None:
    # The clip's moving white square goes left to right; its top bar's blue encodes the index.
    settings = ExtractSettings(frames=3, stride=10, size="176x144")
    result = extract(clip_qcif, tmp_path / "p", settings)
    frames = [np.asarray(Image.open(p), dtype=np.float32) for p in result.frames]
    # The square (white: every channel high) starts at the left and is 36 px wide; source frame
    # k of 30 has it at x = 140 * k / 29.
    for frame, k in zip(frames, (0, 10, 20), strict=True):
        white = np.flatnonzero((frame[72] > 235).all(axis=1))
        assert abs(white.mean() - (140 * k / 29 + 17.5)) < 3
        assert abs(frame[2, :, 2].mean() - (k * 37) % 256) < 12


def test_rotation_metadata_is_honoured(tmp_path: Path, clip_rotated: Path) -> None:
    info = probe(clip_rotated)
    assert (info.width, info.height, info.rotation) == (144, 176, 90)
    result = extract(clip_rotated, tmp_path / "p", ExtractSettings(frames=2, stride=10,
                                                                   size="144x176"))
    second = np.asarray(Image.open(result.frames[1]), dtype=np.float32)
    assert second.shape == (176, 144, 3)
    # The stored top bar (blue = 10 * 37 % 256 = 114) is shown on the left after a 90 degree
    # counter-clockwise turn; the right edge keeps the pattern's constant blue of 96.
    assert abs(second[:, 2, 2].mean() - 114) < 12
    assert abs(second[20:-20, -3, 2].mean() - 96) < 12


def test_variable_frame_rate_clip_records_real_timestamps(tmp_path: Path, clip_vfr: Path) -> None:
    info = probe(clip_vfr)
    assert info.variable_rate
    assert info.frame_times == pytest.approx(VFR_TIMES, abs=1e-3)
    # Its average rate is 12 frames in 1.36 s; stride 4 puts targets 0.453 s apart.
    assert float(info.fps) == pytest.approx(12 / 1.36, rel=1e-3)
    result = extract(clip_vfr, tmp_path / "p", ExtractSettings(frames=3, stride=4, size="64"))
    assert result.times == pytest.approx([0.0, 0.5, 0.9], abs=1e-3)


def test_a_clip_without_sound_gives_a_silent_project(tmp_path: Path, clip_silent: Path) -> None:
    result = extract(clip_silent, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    assert result.audio is None
    assert list((tmp_path / "p").glob("source/*")) == []
    assert Project.open(tmp_path / "p").record["source"].get("audio") is None


def test_pcm_sound_is_kept_in_matroska(tmp_path: Path, clip_pcm_mkv: Path) -> None:
    result = extract(clip_pcm_mkv, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    assert result.audio is not None and result.audio.suffix == ".mka"
    assert audio_packets(result.audio) == audio_packets(clip_pcm_mkv)


def test_same_settings_reuse_frames_and_new_settings_replace_them(tmp_path: Path,
                                                                  clip_qcif: Path) -> None:
    first = extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    stamp = first.frames[0].stat().st_mtime_ns
    again = extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    assert again.reused and again.frames[0].stat().st_mtime_ns == stamp
    key = Project.open(tmp_path / "p").record["frames"]["key"]

    changed = extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=6, size="64"))
    assert not changed.reused and len(changed.frames) == 6
    assert len(list((tmp_path / "p" / "frames").iterdir())) == 6
    assert Project.open(tmp_path / "p").record["frames"]["key"] != key


def test_deleted_frames_are_not_trusted(tmp_path: Path, clip_qcif: Path) -> None:
    first = extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    first.frames[2].unlink()
    again = extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    assert not again.reused and len(again.frames) == 4


# -- bad input: a clear error and nothing written ----------------------------------------------


def _not_written(project: Path) -> bool:
    return not project.exists()


def test_missing_empty_and_non_video_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    for clip, message in [(tmp_path / "missing.mp4", "does not exist"), (empty, "is empty"),
                          (text, "not a video vedit can read"), (tmp_path, "is a folder")]:
        with pytest.raises(BadInputError, match=message):
            extract(clip, tmp_path / "p")
        assert _not_written(tmp_path / "p")


def test_truncated_clip(tmp_path: Path, clip_720p: Path) -> None:
    data = clip_720p.read_bytes()
    for keep in (len(data) // 3, len(data) - 2000):
        truncated = tmp_path / f"cut{keep}.mp4"
        truncated.write_bytes(data[:keep])
        with pytest.raises(BadInputError):
            extract(truncated, tmp_path / "p", ExtractSettings(frames=24, size="64"))
        assert _not_written(tmp_path / "p")


def test_audio_only_file(tmp_path: Path, audio_only: Path) -> None:
    with pytest.raises(BadInputError, match="has no video \\(audio only\\)"):
        extract(audio_only, tmp_path / "p")
    assert _not_written(tmp_path / "p")


def test_too_many_frames_writes_nothing(tmp_path: Path, clip_qcif: Path) -> None:
    with pytest.raises(BadInputError, match="gives 15 frames, but 24 were asked"):
        extract(clip_qcif, tmp_path / "p")
    assert _not_written(tmp_path / "p")


def test_a_failed_extract_leaves_an_existing_project_as_it_was(tmp_path: Path,
                                                               clip_qcif: Path) -> None:
    extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    before = (tmp_path / "p" / "vedit.toml").read_text()
    with pytest.raises(BadInputError):
        extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=400, size="64"))
    assert (tmp_path / "p" / "vedit.toml").read_text() == before
    assert len(list((tmp_path / "p" / "frames").iterdir())) == 4


def test_non_project_folder_is_left_alone(tmp_path: Path, clip_qcif: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(ProjectError, match="not empty and is not a vedit project"):
        extract(clip_qcif, other, ExtractSettings(frames=4, size="64"))
    assert sorted(p.name for p in other.iterdir()) == ["thesis.txt"]


def test_interrupted_decode_leaves_no_half_frames(tmp_path: Path, clip_qcif: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    record = (tmp_path / "p" / "vedit.toml").read_text()
    import vedit.extract as stage

    real_fit = stage.fit_frame
    calls = []

    def interrupted_fit(image: Image.Image, width: int, height: int) -> Image.Image:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(image, width, height)

    monkeypatch.setattr(stage, "fit_frame", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=6, size="64"))
    assert (tmp_path / "p" / "vedit.toml").read_text() == record
    assert len(list((tmp_path / "p" / "frames").iterdir())) == 4
    assert [p.name for p in (tmp_path / "p").iterdir() if ".tmp-" in p.name] == []
