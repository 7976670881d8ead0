"""A damaged or hand-edited project is a sentence and exit 4, never a traceback (exit 1): its
record, and rerunning the stage that wrote a damaged part repairs it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vedit import tomlio
from vedit.cli import app
from vedit.extract import extract
from vedit.project import RECORD_NAME
from vedit.settings import ExtractSettings
from vedit.synthetic import make_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("damage")
    clip = make_clip(root / "clip.mp4", width=96, height=64, fps=20, seconds=0.5)
    extract(clip, root / "p", ExtractSettings(frames=3, size="64"))
    return root / "p"


@pytest.fixture()
def project(tmp_path: Path, extracted: Path) -> Path:
    shutil.copytree(extracted, tmp_path / "p")
    return tmp_path / "p"


def edit_record(project: Path, where: str, value: Any) -> None:
    """Set the key `where` (dotted) of the project's record to `value`, as a hand would."""
    record = tomlio.loads((project / RECORD_NAME).read_text())
    *tables, key = where.split(".")
    table = record
    for name in tables:
        table = table[name]
    table[key] = value
    (project / RECORD_NAME).write_text(tomlio.dumps(record))


def said(result: Any) -> str:
    return " ".join(result.stderr.split())


RECORD_EDITS = [  # the red team's hand edits of vedit.toml, and the key each error names
    ("frames.times", [], "frames.times"),
    ("frames.times", ["abc"], "frames.times[0]"),
    ("frames.times", [0.0, 0.05, 1e308], "frames.times"),
    ("frames.source_indices", [], "frames.source_indices"),
    ("frames.dir", ".", "frames.dir"),
    ("frames.count", 7, "frames"),
    ("source.audio", "x", "source.audio"),
    ("source.audio.offset", "abc", "source.audio.offset"),
    ("source.audio.offset", float("nan"), "source.audio.offset"),
    ("source.audio.offset", float("-inf"), "source.audio.offset"),
    ("source.audio_file", 5, "source.audio_file"),
    ("extract.frames", "three", "extract"),
    ("tune", {"settings": {"rank": "abc"}}, "tune.settings"),
]


@pytest.mark.parametrize(("where", "value", "named"), RECORD_EDITS,
                         ids=[f"{w}={v!r}" for w, v, _ in RECORD_EDITS])
def test_a_hand_edited_record_is_refused_with_the_key(project: Path, where: str, value: Any,
                                                      named: str) -> None:
    edit_record(project, where, value)
    for command in (["remux", str(project)], ["edit", str(project), "-p", "a dog"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 4, result.output
        assert f"holds a bad value: {named} = " in said(result)
        assert "Traceback" not in result.output


def test_extract_again_repairs_a_damaged_record(project: Path) -> None:
    clip = tomlio.loads((project / RECORD_NAME).read_text())["source"]["path"]
    edit_record(project, "frames.times", ["abc"])
    edit_record(project, "source.audio_file", 5)
    result = runner.invoke(app, ["remux", str(project)])
    assert "rerun `vedit extract`" in said(result)

    result = runner.invoke(app, ["extract", clip, "-o", str(project), "-n", "3", "--size", "64"])
    assert result.exit_code == 0, result.output
    record = tomlio.loads((project / RECORD_NAME).read_text())
    assert len(record["frames"]["times"]) == 3
    assert record["source"]["audio_file"].startswith("source/audio.")
