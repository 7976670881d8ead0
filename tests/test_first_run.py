"""First run: `vedit demo` runs the whole chain offline; `vedit doctor` says what this machine
can do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clips import stream_durations
from typer.testing import CliRunner

from vedit import demo, doctor
from vedit.cli import app

runner = CliRunner()
README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_the_readme_starts_with_the_demo() -> None:
    first_command = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()[1]
    assert first_command.endswith("&& vedit demo")


@pytest.mark.slow
def test_demo_runs_offline_and_ends_with_videos_that_have_sound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert Path(data["folder"]) == Path("vedit-demo")
    assert set(data["seconds"]) == {"clip", "model", "extract", "tune", "edit", "remux"}
    assert len(data["final"]) == 2 and len(data["compare"]) == 2
    for final in data["final"]:
        durations = stream_durations(Path(final))
        assert set(durations) == {"video", "audio"}
        assert durations["audio"] == pytest.approx(durations["video"], abs=0.05)
    assert all(Path(p).is_file() for p in data["compare"])
    again = runner.invoke(app, ["demo"])
    assert again.exit_code == 4 and "not empty" in again.stderr


def test_a_demo_that_fails_leaves_no_folder(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = runner.invoke(app, ["demo", "--model", "no-one/no-model", "-o",
                                  str(tmp_path / "D")])
    assert missing.exit_code == 6, missing.stderr
    assert not (tmp_path / "D").exists()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "build_tiny_model", broken)  # a failure after the clip is made
    (tmp_path / "E").mkdir()  # an empty folder the user made stays, empty
    for folder in ("D", "E"):
        failed = runner.invoke(app, ["demo", "-o", str(tmp_path / folder)])
        assert failed.exit_code == 8, failed.stderr
    assert not (tmp_path / "D").exists() and list((tmp_path / "E").iterdir()) == []


def test_doctor_json_names_the_device_and_passes_here() -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["device"] == doctor.device_name()
    names = {c["name"]: c for c in data["checks"]}
    for needed in ("torch", "diffusers", "av", "device", "encoder libx264", "encoder aac",
                   "models", "disk"):
        assert needed in names
    assert names["encoder libx264"]["status"] == "ok"
    assert names["torch"]["detail"]


def test_doctor_fails_when_something_needed_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(doctor.ENCODERS, "no-such-encoder", "a codec that is not there")
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 9
    assert "error" in result.stdout and "no-such-encoder" in result.stdout
