"""A tuned project for the tests that edit and score, made once per session (a pytest plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vedit.extract import extract
from vedit.settings import ExtractSettings, TuneSettings
from vedit.tune import tune

TUNED_PROMPT = "a man is talking"


@pytest.fixture(scope="session")
def tuned_project(tmp_path_factory: pytest.TempPathFactory, clip_720p: Path,
                  tiny_model: Path) -> Path:
    """A project of 6 frames (every other frame at 25 fps: 12.5 fps) with sound, tuned briefly at
    a high rate so that the tiny model starts to fit the clip. Copy it before changing it."""
    root = tmp_path_factory.mktemp("tuned") / "p"
    extract(clip_720p, root, ExtractSettings(frames=6, size="64"))
    tune(root, TuneSettings(prompt=TUNED_PROMPT, model=str(tiny_model), steps=80, lr=1e-2,
                            lora_lr=1e-2, checkpoint_every=0))
    return root
