"""A damaged or hand-edited project is a sentence and exit 4, never a traceback (exit 1): its
record, checkpoints, frames and training state; caches that fail to load are computed again,
and rerunning the stage that wrote a damaged record repairs it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pipeline_files import UNET_FILE
from typer.testing import CliRunner

from vedit import tomlio
from vedit.checkpoints import (
    LORA_FILE,
    RECORD,
    TEMPORAL_FILE,
    TRAINING_FILE,
    list_checkpoints,
    load_training_state,
)
from vedit.cli import app
from vedit.errors import ProjectError
from vedit.extract import extract
from vedit.latents import load_frames
from vedit.progress import Reporter
from vedit.project import RECORD_NAME, Project
from vedit.settings import ExtractSettings, TuneSettings
from vedit.synthetic import make_clip
from vedit.tensorfiles import cached_tensors, load_tensors, save_tensors
from vedit.tune import tune

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


# -- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, extracted: Path, tiny_model: Path) -> Path:
    """A project with one tuning run of three checkpoints, run-1/step-1 to run-1/step-3."""
    root = tmp_path_factory.mktemp("tuned")
    shutil.copytree(extracted, root / "p")
    tune(root / "p", TuneSettings(prompt="a square slides", model=str(tiny_model), steps=3,
                                  checkpoint_every=1))
    return root / "p"


@pytest.fixture()
def tuned_copy(tmp_path: Path, tuned: Path) -> Path:
    shutil.copytree(tuned, tmp_path / "p")
    return tmp_path / "p"


def edit_checkpoint(project: Path, where: str, value: Any, step: int = 2) -> Path:
    """Set (or, with None, remove) a key of run-1/step-STEP's checkpoint.toml."""
    path = project / "checkpoints" / "run-1" / f"step-{step}" / RECORD
    record = tomlio.loads(path.read_text())
    *tables, key = where.split(".")
    table = record
    for name in tables:
        table = table[name]
    if value is None:
        del table[key]
    else:
        table[key] = value
    path.write_text(tomlio.dumps(record))
    return path


def test_damaged_checkpoints_are_named_and_skipped(tuned_copy: Path) -> None:
    edit_checkpoint(tuned_copy, "step", float("inf"), step=3)
    edit_checkpoint(tuned_copy, "step", [6], step=2)
    result = runner.invoke(app, ["edit", str(tuned_copy), "-p", "a dog", "--steps", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert "step-3 has a damaged checkpoint.toml: step = inf" in said(result)
    assert "step-2 has a damaged checkpoint.toml: step = [6]" in said(result)
    assert "It is skipped" in said(result)
    [edit] = json.loads(result.stdout)["edits"]
    assert tomlio.loads((Path(edit["folder"]) / "edit.toml").read_text())["checkpoint"] == \
        "run-1/step-1"


@pytest.mark.parametrize(("where", "value", "named"), [
    ("settings", None, "settings = None (missing)"),
    ("settings.rank", "abc", "settings = "),
    ("settings.rank", 10**9, "above 1024"),
    ("lora_targets", ["attn3.to_z"], "lora_targets[0] = 'attn3.to_z'"),
    ("lora_targets", "q", "lora_targets = 'q'"),
])
def test_a_checkpoint_with_a_damaged_record_is_exit_4(tuned_copy: Path, where: str, value: Any,
                                                      named: str) -> None:
    edit_checkpoint(tuned_copy, where, value)
    result = runner.invoke(app, ["edit", str(tuned_copy), "-p", "a dog", "--checkpoint",
                                 "step-2"])
    assert result.exit_code == 4, result.output
    assert "step-2 has a damaged checkpoint.toml" in said(result) and named in said(result)
    assert "Traceback" not in result.output


def test_edit_refuses_a_checkpoint_of_other_frames_as_resume_does(tuned_copy: Path) -> None:
    clip = tomlio.loads((tuned_copy / RECORD_NAME).read_text())["source"]["path"]
    assert extract(Path(clip), tuned_copy, ExtractSettings(frames=2, size="64")).frames
    for command in (["edit", str(tuned_copy), "-p", "a dog"],
                    ["tune", str(tuned_copy), "--resume", "--steps", "4"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 3, result.output
        assert "was tuned on other frames of this project" in said(result)


# -- cached tensors and frames -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "no mean", "other shape", "integers"])
def test_a_damaged_cache_is_computed_again(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "cache.safetensors"
    good = {"mean": torch.ones(1, 4, 3, 8, 8), "std": torch.ones(1, 4, 3, 8, 8)}
    if damage == "truncated":
        save_tensors(path, good, {})
        path.write_bytes(path.read_bytes()[:100])
    else:
        stored = {"no mean": {"std": good["std"]},
                  "other shape": {"mean": torch.ones(1, 4, 2, 8, 8), "std": good["std"]},
                  "integers": {"mean": torch.ones(1, 4, 3, 8, 8, dtype=torch.int64),
                               "std": good["std"]}}[damage]
        save_tensors(path, stored, {})
    shapes = {"mean": (1, 4, 3, 8, 8), "std": (1, 4, 3, 8, 8)}
    with pytest.warns(UserWarning, match="The cached cache.safetensors is damaged"):
        tensors, reused = cached_tensors(path, lambda: good, {}, "reused", Reporter(),
                                         shapes=shapes)
    assert not reused and torch.equal(tensors["mean"], good["mean"])
    again, reused = cached_tensors(path, lambda: {}, {}, "reused", Reporter(), shapes=shapes)
    assert reused and torch.equal(again["std"], good["std"])  # stored anew, whole


def test_damaged_latents_and_inversion_are_recomputed_by_edit(tuned_copy: Path) -> None:
    edit = ["edit", str(tuned_copy), "-p", "a dog", "--steps", "1"]
    assert runner.invoke(app, edit).exit_code == 0
    [latents] = (tuned_copy / "latents").glob("*.safetensors")
    [inversion] = (tuned_copy / "inversions").glob("*.safetensors")
    latents.write_bytes(latents.read_bytes()[:1000])  # a truncated file: stuck until deleted
    save_tensors(inversion, {"noise": torch.zeros(1, 4, 2, 8, 8)}, {})  # frames it lacks
    result = runner.invoke(app, [*edit, "--name", "again"])
    assert result.exit_code == 0, result.output
    assert f"The cached {latents.name} is damaged" in said(result)
    assert f"The cached {inversion.name} is damaged" in said(result)
    assert load_tensors(inversion)[0]["noise"].shape[2] == 3


@pytest.mark.parametrize("damage", ["garbage", "other size"])
def test_a_damaged_frame_is_exit_4_naming_it(tmp_path: Path, damage: str) -> None:
    frame = tmp_path / "00001.png"
    if damage == "garbage":
        frame.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    else:
        Image.new("RGB", (64, 48)).save(frame)
    with pytest.raises(ProjectError, match=f"The frame {frame} is") as caught:
        load_frames([frame], 64, 64)
    assert caught.value.exit_code == 4 and "vedit extract" in caught.value.hint


def test_a_garbage_training_state_is_exit_4_naming_it(tuned_copy: Path) -> None:
    project = Project.open(tuned_copy)
    checkpoint = list_checkpoints(project)[-1]
    path = checkpoint.path / TRAINING_FILE
    tensors, metadata = load_tensors(path)
    tensors["optimizer.param_groups"] = torch.tensor(list(b'[{"params": 5}]'), dtype=torch.uint8)
    save_tensors(path, tensors, metadata)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ProjectError, match=f"{path} holds a damaged training state"):
        load_training_state(checkpoint, optimizer, {})


# -- crafted model files and checkpoint weights ------------------------------------------------

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
HEADERS = {  # the red team's crafted entries, each for 16 bytes of data
    "no shape": {"dtype": "F32", "data_offsets": [0, 16]},
    "empty shape": {"dtype": "F32", "shape": [], "data_offsets": [0, 16]},
    "scalar": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},  # valid, but not a conv
    "string offsets": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]},
    "no dtype": {"shape": [4], "data_offsets": [0, 16]},
    "offsets past the end": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
}


def crafted(path: Path, entry: dict[str, Any]) -> Path:
    header = json.dumps({CONV_IN: entry}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


@pytest.mark.parametrize("damage", HEADERS)
def test_a_crafted_single_file_header_is_exit_3(tmp_path: Path, damage: str) -> None:
    path = crafted(tmp_path / "model.safetensors", HEADERS[damage])
    result = runner.invoke(app, ["fetch-models", str(path)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and "model.safetensors" in said(result)


@pytest.mark.parametrize("damage", ["no shape", "string offsets", "no dtype"])
def test_a_crafted_model_folder_header_is_exit_3(tmp_path: Path, tiny_model: Path,
                                                 damage: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    crafted(folder / UNET_FILE, HEADERS[damage])
    result = runner.invoke(app, ["fetch-models", str(folder)])
    assert result.exit_code == 3, result.output
    assert "is not a complete safetensors file" in said(result)


@pytest.mark.parametrize(("file", "dtype"), [(TEMPORAL_FILE, torch.int64), (LORA_FILE, torch.bool)])
def test_checkpoint_weights_that_are_not_floats_are_refused(tuned_copy: Path, file: str,
                                                            dtype: torch.dtype) -> None:
    path = tuned_copy / "checkpoints" / "run-1" / "step-3" / file
    tensors, metadata = load_tensors(path)
    save_tensors(path, {k: v.to(dtype) for k, v in tensors.items()}, metadata)
    result = runner.invoke(app, ["edit", str(tuned_copy), "-p", "a dog", "--steps", "1"])
    assert result.exit_code == 3, result.output
    assert f"step-3/{file} holds" in said(result) and "not a vedit checkpoint" in said(result)
