"""`vedit demo`: the whole chain on a clip made here, offline, to answer "does it work here?".

It makes a short clip with sound (moving shapes, a tone), builds the tiny random Stable
Diffusion the tests use (its SDXL layout with `sdxl`; or takes a real base with `model`), and
runs extract, tune, edit and remux through their public functions. With the tiny model the
edits are noise-like, but every stage, file and format is the real one (README says how long
it took on two CPU cores).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vedit.edit import edit
from vedit.errors import ProjectError, UsageError
from vedit.extract import extract
from vedit.models import native_resolution, resolve_model
from vedit.progress import Reporter
from vedit.remux import remux
from vedit.settings import EditSettings, ExtractSettings, TuneSettings
from vedit.synthetic import make_clip
from vedit.tiny_model import TINY_RESOLUTION, build_tiny_model
from vedit.tune import tune

T = TypeVar("T")
SOURCE_PROMPT = "a white square slides across a gradient"
PROMPTS = ("a red ball rolls across a sunset", "a paper boat drifts across a pond")


@dataclass
class DemoResult:
    folder: Path
    model: str
    final_videos: list[Path]
    compare_videos: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "model": self.model,
                "final": [str(p) for p in self.final_videos],
                "compare": [str(p) for p in self.compare_videos],
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


def run_demo(folder: Path, *, model: str | None = None, sdxl: bool = False,
             reporter: Reporter | None = None) -> DemoResult:
    """Run the chain in `folder` (new or empty): clip, model (the tiny SD, or with `sdxl` the
    tiny SDXL, unless `model`), project, edits with sound."""
    reporter = reporter or Reporter()
    folder = Path(folder)
    if model is not None and sdxl:
        raise UsageError("--sdxl picks the tiny SDXL model; --model names another one.",
                         "Give one of them (an SDXL --model runs as SDXL).")
    if folder.exists() and any(folder.iterdir()):
        raise ProjectError(f"{folder} exists and is not empty.",
                           "Give the demo a new folder with -o, or remove that one.")
    size = None
    if model is not None:  # a missing model fails before any work
        source = resolve_model(model, reporter=reporter)
        size = str(native_resolution(source)) if source.family == "sdxl" else "512"
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _run_demo(folder, model, size, sdxl, reporter)
    except BaseException:
        # Everything in the folder is the demo's own: a failed demo leaves none of it, so the
        # rerun starts clean instead of refusing a folder that "exists".
        if created:
            shutil.rmtree(folder)
        else:
            _empty(folder)
        raise


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _run_demo(folder: Path, model: str | None, size: str | None, sdxl: bool,
              reporter: Reporter) -> DemoResult:
    """`size`: a real `model`'s frame size (SDXL's native 1024 px, else 512)."""
    seconds: dict[str, float] = {}

    def timed(stage: str, run: Callable[[], T]) -> T:
        reporter.info(f"demo: {stage}")
        started = time.monotonic()
        result = run()
        seconds[stage] = time.monotonic() - started
        return result

    clip = timed("clip", lambda: make_clip(folder / "clip.mp4", width=160, height=96, fps=24,
                                           seconds=2.0))
    if model is None or size is None:
        name = "tiny-sdxl" if sdxl else "tiny-model"
        model = str(timed("model", lambda: build_tiny_model(folder / name, sdxl=sdxl)))
        size, tune_steps, edit_steps = str(TINY_RESOLUTION), 40, 15
    else:
        tune_steps, edit_steps = 200, 50
    project = folder / "clip.vedit"
    timed("extract", lambda: extract(clip, project, ExtractSettings(frames=8, size=size),
                                     reporter))
    timed("tune", lambda: tune(project, TuneSettings(prompt=SOURCE_PROMPT, model=model,
                                                     steps=tune_steps, checkpoint_every=0),
                               reporter=reporter))
    edits = timed("edit", lambda: edit(project, list(PROMPTS), EditSettings(steps=edit_steps),
                                       reporter=reporter))
    names = [e.name for e in edits.edits]
    finals = timed("remux", lambda: remux(project, names, reporter=reporter))
    return DemoResult(folder, model, [r.path for r in finals],
                      [Path(e.files["compare"]) for e in edits.edits], seconds)
