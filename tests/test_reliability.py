"""Bad input, faults and interrupts: each gets a documented exit code, one sentence and a hint,
no traceback, nothing half-written, and a project that still works afterwards."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import pytest
from clips import audio_packets
from PIL import Image
from typer.testing import CliRunner, Result

from vedit.checkpoints import LORA_FILE, TEMPORAL_FILE, list_checkpoints
from vedit.cli import app
from vedit.extract import extract
from vedit.project import FORMAT, LOCK_NAME, Project
from vedit.settings import ExtractSettings, TuneSettings
from vedit.synthetic import make_clip
from vedit.tensorfiles import load_tensors
from vedit.tiny_model import build_tiny_model
from vedit.tune import tune
from vedit.video import probe

runner = CliRunner()
PROMPT = "a square slides"


# -- helpers -----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock aside) and a hash of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def assert_clean_failure(result: Result, code: int, message: str) -> None:
    """The CLI contract for errors: the code, `error: ...` then `hint: ...`, no traceback."""
    stderr = result.stderr
    assert result.exit_code == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert lines[-1].startswith("hint: ")
    assert message in " ".join(stderr.split())


def vedit(*args: str | Path, env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vedit", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | (env or {}))


def start(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vedit", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}))


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str],
             seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the awaited moment never came"
        time.sleep(0.05)


def interrupted(tmp_path: Path,
                plan: list[dict[str, object]]) -> subprocess.CompletedProcess[str]:
    """The steps of `plan` run by tests/interrupter.py in one process (see its docstring)."""
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return subprocess.run([sys.executable, str(Path(__file__).with_name("interrupter.py")),
                           tmp_path / "plan.json", tmp_path / "codes.json"],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    clip = make_clip(root / "clip.mp4", width=96, height=64, fps=20, seconds=1.0)
    extract(clip, root / "p", ExtractSettings(frames=4, size="64"))
    tune(root / "p", TuneSettings(prompt=PROMPT, model=str(tiny_model), steps=2,
                                  checkpoint_every=0))
    return root / "p"


@pytest.fixture()
def project(tmp_path: Path, tuned: Path) -> Path:
    shutil.copytree(tuned, tmp_path / "p")
    return tmp_path / "p"


def still_usable(project: Path) -> None:
    """The project edits as before (the cheapest command that reads every stage)."""
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--steps", "1", "-q"])
    assert result.exit_code == 0, result.stderr


# -- SPEC.md "What bad input gets", one row at a time ------------------------------------------


def test_unreadable_clips(tmp_path: Path, clip_720p: Path, audio_only: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(clip_720p.read_bytes()[:5000])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    cases = [(tmp_path / "missing.mp4", "does not exist"), (empty, "is empty"),
             (truncated, "is not a video vedit can read"), (text, "is not a video"),
             (audio_only, "has no video (audio only)")]
    for clip, message in cases:
        result = runner.invoke(app, ["extract", str(clip), "-o", str(tmp_path / "p")])
        assert_clean_failure(result, 3, message)
        assert not (tmp_path / "p").exists()


def test_a_clip_shorter_than_the_frames_asked(tmp_path: Path, clip_qcif: Path) -> None:
    result = runner.invoke(app, ["extract", str(clip_qcif), "-o", str(tmp_path / "p"),
                                 "--frames", "40"])
    assert_clean_failure(result, 3, "gives 15 frames, but 40 were asked")
    assert "--frames 15" in result.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("size", ["0", "0x512", "100000", "8192x8192"])
def test_a_zero_length_or_huge_resolution(tmp_path: Path, clip_qcif: Path, size: str) -> None:
    result = runner.invoke(app, ["extract", str(clip_qcif), "-o", str(tmp_path / "p"),
                                 "--size", size])
    assert_clean_failure(result, 3, "out of range")
    assert not (tmp_path / "p").exists()


def test_a_prompt_too_long_is_warned_and_cut(project: Path) -> None:
    result = runner.invoke(app, ["tune", str(project), "--prompt", "a square slides " * 30,
                                 "--steps", "1"])
    assert result.exit_code == 0, result.stderr
    assert "warning: The prompt is" in result.stderr and "cut after" in result.stderr


def test_an_unknown_model(project: Path) -> None:
    before = snapshot(project)
    result = runner.invoke(app, ["tune", str(project), "--prompt", PROMPT, "--model",
                                 "no-org/no-model"])
    assert_clean_failure(result, 6, "vedit fetch-models no-org/no-model")
    assert snapshot(project) == before


def test_a_checkpoint_from_another_base_model(tmp_path: Path, project: Path,
                                              tiny_model_v: Path) -> None:
    before = snapshot(project)
    resumed = runner.invoke(app, ["tune", str(project), "--resume", "--steps", "4", "--model",
                                  str(tiny_model_v)])
    assert_clean_failure(resumed, 3, "was tuned on")
    assert snapshot(project) == before

    # The base model's folder changed under the checkpoint (same path, other weights).
    base = tmp_path / "base"
    build_tiny_model(base, seed=1)
    clip_project = tmp_path / "q"
    shutil.copytree(project, clip_project)
    tune(clip_project, TuneSettings(prompt=PROMPT, model=str(base), steps=1, checkpoint_every=0))
    shutil.rmtree(base)
    build_tiny_model(base, seed=2)
    edited = runner.invoke(app, ["edit", str(clip_project), "-p", "a cat", "--steps", "1"])
    assert_clean_failure(edited, 3, "was tuned on")


@pytest.mark.parametrize("damage", ["truncated", "foreign", "missing"])
def test_a_corrupted_or_foreign_checkpoint(project: Path, damage: str) -> None:
    checkpoint = list_checkpoints(Project.open(project))[-1].path
    if damage == "truncated":
        data = (checkpoint / LORA_FILE).read_bytes()
        (checkpoint / LORA_FILE).write_bytes(data[: len(data) // 3])
        message = "not a readable safetensors file"
    elif damage == "foreign":
        import torch
        from safetensors.torch import save_file

        save_file({"text_model.embeddings.weight": torch.zeros(3)},
                  str(checkpoint / TEMPORAL_FILE))
        message = "not a vedit checkpoint"
    else:
        (checkpoint / LORA_FILE).rename(checkpoint / "lora.bin")  # only safetensors is read
        message = "is missing"
    before = snapshot(project)
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--steps", "1"])
    assert_clean_failure(result, 3, message)
    assert snapshot(project) == before


def test_a_project_from_a_newer_vedit(project: Path, clip_qcif: Path) -> None:
    record = project / "vedit.toml"
    record.write_text(record.read_text().replace(f"format = {FORMAT}", f"format = {FORMAT + 1}"))
    before = snapshot(project)
    for args in (["extract", str(clip_qcif), "-o", str(project)],
                 ["tune", str(project), "--prompt", PROMPT],
                 ["edit", str(project), "-p", "a cat"], ["remux", str(project)]):
        assert_clean_failure(runner.invoke(app, args), 4, "written by a newer vedit")
    assert snapshot(project) == before


def test_a_record_edited_into_nonsense(project: Path) -> None:
    record = project / "vedit.toml"
    record.write_text(record.read_text().replace('dir = "frames"', 'dir = "../../etc"'))
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat"])
    assert_clean_failure(result, 4, "holds a bad value: frames.dir = '../../etc'")
    record.write_text("format = 1\n[frames\nbroken")
    assert_clean_failure(runner.invoke(app, ["tune", str(project), "--prompt", "x"]), 4,
                         "not valid TOML")


def test_a_second_vedit_on_the_same_project(project: Path, clip_qcif: Path) -> None:
    before = snapshot(project)
    with Project.open(project).lock("tune"):
        for args in (["extract", str(clip_qcif), "-o", str(project), "-n", "4", "--size", "64"],
                     ["tune", str(project), "--prompt", PROMPT, "--steps", "1"],
                     ["edit", str(project), "-p", "a cat", "--steps", "1"]):
            assert_clean_failure(runner.invoke(app, args), 5, "is in use by `vedit tune`")
    assert snapshot(project) == before
    still_usable(project)


# -- a full disk, faked where the bytes are written --------------------------------------------


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_extract_keeps_the_old_frames(project: Path, clip_720p: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(project)
    monkeypatch.setattr(Image.Image, "save", no_space)
    result = runner.invoke(app, ["extract", str(clip_720p), "-o", str(project), "-n", "5",
                                 "--size", "64"])
    assert_clean_failure(result, 8, "The disk is full")
    assert snapshot(project) == before
    monkeypatch.undo()
    still_usable(project)


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vedit.tensorfiles

    def full_when_writing(path: object, mode: str = "r", *args: object, **kwargs: object):
        if "w" in mode:
            no_space()
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(vedit.tensorfiles, "open", full_when_writing, raising=False)
    result = runner.invoke(app, ["tune", str(project), "--resume", "--steps", "3"])
    assert_clean_failure(result, 8, "The disk is full")
    assert [c.step for c in list_checkpoints(Project.open(project))] == [2]
    monkeypatch.undo()
    still_usable(project)


def test_full_disk_while_writing_an_edit_leaves_no_edit(project: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = av.open

    def full_when_writing(file: object, mode: str = "r", *args: object, **kwargs: object):
        if mode == "w":
            raise av.error.OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(av, "open", full_when_writing)
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--steps", "1"])
    assert_clean_failure(result, 8, "The disk is full")
    edits = project / "edits"
    assert not edits.exists() or not list(edits.iterdir())
    monkeypatch.undo()
    still_usable(project)


# -- out of GPU memory -------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["GPU", "CPU"])
def test_out_of_memory_names_the_settings_to_lower(project: Path, device: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import vedit.tune

    def no_memory(*args: object, **kwargs: object) -> None:
        if device == "GPU":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 40000000000000 bytes.")

    monkeypatch.setattr(vedit.tune, "training_loss", no_memory)
    result = runner.invoke(app, ["tune", str(project), "--prompt", PROMPT, "--steps", "3"])
    assert_clean_failure(result, 7, "ran out of")
    assert "--frames" in result.stderr and "--size" in result.stderr
    assert "--rank" in result.stderr


# -- Ctrl-C, SIGTERM and SIGKILL in real processes ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_extract_writes_nothing(tmp_path: Path, signal_number: int) -> None:
    clip = make_clip(tmp_path / "long.mp4", width=640, height=360, fps=25, seconds=8.0)
    target = tmp_path / "p"
    process = start("extract", clip, "-o", target, "-n", "100", "--stride", "2")
    wait_for(lambda: any(target.glob(".frames.new.tmp-*")), process)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "error: Interrupted." in stderr and "Traceback" not in stderr
    assert not target.exists()


#: A new tuning run on a tuned project, stopped at each of its phases in turn: (the function
#: whose call the signal comes before, which call, the signal, the checkpoints it leaves).
TUNE_PHASES = [
    ("vedit.tune:load_components", 1, "SIGTERM", []),  # loading the base model
    ("vedit.latents:encode_frames", 1, "SIGINT", []),  # encoding the frames
    ("vedit.tune:fixed_draw_loss", 1, "SIGTERM", []),  # the loss before tuning
    ("vedit.tune:train_step", 1, "SIGINT", []),  # the first step
    ("vedit.tensorfiles:save_tensors", 2, "SIGTERM", ["run-2/step-1"]),  # its first checkpoint
    ("vedit.tune:train_step", 3, "SIGINT", ["run-3/step-1", "run-3/step-2"]),  # after it
    ("vedit.tune:fixed_draw_loss", 2, "SIGTERM",  # the loss after tuning
     ["run-4/step-1", "run-4/step-2", "run-4/step-3"]),
]


@pytest.mark.slow
def test_a_new_run_interrupted_at_any_phase_loses_no_checkpoint(tmp_path: Path,
                                                                  project: Path) -> None:
    """Real signals in a real process at every phase of a new run: every earlier checkpoint
    stays byte for byte, the record names one that exists, the interrupted run says how to
    resume and resumes, and edit works after."""
    shutil.rmtree(project / "latents")  # so that the run encodes the frames again
    plan: list[dict[str, object]] = [
        {"args": ["tune", str(project), "--prompt", PROMPT, "--steps", "3",
                  "--checkpoint-every", "1", "-q"], "phase": phase, "call": call, "signal": name}
        for phase, call, name, _ in TUNE_PHASES]
    plan.append({"args": ["tune", str(project), "--resume", "--steps", "4", "-q"]})
    earlier = {"run-1/step-2": snapshot(project / "checkpoints" / "run-1" / "step-2")}
    done = interrupted(tmp_path, plan)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert json.loads((tmp_path / "codes.json").read_text()) == [130] * len(TUNE_PHASES) + [0]
    assert "saved checkpoints/run-3/step-2" in done.stderr and "--resume" in done.stderr
    # Each interrupted run added only its own checkpoints; the others are as they were; the
    # resume went on with the latest run.
    expected = [name for *_, names in TUNE_PHASES for name in names] + ["run-4/step-4"]
    found = list_checkpoints(Project.open(project))
    assert [c.name for c in found] == ["run-1/step-2", *expected]
    for name, files in earlier.items():
        assert snapshot(project / "checkpoints" / name) == files
    record = Project.open(project).record["tune"]
    assert record["checkpoint"] == found[-1].name
    for checkpoint in ("run-1/step-2", None):
        args = ["edit", str(project), "-p", "a cat", "--steps", "1", "-q"]
        result = runner.invoke(app, args + (["--checkpoint", checkpoint] if checkpoint else []))
        assert result.exit_code == 0, result.stderr


#: An edit, then a remux, stopped at each of their phases in turn: (command, the function whose
#: call the signal comes before, which call, the signal).
EDIT_AND_REMUX_PHASES = [
    ("edit", "vedit.edit:load_components", 1, "SIGTERM"),  # loading the models
    ("edit", "vedit.edit:ddim_invert", 1, "SIGINT"),  # inverting the frames
    ("edit", "vedit.edit:ddim_sample", 1, "SIGTERM"),  # sampling
    ("edit", "vedit.edit:Mp4Writer", 1, "SIGINT"),  # opening video.mp4
    ("edit", "vedit.edit:side_by_side", 3, "SIGTERM"),  # two frames of each video written
    ("remux", "vedit.remux:mux", 1, "SIGINT"),  # before muxing
    ("remux", "vedit.audio:_video_packets", 1, "SIGTERM"),  # final.mp4's file open, half written
]


@pytest.mark.slow
def test_an_edit_or_remux_interrupted_at_any_phase_leaves_no_half_result(
        tmp_path: Path, project: Path) -> None:
    """Real signals in a real process at every phase of edit and of remux: each ends 130, no
    edit folder or final video is left half made, nor a temporary file, and both then run."""
    commands = {"edit": ["edit", str(project), "-p", "a dog", "--steps", "2", "--name", "dog",
                         "-q"],
                "remux": ["remux", str(project), "dog", "-q"]}
    plan: list[dict[str, object]] = []
    for command, phase, call, name in EDIT_AND_REMUX_PHASES:
        if command == "remux" and not any(step["args"] == commands["edit"] and "phase" not in step
                                          for step in plan):
            plan.append({"args": commands["edit"]})  # remux needs the edit, whole
        plan.append({"args": commands[command], "phase": phase, "call": call, "signal": name})
    plan.append({"args": commands["remux"]})
    done = interrupted(tmp_path, plan)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    codes = [130 if "phase" in step else 0 for step in plan]
    assert json.loads((tmp_path / "codes.json").read_text()) == codes
    assert [p.name for p in (project / "edits").iterdir()] == ["dog"]  # one edit, the whole one
    folder = project / "edits" / "dog"
    assert probe(folder / "video.mp4").frame_count == 4
    assert probe(folder / "final.mp4").audio is not None
    assert not list(project.rglob(".*.tmp-*")) and not list(project.rglob("*.tmp"))
    still_usable(project)


def extracted(project: Path) -> dict[str, object]:
    """What a project's record says of its frames and sound, but where they lie, and the bytes
    of the frames and sound packets it names: equal for two projects only when both hold the
    same extract, whole (under their usual names or a new extract's)."""
    record = Project.open(project).record
    frames = {k: v for k, v in record["frames"].items() if k not in ("seconds", "dir")}
    source = {k: v for k, v in record["source"].items() if k != "audio_file"}
    sound = project / record["source"]["audio_file"]
    return {"record": (frames, source, record["extract"]),
            "frames": list(snapshot(project / record["frames"]["dir"]).items()),
            "sound": (sound.suffixes[-1], audio_packets(sound))}


#: A re-extract (other frames of the same clip) stopped at each of its phases: (the function
#: whose call the signal comes before, which call, the signal, which extract the project holds).
EXTRACT_PHASES = [
    ("vedit.extract:file_sha256", 1, "SIGINT", "old"),  # hashing the clip
    ("vedit.audio:copy_audio", 1, "SIGTERM", "old"),  # copying the sound
    ("vedit.extract:fit_frame", 2, "SIGINT", "old"),  # writing the frames
    ("vedit.project:write_text_atomic", 1, "SIGTERM", "old"),  # all written, not yet recorded
    ("vedit.extract:_link_or_copy", 2, "SIGINT", "new"),  # recorded, moving to frames/
    ("vedit.project:write_text_atomic", 2, "SIGTERM", "new"),  # moved, not yet recorded
    ("vedit.extract:_drop_unnamed", 2, "SIGINT", "new"),  # recorded, the old not yet removed
]


@pytest.mark.slow
def test_a_re_extract_interrupted_at_any_phase_leaves_the_old_or_the_new_whole(
        tmp_path: Path, project: Path) -> None:
    """Real signals at every phase of an extract over an existing project: its record and
    files are the old extract's or the new one's, whole, and status, tune and edit work."""
    clip = Project.open(project).record["source"]["path"]
    again = ["-n", "3", "--size", "64", "--start", "0.2", "-q"]
    old = extracted(project)
    copies = [tmp_path / f"p{i}" for i in range(len(EXTRACT_PHASES))]
    for copy in [*copies, tmp_path / "new"]:
        shutil.copytree(project, copy)
    assert runner.invoke(app, ["extract", clip, "-o", str(tmp_path / "new"), *again]).exit_code == 0
    new = extracted(tmp_path / "new")
    done = interrupted(tmp_path, [{"args": ["extract", clip, "-o", str(copy), *again],
                                   "phase": phase, "call": call, "signal": name}
                                  for copy, (phase, call, name, _)
                                  in zip(copies, EXTRACT_PHASES, strict=True)])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert json.loads((tmp_path / "codes.json").read_text()) == [130] * len(EXTRACT_PHASES)
    for copy, (phase, call, _, holds) in zip(copies, EXTRACT_PHASES, strict=True):
        assert extracted(copy) == (old if holds == "old" else new), f"{phase} #{call}"
        status = runner.invoke(app, ["status", str(copy), "--json"])
        assert status.exit_code == 0 and json.loads(status.stdout)["damaged"] == [], phase
    # Stopped while the new frames move in, the record names them where they were written:
    # tune and edit read them there, and the next extract puts them in their usual place.
    moving = copies[4]
    assert Project.open(moving).record["frames"]["dir"] == "frames.new"
    tuned = runner.invoke(app, ["tune", str(moving), "--prompt", PROMPT, "--steps", "1",
                                "--no-eval", "-q"])
    assert tuned.exit_code == 0, tuned.stderr
    still_usable(moving)
    assert runner.invoke(app, ["extract", clip, "-o", str(moving), *again]).exit_code == 0
    assert extracted(moving) == new and Project.open(moving).record["frames"]["dir"] == "frames"
    assert sorted(p.name for p in moving.rglob("*") if "new" in p.name) == []


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_edit_leaves_no_edit_folder(project: Path, signal_number: int) -> None:
    process = start("edit", project, "-p", "a cat", "--steps", "500")
    lock = project / LOCK_NAME
    wait_for(lambda: "vedit edit" in lock.read_text(), process)  # it holds the project
    time.sleep(0.5)  # loading the model, or already inverting: 500 steps take far longer
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert not (project / "edits").exists() or not any((project / "edits").iterdir())
    still_usable(project)


@pytest.mark.slow
def test_a_killed_tune_leaves_loadable_checkpoints_and_a_free_lock(project: Path) -> None:
    shutil.rmtree(project / "checkpoints")  # the project still knows its base model
    process = start("tune", project, "--prompt", PROMPT, "--steps", "100000",
                    "--checkpoint-every", "1")
    wait_for(lambda: len(list_checkpoints(Project.open(project))) >= 3, process)
    process.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    process.wait(timeout=30)
    found = list_checkpoints(Project.open(project))
    assert len(found) >= 3
    for checkpoint in found:  # a folder that is listed is complete
        for name in (LORA_FILE, TEMPORAL_FILE):
            assert load_tensors(checkpoint.path / name)[0]
    resumed = vedit("tune", project, "--resume", "--steps", found[-1].step + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(project.rglob(".*.tmp-*"))  # the next run swept what the kill left


def killed(tmp_path: Path, project: Path, args: list[str], phase: str, call: int) -> list[str]:
    """Run `vedit ARGS` and SIGKILL it right before the `call`-th call of `phase` (a moment it
    is writing): it dies holding the project's lock. The temporaries it left, by name."""
    step = {"args": args, "phase": phase, "call": call, "signal": "SIGKILL"}
    done = interrupted(tmp_path, [step])
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert f"`vedit {args[0]}` (pid " in (project / LOCK_NAME).read_text()  # no one unlocked
    return sorted(p.relative_to(project).as_posix() for p in project.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_killed_extract_edit_and_remux_leave_a_usable_project(tmp_path: Path,
                                                              project: Path) -> None:
    """SIGKILL (no handler runs) while each writes: what it was writing is never taken for
    finished, the lock it held is free, and the same command run again succeeds."""
    other = tmp_path / "other"  # extract: killed after its first new frame
    shutil.copytree(project, other)
    clip = Project.open(other).record["source"]["path"]
    again = ["extract", clip, "-o", str(other), "-n", "3", "--size", "64", "--start", "0.2"]
    old = extracted(other)
    assert killed(tmp_path, other, again, "vedit.extract:fit_frame", 2)
    assert extracted(other) == old
    assert json.loads(runner.invoke(app, ["status", str(other), "--json"]).stdout)["damaged"] == []
    assert runner.invoke(app, [*again, "-q"]).exit_code == 0
    assert Project.open(other).record["frames"]["count"] == 3
    assert not list(other.rglob(".*.tmp-*")) and not (other / "frames.new").exists()

    edit = ["edit", str(project), "-p", "a cat", "--steps", "1", "--name", "cat"]
    left = killed(tmp_path, project, edit, "vedit.edit:side_by_side", 2)  # mid video.mp4
    assert [name for name in left if name.startswith("edits/.cat.tmp-")], left
    assert Project.open(project).edit_names() == []
    assert json.loads(runner.invoke(app, ["status", str(project), "--json"]).stdout)[
        "edits"] == []
    assert runner.invoke(app, ["remux", str(project)]).exit_code == 4  # "no edits yet"
    assert runner.invoke(app, [*edit, "-q"]).exit_code == 0
    assert Project.open(project).edit_names() == ["cat"] and not list(project.rglob(".*.tmp-*"))

    assert runner.invoke(app, ["remux", str(project), "-q"]).exit_code == 0
    final = project / "edits" / "cat" / "final.mp4"
    first = final.read_bytes()
    left = killed(tmp_path, project, ["remux", str(project)], "vedit.audio:_audio_duration", 1)
    assert left == [name for name in left if name.startswith("edits/cat/.final.mp4.tmp-")]
    assert left and final.read_bytes() == first  # the new one, written whole, never moved in
    assert runner.invoke(app, ["remux", str(project), "-q"]).exit_code == 0
    assert probe(final).frame_count == 4 and not list(project.rglob(".*.tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_download_resumes(tmp_path: Path, tiny_model: Path, fake_hub: object,
                                      signal_number: int) -> None:
    from hub_server import FakeHub

    assert isinstance(fake_hub, FakeHub)
    unet = "unet/diffusion_pytorch_model.safetensors"
    fake_hub.add_folder("org/tiny", tiny_model)
    fake_hub.slow_down(unet, 200_000)
    env = {"HF_ENDPOINT": fake_hub.endpoint, "HF_HOME": os.environ["HF_HOME"],
           "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"]}
    blobs = Path(os.environ["HF_HUB_CACHE"]) / "models--org--tiny" / "blobs"
    process = start("fetch-models", "org/tiny", env=env)
    # The unet is on its way: a partial file larger than any config (the small files come
    # first, each briefly partial too), which the slowed-down unet takes seconds to finish.
    wait_for(lambda: any(p.stat().st_size > 64_000 for p in blobs.glob("*.incomplete")),
             process)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert list(blobs.glob("*.incomplete"))  # the partial file is kept for the next run
    fake_hub._slow.clear()
    done = vedit("fetch-models", "org/tiny", "--json", env=env)
    assert done.returncode == 0, done.stderr
    snapshot_unet = Path(json.loads(done.stdout)["path"]) / unet
    assert snapshot_unet.read_bytes() == (tiny_model / unet).read_bytes()
    assert not list(blobs.glob("*.incomplete"))


# The entry point as the console script runs it, sent SIGNAL by itself at MOMENT: while vedit
# imports Typer, or while Typer parses the command line. No timing: the moment is an event.
AT_A_MOMENT = """
import os, signal, sys
number = getattr(signal, sys.argv[1])
kill = lambda: os.kill(os.getpid(), number)
if sys.argv[2] == "import":
    sys.addaudithook(lambda event, args: event == "import" and args[0] == "typer" and kill())
else:
    import typer.core
    parse = typer.core.TyperCommand.parse_args
    typer.core.TyperCommand.parse_args = lambda self, *a: (kill(), parse(self, *a))[1]
from vedit.__main__ import main
sys.argv = ["vedit", *sys.argv[3:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["import", "parse"])
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_vedit_starts_is_reported_too(tmp_path: Path, moment: str,
                                                     signal_number: int) -> None:
    done = subprocess.run([sys.executable, "-c", AT_A_MOMENT, signal.Signals(signal_number).name,
                           moment, "extract", str(tmp_path / "missing.mp4")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.startswith("error: Interrupted."), done.stderr
    assert "Traceback" not in done.stderr


# -- two writers at once -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_edits_at_once_one_waits_its_turn_or_is_refused(project: Path) -> None:
    first = start("edit", project, "-p", "a cat", "--steps", "3", "--name", "first")
    second = start("edit", project, "-p", "a dog", "--steps", "3", "--name", "second")
    results = {name: (p.wait(timeout=180), p.communicate()[1])
               for name, p in (("first", first), ("second", second))}
    codes = sorted(code for code, _ in results.values())
    assert codes in ([0, 0], [0, 5]), results
    for name, (code, stderr) in results.items():
        folder = project / "edits" / name
        if code == 0:
            video = probe(folder / "video.mp4")
            assert video.frame_count == 4 and video.codec == "h264"
        else:
            assert "is in use by `vedit edit`" in stderr and not folder.exists()


# -- what is never loaded or run -----------------------------------------------------------------


SOURCE = Path(__file__).resolve().parent.parent / "src" / "vedit"


@pytest.mark.parametrize("forbidden", ["torch.load(", "import pickle", "pickle.load",
                                       "trust_remote_code=True", "weights_only=False",
                                       "eval(", "exec("])
def test_the_source_never_unpickles_or_runs_loaded_code(forbidden: str) -> None:
    pattern = re.compile(r"(?<![\w.])" + re.escape(forbidden))  # eval(), not unet.eval()
    offenders = [p.name for p in SOURCE.glob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"{forbidden} in {offenders}"


def test_a_model_folder_is_read_not_run(tmp_path: Path, tiny_model: Path) -> None:
    """A folder naming its own pipeline code gets its weights loaded, its code never run."""
    from vedit.models import load_components

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "ran"
    (model / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    index = (model / "model_index.json").read_text()
    (model / "model_index.json").write_text(
        index.replace('"StableDiffusionPipeline"', '["pipeline", "MyPipeline"]'))
    for name in ("unet", "vae"):
        config = model / name / "config.json"
        config.write_text(config.read_text().replace("{", '{"auto_map": {"AutoModel": '
                                                     '"pipeline.Evil"}, ', 1))
    load_components(model, device="cpu")
    assert not marker.exists()


def test_a_pyav_without_an_encoder_is_this_machines_problem(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """exit 9 (see vedit doctor), not "bad input" nor "a bug"."""
    import vedit.video

    real = vedit.video.encoder_stream

    def without_x264(container: object, codec: str, **options: object) -> object:
        return real(container, "no-such-x264" if codec == "libx264" else codec, **options)

    monkeypatch.setattr(vedit.video, "encoder_stream", without_x264)
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--steps", "1"])
    assert_clean_failure(result, 9, "cannot encode no-such-x264")
    assert "vedit doctor" in result.stderr
    assert not (project / "edits").exists() or not any((project / "edits").iterdir())


@pytest.mark.slow
def test_a_reader_that_closes_stdout_early_ends_vedit_quietly() -> None:
    """`vedit doctor --json | head -0`: the pipe is closed before vedit writes its result."""
    process = subprocess.Popen([sys.executable, "-m", "vedit", "doctor", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.close()
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 141, stderr
    assert stderr == ""
