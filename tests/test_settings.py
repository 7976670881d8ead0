"""Settings: size parsing, validation, and defaults < config file < command-line flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from vedit.errors import BadInputError
from vedit.settings import (
    EditSettings,
    ExtractSettings,
    FrameSize,
    TuneSettings,
    config_values,
    parse_size,
    resolve,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("512", FrameSize(short_side=512)),
    (768, FrameSize(short_side=768)),
    ("768x432", FrameSize(width=768, height=432)),
    (" 64X64 ", FrameSize(width=64, height=64)),
])
def test_parse_size_accepts_short_side_or_exact(text: str | int, expected: FrameSize) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("0", "out of range"),
    ("100000", "out of range"),
    ("513", "not a multiple of 8"),
    ("512x300", "not a multiple of 8"),
    ("big", "not a size"),
    ("-512", "not a size"),
])
def test_parse_size_refuses_absurd_sizes(text: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        parse_size(text)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"frames": 0}, "at least one frame"),
    ({"stride": 0}, "--stride 0"),
    ({"start": -1.0}, "not a time in the clip"),
    ({"start": float("nan")}, "not a time in the clip"),
    ({"end": float("inf")}, "not a time in the clip"),
    ({"start": 2.0, "end": 1.0}, "not after"),
    ({"size": "64x48", "crop": True}, "--crop takes a single"),
    ({"size": ""}, "--size is empty"),
    ({"size": "\uff16\uff14"}, "not a size"),  # full-width digits: int() would read 64
])
def test_extract_settings_refuse_impossible_values(kwargs: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        ExtractSettings(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 1_000_000_000}, "--rank 1000000000 is above 1024"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"lora_lr": float("inf")}, "--lora-lr must be a finite number"),
    ({"seed": 2**64}, "--seed .* is out of range"),
])
def test_tune_settings_refuse_values_that_would_only_fail_later(kwargs: dict,
                                                                message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        TuneSettings(prompt="a clip", **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"guidance": float("nan")}, "--guidance nan is not a number"),
    ({"seed": -(2**64)}, "--seed .* is out of range"),
])
def test_edit_settings_refuse_non_finite_or_huge_values(kwargs: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        EditSettings(**kwargs)


def test_flags_beat_the_config_which_beats_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('frames = 8\nsize = 256\n[extract]\nstride = 3\n')
    values = config_values(config, ["extract"])
    settings = resolve(ExtractSettings, values,
                       overrides={"frames": 12, "stride": None, "crop": None})
    assert settings == ExtractSettings(frames=12, stride=3, size="256")


def test_the_users_defaults_file_sits_below_a_config_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user.toml"
    user.write_text('model = "my/model"\nsteps = 100\n[tune]\nrank = 8\n')
    monkeypatch.setenv("VEDIT_CONFIG", str(user))
    assert resolve(TuneSettings, config_values(None, ["tune"])) == TuneSettings(
        model="my/model", steps=100, rank=8)
    given = tmp_path / "c.toml"
    given.write_text("[tune]\nsteps = 300\n")
    assert resolve(TuneSettings, config_values(given, ["tune"])) == TuneSettings(
        model="my/model", steps=300, rank=8)


def test_a_typo_or_a_missing_file_in_the_users_defaults_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user.toml"
    monkeypatch.setenv("VEDIT_CONFIG", str(user))
    with pytest.raises(BadInputError, match="does not exist") as missing:
        config_values(None, ["extract"])
    assert "VEDIT_CONFIG" in missing.value.hint
    user.write_text("framez = 3\n")
    with pytest.raises(BadInputError, match="framez"):
        config_values(None, ["extract"])
    user.write_text("[tune]\nstepz = 3\n")
    with pytest.raises(BadInputError, match="stepz"):
        config_values(None, ["tune"])


def test_one_file_serves_every_command(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('model = "m"\nframes = 8\n[tune]\nsteps = 3\n[edit]\nsteps = 9\n')
    assert resolve(TuneSettings, config_values(config, ["extract", "tune"])).steps == 3
    assert resolve(EditSettings, config_values(config, ["edit"])).steps == 9
    assert resolve(ExtractSettings, config_values(config, ["extract"])).frames == 8


def test_config_keys_may_be_written_with_dashes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[tune]\nlora-targets = ['q', 'v']\n")
    assert config_values(config, ["tune"]) == {"lora_targets": ["q", "v"]}
    assert resolve(TuneSettings, config_values(config, ["tune"])).lora_targets == "q,v"


@pytest.mark.parametrize(("text", "message"), [
    ("frmes = 8\n", "Unknown setting.*frmes"),
    ("[extract]\nsteps = 8\n", r"Unknown setting.*\[extract\].*steps"),
    ("frames = 'many'\n", "frames = 'many' should be int"),
    ("spread = 1\n", "should be bool"),
    ("frames = [\n", "not valid TOML"),
    ("[edits]\nsteps = 4\n", "unknown table"),
])
def test_bad_config_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(BadInputError, match=message):
        resolve(ExtractSettings, config_values(config, ["extract"]))


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        config_values(tmp_path / "nope.toml", ["extract"])


def test_ints_widen_to_floats_in_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("start = 1\nend = 3\n")
    settings = resolve(ExtractSettings, config_values(config, ["extract"]))
    assert settings.start == 1.0 and isinstance(settings.start, float)
    assert settings.end == 3.0
