"""vedit edit --full on the tiny model: every frame of the span, in windows, with its sound."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clips import VFR_TIMES, stream_durations
from PIL import Image
from typer.testing import CliRunner

from vedit import edit as edit_stage
from vedit import tomlio
from vedit.cli import app
from vedit.errors import BadInputError, Interrupted
from vedit.extract import extract
from vedit.models import load_components
from vedit.project import Project
from vedit.sampler import ddim_sample
from vedit.settings import EditSettings, ExtractSettings, TuneSettings
from vedit.synthetic import make_clip
from vedit.tensorfiles import load_tensors
from vedit.tune import tune
from vedit.video import probe
from vedit.windows import WindowPlan, blend_weights, plan_windows

runner = CliRunner()
FPS = 25


def _tuned_project(folder: Path, model: Path, num_frames: int, *, tuned_frames: int,
                   stride: int, seconds: float | None = None) -> Path:
    """A 64 px clip of `num_frames` frames with sound, `tuned_frames` of them tuned (one
    optimizer step: these tests are about windows, not about what the model learned)."""
    seconds = seconds or num_frames / FPS
    clip = make_clip(folder / "clip.mp4", width=64, height=64, fps=FPS, seconds=seconds)
    extract(clip, folder / "p", ExtractSettings(frames=tuned_frames, stride=stride, size="64"))
    tune(folder / "p", TuneSettings(prompt="a square", model=str(model), steps=1,
                                    checkpoint_every=0))
    return folder / "p"


@pytest.fixture(scope="module")
def long_project(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """21 frames, 4 tuned: 10 windows of 4 (overlapping by 1), or 3.5 windows of 6."""
    return _tuned_project(tmp_path_factory.mktemp("long"), tiny_model, 21, tuned_frames=4,
                          stride=2)


@pytest.fixture()
def project(tmp_path: Path, long_project: Path) -> Path:
    shutil.copytree(long_project, tmp_path / "p")
    return tmp_path / "p"


def _pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def _inversion_noise(project: Path) -> torch.Tensor:
    [path] = [p for p in (project / "inversions").glob("*.safetensors")
              if ".partial" not in p.name]
    return load_tensors(path)[0]["noise"]


def _watch_unet(monkeypatch: pytest.MonkeyPatch,
                hook: Callable[[torch.Tensor], None]) -> None:
    """Call `hook` with the latents batch `(b * f, c, h, w)` of every UNet call an edit makes."""
    original = edit_stage.tuned_unet

    def watched(*args: Any, **kwargs: Any) -> Any:
        unet = original(*args, **kwargs)
        unet.unet.register_forward_pre_hook(lambda module, inputs: hook(inputs[0]))
        return unet

    monkeypatch.setattr(edit_stage, "tuned_unet", watched)


# -- the windows and their blend ---------------------------------------------------------------


def test_windows_cover_the_clip_and_hold_the_anchor() -> None:
    plan = plan_windows(21, tuned_frames=4)
    assert len(plan) == 10 and (plan.window, plan.overlap) == (4, 1)
    assert plan.windows[0].frames == [0, 1, 2, 3]
    assert all(w.frames[0] == 0 and len(w.frames) <= 4 for w in plan.windows)
    assert plan.overlaps() == [1] * 9
    assert plan.windows[-1].frames == [0, 19, 20]  # the last ends with the clip
    assert plan_windows(4, tuned_frames=4, window=9).describe() == [[0, 4, 0]]


def test_frames_to_spare_go_evenly_to_the_overlaps_never_into_three_windows() -> None:
    """The issue's case: 14 frames in windows of 8 sharing 2 put frames 7 to 13 in three
    windows ([0, 8), [6, 13), [7, 14)). Now three windows share 3 frames each, every frame
    in at most two."""
    plan = plan_windows(14, tuned_frames=8, overlap=2)
    assert plan.describe() == [[0, 8, 0], [5, 11, 1], [8, 14, 1]]
    assert plan.overlaps() == [3, 3]


def _check_plan(plan: WindowPlan, window: int, overlap: int) -> None:
    """Every frame in one window or two, neighbours only; overlaps at least `overlap`, even (at
    most one apart) within a sequence; weights summing to 1 and fading linearly; the anchor."""
    held = [0] * plan.num_frames
    for w in plan.windows:
        assert len(w.frames) <= window and w.frames[0] == 0
        assert w.anchored == (w.start != 0)
        for frame in w.own_frames:
            held[frame] += 1
    assert set(held) <= {1, 2}
    pairs = plan.neighbours()
    assert sum(plan.overlaps()) == held.count(2)  # only neighbours share frames
    by_sequence: dict[int, list[int]] = {}
    for (a, _), shared in zip(pairs, plan.overlaps(), strict=True):
        assert shared >= overlap
        by_sequence.setdefault(plan.windows[a].start % plan.stride, []).append(shared)
    assert all(max(o) - min(o) <= 1 for o in by_sequence.values())
    weights = [weight.tolist() for weight in blend_weights(plan)]
    total = [0.0] * plan.num_frames
    for w, weight in zip(plan.windows, weights, strict=True):
        for frame, value in zip(w.own_frames, weight, strict=True):
            total[frame] += value
    assert all(abs(value - 1) < 1e-6 for value in total)
    for (_, b), shared in zip(pairs, plan.overlaps(), strict=True):  # fading in linearly
        assert all(abs(value - (i + 1) / (shared + 1)) < 1e-6
                   for i, value in enumerate(weights[b][:shared]))


def test_every_plan_of_2_to_79_frames_in_windows_of_2_to_25() -> None:
    """The whole sweep, at the default overlap and at each edge of the overlaps allowed: a plan
    keeps every property above, or its settings are refused as bad input (a window under 3,
    an overlap under 1 or over half a window's own frames)."""
    outcomes = {"planned": 0, "refused": 0}
    for window in range(2, 26):
        widest = (window - 1) // 2
        for overlap in [*sorted({0, 1, window // 4, widest, widest + 1}, key=str), None]:
            for num_frames in range(2, 80):
                try:
                    plan = plan_windows(num_frames, tuned_frames=window, overlap=overlap)
                except BadInputError:
                    outcomes["refused"] += 1
                    assert num_frames > window and (
                        window < 3 or (overlap is not None and not 1 <= overlap <= widest))
                    continue
                outcomes["planned"] += 1
                _check_plan(plan, window, 1 if overlap is None else overlap)
    assert outcomes["planned"] > outcomes["refused"] > 0


@pytest.mark.parametrize("stride", [2, 3])
def test_a_stride_interleaves_sequences_that_cover_every_frame(stride: int) -> None:
    """--full-stride K: K sequences of every K-th frame, each covered as above; all windows
    anchored on frame 0, which only the first sequence holds as its own."""
    for window in (4, 8, 24):
        for num_frames in range(2, 80, 3):
            plan = plan_windows(num_frames, tuned_frames=window, stride=stride)
            _check_plan(plan, window, 1)
            assert all(w.step == stride for w in plan.windows)
            assert {w.start % stride for w in plan.windows} == set(range(min(stride,
                                                                           num_frames)))


class StubUNet:
    """A UNet whose prediction for a window is known: every frame gets the value of the
    window's last frame (the start latents hold each frame's own index)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.windows: list[list[float]] = []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 prompts: torch.Tensor) -> torch.Tensor:
        self.windows.append(sample[0, 0, :, 0, 0].tolist())
        return sample[:, :, -1:].expand_as(sample).clone()


def test_the_blend_is_the_weighted_average_of_the_windows_predictions(tiny_model: Path) -> None:
    scheduler = load_components(tiny_model, device="cpu").scheduler
    plan = plan_windows(9, tuned_frames=5, window=5, overlap=2)
    assert plan.describe() == [[0, 5, 0], [3, 7, 1], [5, 9, 1]]
    start = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(1, 4, 9, 2, 2).contiguous()
    unet = StubUNet()
    prompts = torch.zeros(1, 7, 32)
    result = ddim_sample(unet, scheduler, start, prompts, prompts, 1.0, steps=1, plan=plan)

    # Every window saw the anchor (frame 0) first, then its own frames.
    assert unet.windows == [[0, 1, 2, 3, 4], [0, 3, 4, 5, 6], [0, 5, 6, 7, 8]]
    timestep = scheduler.timesteps[0]
    predictions = [4.0, 6.0, 8.0]  # each window's last frame

    def stepped(prediction: torch.Tensor) -> torch.Tensor:
        return scheduler.step(prediction, timestep, start).prev_sample

    # Frames in one window only: exactly that window's own step, untouched by the blend.
    for frame, window in ((0, 0), (1, 0), (2, 0), (7, 2), (8, 2)):
        own = stepped(torch.full_like(start, predictions[window]))
        assert torch.equal(result[:, :, frame], own[:, :, frame])
    # Shared frames: the average of their windows' predictions, weights fading linearly.
    shared = {3: [(0, 2 / 3), (1, 1 / 3)], 4: [(0, 1 / 3), (1, 2 / 3)],
              5: [(1, 2 / 3), (2, 1 / 3)], 6: [(1, 1 / 3), (2, 2 / 3)]}
    for frame, weights in shared.items():
        average = sum(w * predictions[window] for window, w in weights)
        expected = stepped(torch.full_like(start, average))
        torch.testing.assert_close(result[:, :, frame], expected[:, :, frame])
    weights = [[1, 1, 1, 2 / 3, 1 / 3], [1 / 3, 2 / 3, 2 / 3, 1 / 3], [1 / 3, 2 / 3, 1, 1]]
    for got, want in zip(blend_weights(plan), weights, strict=True):
        assert got.tolist() == pytest.approx(want)


# -- the command ---------------------------------------------------------------------------------


def test_one_window_of_the_whole_clip_is_exactly_the_plain_edit(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    """Tuned frames that are every frame of the span (stride 1): --full with a window as long
    as the clip renders exactly what the plain edit renders."""
    root = _tuned_project(tmp_path, tiny_model, 8, tuned_frames=8, stride=1)
    settings = EditSettings(steps=2, formats="frames")
    plain = edit_stage.edit(root, ["a cat"], settings, name="plain").edits[0]
    full = edit_stage.edit(root, ["a cat"], replace(settings, full=True, window=12),
                           name="full").edits[0]
    assert full.full is not None and full.full["windows"] == 1 and full.frames == 8
    plain_frames = _pngs(Path(plain.files["frames"]))
    full_frames = _pngs(Path(full.files["frames"]))
    assert len(plain_frames) == len(full_frames) == 8
    assert all(np.array_equal(a, b) for a, b in zip(plain_frames, full_frames, strict=True))
    noises = [load_tensors(Path(e.inversion["path"]))[0]["noise"] for e in (plain, full)]
    assert torch.equal(*noises)
    assert probe(Path(full.files["video"])).frame_times == probe(
        Path(plain.files["video"])).frame_times


def test_a_clip_of_three_and_a_half_windows_with_its_sound(project: Path) -> None:
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--full", "--window", "6",
                                 "--full-stride", "1", "--steps", "2", "--score", "--json"])
    assert result.exit_code == 0, result.stderr
    [entry] = json.loads(result.stdout)["edits"]
    assert entry["frames"] == 21 and entry["full"]["windows"] == 5
    assert (entry["full"]["stride"], entry["full"]["overlaps"]) == (1, [1, 1, 1, 2])
    # Scored against every frame of the span, and `vedit score` reads the same frames again.
    scored = runner.invoke(app, ["score", str(project), "--json"])
    assert scored.exit_code == 0, scored.stderr
    [video] = json.loads(scored.stdout)["videos"]
    assert video["frames"] == 21 and len(video["per_frame"]["warp_error"]) == 20
    assert entry["scores"]["warp_error"] is not None
    assert video["metrics"] == pytest.approx(entry["scores"])
    source = probe(Path(Project.open(project).record["source"]["path"]))
    video = probe(Path(entry["files"]["video"]))
    assert video.frame_count == source.frame_count == 21
    assert video.fps == source.fps == FPS
    assert video.frame_times == pytest.approx(source.frame_times, abs=1e-4)
    assert probe(Path(entry["files"]["compare"])).frame_count == 21
    # The sound is taken from the project's first frame: where the span starts.
    assert entry["full"]["start"] == Project.open(project).record["frames"]["times"][0]

    remuxed = runner.invoke(app, ["remux", str(project), "--json"])
    assert remuxed.exit_code == 0, remuxed.stderr
    durations = stream_durations(Path(json.loads(remuxed.stdout)["outputs"][0]["path"]))
    assert durations["video"] == pytest.approx(21 / FPS, abs=1e-3)
    assert durations["audio"] == pytest.approx(durations["video"], abs=1 / FPS)


def test_the_unet_never_sees_more_than_a_window(project: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    _watch_unet(monkeypatch, lambda latents: seen.append(latents.shape[0]))
    result = edit_stage.edit(project, ["a cat"], EditSettings(steps=2, full=True))
    assert result.edits[0].full["windows"] == 10 and result.edits[0].frames == 21
    # 2 inversion steps of 10 windows of at most 4 frames, then 2 guided sampling steps (the
    # unconditional and conditional halves at once).
    sizes = [len(w.frames) for w in plan_windows(21, tuned_frames=4, stride=2).windows]
    assert max(sizes) == 4
    assert seen == sizes * 2 + [2 * size for size in sizes] * 2


def test_full_denoises_frames_as_far_apart_as_the_tuned_ones(project: Path) -> None:
    """Tuned on every other frame, --full edits every frame but each window holds every other
    one (two interleaved sequences, as the model was tuned); --full-stride 1 puts consecutive
    frames together."""
    tuned = edit_stage.edit(project, ["a cat"], EditSettings(steps=1, full=True)).edits[0]
    assert (tuned.frames, tuned.full["stride"]) == (21, 2)
    assert probe(Path(tuned.files["video"])).frame_count == 21
    record = tomlio.loads((Path(tuned.folder) / "edit.toml").read_text())
    assert record["full"]["stride"] == 2 and "full_stride" not in record["settings"]
    dense = edit_stage.edit(project, ["a cat"], EditSettings(steps=1, full=True,
                                                            full_stride=1)).edits[0]
    assert (dense.frames, dense.full["stride"]) == (21, 1)
    assert tuned.inversion["key"] != dense.inversion["key"]  # other windows, other noise


@pytest.mark.slow
def test_an_interrupted_inversion_continues_to_the_same_result(
        tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uninterrupted = tmp_path / "again"
    shutil.copytree(project, uninterrupted)
    settings = EditSettings(steps=2, formats="frames")
    calls: list[int] = []
    interrupted: list[bool] = []

    def interrupt_at_the_15th_window(latents: torch.Tensor) -> None:
        calls.append(latents.shape[0])
        if len(calls) == 15 and not interrupted:  # step 2, window 5 of 10
            interrupted.append(True)
            raise KeyboardInterrupt

    _watch_unet(monkeypatch, interrupt_at_the_15th_window)
    with pytest.raises(Interrupted, match="after 1 step and 4 windows of the next"):
        edit_stage.edit(project, ["a cat"], replace(settings, full=True))
    assert len(list((project / "inversions").glob("*.partial.safetensors"))) == 1
    assert not (project / "edits").exists() or not any((project / "edits").iterdir())

    calls.clear()
    resumed = edit_stage.edit(project, ["a cat"], replace(settings, full=True)).edits[0]
    sizes = [len(w.frames) for w in plan_windows(21, tuned_frames=4, stride=2).windows]
    assert calls[:7] == [*sizes[4:], 8]  # the 6 windows left of the inversion, then sampling
    assert not list((project / "inversions").glob("*.partial.safetensors"))

    monkeypatch.undo()
    whole = edit_stage.edit(uninterrupted, ["a cat"], replace(settings, full=True)).edits[0]
    assert torch.equal(_inversion_noise(project), _inversion_noise(uninterrupted))
    assert all(np.array_equal(a, b) for a, b in zip(
        _pngs(Path(resumed.files["frames"])), _pngs(Path(whole.files["frames"])), strict=True))


@pytest.mark.slow
def test_ten_seconds_with_sound_tuned_on_24_frames(tmp_path: Path, tiny_model: Path) -> None:
    """The README's example at 64 px: extract, tune on 24 frames, edit --full, remux."""
    root = _tuned_project(tmp_path, tiny_model, 250, tuned_frames=24, stride=2, seconds=10.0)
    result = runner.invoke(app, ["edit", str(root), "-p", "a cat", "--full", "--steps", "2",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    [entry] = json.loads(result.stdout)["edits"]
    assert (entry["frames"], entry["full"]["window"], entry["full"]["overlap"]) == (250, 24, 6)
    video = probe(Path(entry["files"]["video"]))
    assert (video.frame_count, video.fps) == (250, FPS)
    remuxed = runner.invoke(app, ["remux", str(root), "--json"])
    assert remuxed.exit_code == 0, remuxed.stderr
    durations = stream_durations(Path(json.loads(remuxed.stdout)["outputs"][0]["path"]))
    assert durations["video"] == pytest.approx(10.0, abs=1e-3)
    assert durations["audio"] == pytest.approx(10.0, abs=1 / FPS)


def test_a_variable_frame_rate_keeps_its_timestamps(tmp_path: Path, clip_vfr: Path,
                                                    tiny_model: Path) -> None:
    extract(clip_vfr, tmp_path / "p", ExtractSettings(frames=3, stride=1, size="64"))
    tune(tmp_path / "p", TuneSettings(prompt="a square", model=str(tiny_model), steps=1,
                                      checkpoint_every=0))
    result = edit_stage.edit(tmp_path / "p", ["a cat"], EditSettings(steps=1, full=True))
    video = probe(Path(result.edits[0].files["video"]))
    assert video.frame_times == pytest.approx(VFR_TIMES, abs=1e-4)


def test_window_options_need_full_and_must_fit(project: Path) -> None:
    alone = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--window", "8"])
    assert alone.exit_code == 2 and "--full" in alone.stderr
    tight = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--full", "--window", "4",
                                "--overlap", "2"])
    assert tight.exit_code == 3 and "fall in three windows" in tight.stderr
    seam = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--full", "--overlap", "0"])
    assert seam.exit_code == 3 and "would leave a seam" in seam.stderr
    stride = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--full-stride", "2"])
    assert stride.exit_code == 2 and "--full" in stride.stderr


def test_full_needs_the_source_clip(tmp_path: Path, project: Path) -> None:
    record = Project.open(project)
    record.record["source"]["path"] = str(tmp_path / "moved.mp4")
    record.save()
    gone = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--full"])
    assert gone.exit_code == 3 and "is gone" in gone.stderr
