"""vedit tune on the tiny model: checkpoints, resume, the loss falls, interrupts, errors."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launcher import launch_vedit
from rich.console import Console
from typer.testing import CliRunner

from vedit import tune as tune_stage
from vedit.checkpoints import LORA_FILE, TEMPORAL_FILE, list_checkpoints
from vedit.cli import app, tune_summary
from vedit.errors import BadInputError, Interrupted, OutOfMemoryError, ProjectLockedError
from vedit.extract import extract
from vedit.memory import predict as predict_module
from vedit.memory.gpu import Gpu, gpu_with_memory
from vedit.memory.predict import MemoryPrediction
from vedit.models import resolve_model
from vedit.progress import Reporter
from vedit.project import Project
from vedit.settings import ExtractSettings, TuneSettings
from vedit.tensorfiles import load_tensors
from vedit.tiny_model import TINY_RESOLUTION

runner = CliRunner()
PROMPT = "a man is talking"


@pytest.fixture()
def project(tmp_path: Path, clip_qcif: Path) -> Path:
    extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    return tmp_path / "p"


def settings(model: Path, **changes: object) -> TuneSettings:
    values: dict = dict(prompt=PROMPT, model=str(model), steps=6, checkpoint_every=0)
    values.update(changes)
    return TuneSettings(**values)


@pytest.mark.slow
def test_one_shot_tune_writes_checkpoints_then_resumes(tmp_path: Path, clip_qcif: Path,
                                                       tiny_model: Path) -> None:
    clip = tmp_path / "talk.mp4"
    clip.write_bytes(clip_qcif.read_bytes())
    result = runner.invoke(app, [
        "tune", str(clip), "--prompt", PROMPT, "--model", str(tiny_model), "--frames", "6",
        "--size", "64", "--steps", "30", "--checkpoint-every", "10", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["extract"]["frame_count"] == 6
    assert data["project"] == str(tmp_path / "talk.vedit")
    assert [Path(p).name for p in data["checkpoints"]] == ["step-10", "step-20", "step-30"]
    for folder in map(Path, data["checkpoints"]):
        lora, metadata = load_tensors(folder / LORA_FILE)
        assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
        assert {k.split(".transformer_blocks.")[1].split(".lora_")[0][2:] for k in lora} == {
            "attn1.to_q", "attn2.to_q"}
        assert metadata["base_model"] == str(tiny_model)
        temporal, _ = load_tensors(folder / TEMPORAL_FILE)
        assert temporal and all(".attn_temp." in k for k in temporal)
    assert data["run"] == "run-1"
    assert [Path(p).parent.name for p in data["checkpoints"]] == ["run-1"] * 3
    log = (tmp_path / "talk.vedit" / "checkpoints" / "run-1" / "tune.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == list(range(1, 31))

    again = runner.invoke(app, ["tune", str(tmp_path / "talk.vedit"), "--steps", "40",
                                "--resume", "--json"])
    assert again.exit_code == 0, again.stderr
    resumed = json.loads(again.stdout)
    assert resumed["start_step"] == 30 and resumed["steps"] == 40
    assert resumed["latents_reused"] is True
    assert "Reusing the frames' VAE latents from an earlier run" in again.stderr
    assert ".safetensors" not in again.stderr  # a cache key means nothing to a user
    assert resumed["run"] == "run-1"
    assert [Path(p).name for p in resumed["checkpoints"]] == ["step-40"]
    log = (tmp_path / "talk.vedit" / "checkpoints" / "run-1" / "tune.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == list(range(1, 41))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_tensors(folder / LORA_FILE)[0] | load_tensors(folder / TEMPORAL_FILE)[0]


@pytest.mark.slow
def test_resuming_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, clip_qcif: Path,
                                                                 tiny_model: Path) -> None:
    for name in ("straight", "resumed"):
        extract(clip_qcif, tmp_path / name, ExtractSettings(frames=4, size="64"))
    tune_stage.tune(tmp_path / "straight", settings(tiny_model, steps=8, lr=1e-3, lora_lr=1e-3))
    tune_stage.tune(tmp_path / "resumed", settings(tiny_model, steps=4, lr=1e-3, lora_lr=1e-3))
    tune_stage.tune(tmp_path / "resumed", settings(tiny_model, steps=8, lr=1e-3, lora_lr=1e-3),
                    resume=True)
    straight = _weights(tmp_path / "straight" / "checkpoints" / "run-1" / "step-8")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "run-1" / "step-8")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    assert any(straight[k].abs().sum() > 0 for k in straight if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_the_loss_on_fixed_draws_falls_clearly(project: Path, tiny_model: Path) -> None:
    result = tune_stage.tune(project, settings(tiny_model, steps=40, lr=1e-2, lora_lr=1e-2))
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < 0.85 * result.eval_loss_before


@pytest.mark.slow
def test_latents_are_cached_by_frames_and_model(project: Path, tiny_model: Path,
                                                clip_qcif: Path) -> None:
    assert not tune_stage.tune(project, settings(tiny_model, steps=1)).latents_reused
    assert tune_stage.tune(project, settings(tiny_model, steps=1)).latents_reused
    extract(clip_qcif, project, ExtractSettings(frames=5, size="64"))  # new frames: new key
    assert not tune_stage.tune(project, settings(tiny_model, steps=1)).latents_reused
    assert len(list((project / "latents").glob("*.safetensors"))) == 2


def test_a_checkpoint_from_another_base_model_is_refused(project: Path, tiny_model: Path,
                                                         tiny_model_v: Path) -> None:
    tune_stage.tune(project, settings(tiny_model, steps=2))
    with pytest.raises(BadInputError, match="was tuned on"):
        tune_stage.tune(project, settings(tiny_model_v, steps=4), resume=True)


def test_resume_refuses_another_lora_shape(project: Path, tiny_model: Path) -> None:
    tune_stage.tune(project, settings(tiny_model, steps=2))
    with pytest.raises(BadInputError, match="LoRA rank 16"):
        tune_stage.tune(project, settings(tiny_model, steps=4, rank=4), resume=True)


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(project: Path, tiny_model: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = tune_stage.training_loss
    calls = []

    def interrupted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())  # training steps, not the no-grad evaluation
        if calls.count(True) == 5:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(tune_stage, "training_loss", interrupted)
    with pytest.raises(Interrupted, match="interrupted at step 4; saved checkpoints/run-1/step-4"):
        tune_stage.tune(project, settings(tiny_model, steps=10))
    monkeypatch.setattr(tune_stage, "training_loss", real_loss)
    assert [c.step for c in list_checkpoints(Project.open(project))] == [4]
    result = tune_stage.tune(project, settings(tiny_model, steps=6), resume=True)
    assert result.start_step == 4


def test_out_of_memory_is_a_clear_error(project: Path, tiny_model: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tune_stage, "training_loss", no_memory)
    with pytest.raises(OutOfMemoryError) as caught:
        tune_stage.tune(project, settings(tiny_model))
    assert "fewer frames" in caught.value.hint and "--rank" in caught.value.hint


def test_a_second_tune_on_a_busy_project_is_refused(project: Path, tiny_model: Path) -> None:
    with Project.open(project).lock("edit"), pytest.raises(ProjectLockedError):
        tune_stage.tune(project, settings(tiny_model))


def test_tune_needs_a_prompt_and_frames(tmp_path: Path, project: Path, tiny_model: Path,
                                        clip_qcif: Path) -> None:
    with pytest.raises(BadInputError, match="needs the prompt"):
        tune_stage.tune(project, settings(tiny_model, prompt=" "))
    result = runner.invoke(app, ["tune", str(project), "--prompt", PROMPT, "--frames", "4"])
    assert result.exit_code == 2 and "go with a clip" in result.stderr
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(clip_qcif.read_bytes())
    with pytest.raises(BadInputError, match="needs the prompt"):  # before extracting anything
        tune_stage.tune_clip(clip, settings(tiny_model, prompt=""))
    assert not (tmp_path / "clip.vedit").exists()

    result = runner.invoke(app, ["tune", str(clip), "--prompt", PROMPT, "--model",
                                 "no-org/no-model"])
    assert result.exit_code == 6 and not (tmp_path / "clip.vedit").exists()  # nothing left


def test_no_eval_skips_the_loss_on_fixed_draws(project: Path, tiny_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def drawn(*args: object, **kwargs: object) -> float:
        raise AssertionError("the fixed-draw loss was computed with --no-eval")

    monkeypatch.setattr(tune_stage, "fixed_draw_loss", drawn)
    tuned = tune_stage.tune(project, settings(tiny_model, steps=1, eval=False))
    assert tuned.eval_loss_before is None and tuned.eval_loss_after is None
    assert "Loss on fixed draws" not in tune_summary(project, tuned)


def test_a_long_prompt_is_warned_about(project: Path, tiny_model: Path) -> None:
    long_prompt = "a man is talking " * 40
    with pytest.warns(UserWarning, match="cut after"):
        tune_stage.tune(project, settings(tiny_model, prompt=long_prompt, steps=1))


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tmp_path: Path, project: Path,
                                               tiny_model: Path) -> None:
    """Data parallel on two CPU processes (gloo): the same command, one result on stdout."""
    done = launch_vedit("tune", project, "--prompt", PROMPT, "--model", tiny_model, "--steps", "4",
                        "--checkpoint-every", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # exactly one JSON document
    assert result["processes"] == 2
    assert [Path(p).name for p in result["checkpoints"]] == ["step-2", "step-4"]
    assert [c.step for c in list_checkpoints(Project.open(project))] == [2, 4]


def test_gradient_accumulation_counts_optimizer_steps(project: Path, tiny_model: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With --grad-accum 3 each step is three batches: the log has one line per optimizer
    step, and the weights move."""
    real_loss = tune_stage.training_loss
    batches: list[bool] = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        batches.append(torch.is_grad_enabled())  # training batches, not the evaluation
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(tune_stage, "training_loss", counted)
    result = tune_stage.tune(project, settings(tiny_model, steps=2, grad_accum=3, lr=1e-3,
                                               lora_lr=1e-3))
    assert batches.count(True) == 6
    assert result.steps == 2
    log = (project / "checkpoints" / "run-1" / "tune.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    lora = load_tensors(project / "checkpoints" / "run-1" / "step-2" / LORA_FILE)[0]
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_resuming_to_a_step_already_reached_does_nothing(project: Path, tiny_model: Path) -> None:
    tune_stage.tune(project, settings(tiny_model, steps=4, checkpoint_every=2))
    record = (project / "vedit.toml").read_text()
    result = runner.invoke(app, ["tune", str(project), "--resume", "--steps", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["start_step"], data["steps"], data["checkpoints"]) == (4, 4, [])
    assert "already tuned to step 4" in runner.invoke(app, ["tune", str(project), "--resume",
                                                            "--steps", "3"]).stdout
    assert (project / "vedit.toml").read_text() == record
    assert [c.step for c in list_checkpoints(Project.open(project))] == [2, 4]


def test_a_half_written_loss_log_line_does_not_stop_a_resume(project: Path,
                                                              tiny_model: Path) -> None:
    tune_stage.tune(project, settings(tiny_model, steps=2))
    log = project / "checkpoints" / "run-1" / "tune.jsonl"
    with log.open("a") as handle:
        handle.write('{"step": 3, "lo')  # a process killed in the middle of a line
    tune_stage.tune(project, settings(tiny_model, steps=3), resume=True)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_a_new_run_keeps_the_earlier_runs(project: Project, tiny_model: Path) -> None:
    first = tune_stage.tune(project, settings(tiny_model, steps=2))
    files = {p: p.read_bytes() for p in (project / "checkpoints" / "run-1").rglob("*")
             if p.is_file()}
    second = tune_stage.tune(project, settings(tiny_model, steps=3, seed=5))
    assert (first.run, second.run) == ("run-1", "run-2")
    assert [c.name for c in list_checkpoints(Project.open(project))] == [
        "run-1/step-2", "run-2/step-3"]
    assert {p: p.read_bytes() for p in files} == files
    assert Project.open(project).record["tune"]["checkpoint"] == "run-2/step-3"
    resumed = tune_stage.tune(project, settings(tiny_model, steps=4), resume=True)
    assert (resumed.run, resumed.start_step) == ("run-2", 3)  # --resume: the latest run


def test_a_project_tuned_before_runs_were_kept(project: Project, tiny_model: Path) -> None:
    """The old layout, checkpoints/step-N/ and logs/tune.jsonl: edited, resumed, and kept when
    a new run starts."""
    tune_stage.tune(project, settings(tiny_model, steps=2))
    old = project / "checkpoints"
    (old / "run-1" / "step-2").rename(old / "step-2")
    (project / "logs").mkdir()
    (old / "run-1" / "tune.jsonl").rename(project / "logs" / "tune.jsonl")
    (old / "run-1").rmdir()
    record = project / "vedit.toml"
    record.write_text(record.read_text().replace('"run-1/step-2"', '"step-2"')
                      .replace('run = "run-1"\n', ""))
    edited = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--steps", "1", "--json"])
    assert edited.exit_code == 0, edited.stderr
    assert json.loads(edited.stdout)["edits"][0]["checkpoint"] == "step-2"

    resumed = tune_stage.tune(project, settings(tiny_model, steps=3), resume=True)
    assert (resumed.run, resumed.start_step) == ("", 2)
    assert (old / "step-3" / LORA_FILE).is_file()
    log = (project / "logs" / "tune.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]

    fresh = tune_stage.tune(project, settings(tiny_model, steps=1))
    assert fresh.run == "run-1"
    assert [c.name for c in list_checkpoints(Project.open(project))] == [
        "step-2", "step-3", "run-1/step-1"]


def test_the_human_result_gives_the_losses_the_checkpoint_and_the_next_command(
        tmp_path: Path) -> None:
    from vedit.cli import tune_summary

    folder = tmp_path / "p.vedit" / "checkpoints" / "run-2" / "step-300"
    tuned = tune_stage.TuneResult(
        project=tmp_path / "p.vedit", steps=300, start_step=0, checkpoints=[folder],
        loss_log=folder.parent / "tune.jsonl", device="cpu", mixed_precision="no",
        seconds=12.0, latents_reused=True, run="run-2", training_seconds=10.0,
        eval_loss_before=0.25, eval_loss_after=0.125)
    text = tune_summary(tmp_path / "p.vedit", tuned)
    assert "to step 300 (run run-2) in 12.0 s." in text
    assert "Loss on fixed draws: 0.2500 before, 0.1250 after." in text
    assert f"Checkpoint: {folder}" in text and "vedit edit" in text
    assert tuned.to_dict()["seconds_per_step"] == pytest.approx(10.0 / 300, abs=1e-4)


def test_ctrl_c_inside_a_step_resumes_exactly_as_the_uninterrupted_run(
        tmp_path: Path, clip_qcif: Path, tiny_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after step 3's noise and timestep draws, inside its forward: the checkpoint
    holds the generator as step 3 began, so the resumed run draws the same and ends equal."""
    for name in ("straight", "resumed"):
        extract(clip_qcif, tmp_path / name, ExtractSettings(frames=4, size="64"))
    fast = dict(lr=1e-3, lora_lr=1e-3)
    tune_stage.tune(tmp_path / "straight", settings(tiny_model, steps=4, **fast))
    real_batch = tune_stage.noisy_batch
    drawn: list[bool] = []

    def drawn_then_interrupted(*args: object, **kwargs: object) -> object:
        batch = real_batch(*args, **kwargs)  # the step's draws are made
        drawn.append(torch.is_grad_enabled())  # training steps, not the no-grad evaluation
        if drawn.count(True) == 3:
            raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(tune_stage, "noisy_batch", drawn_then_interrupted)
    with pytest.raises(Interrupted, match="at step 2; saved checkpoints/run-1/step-2"):
        tune_stage.tune(tmp_path / "resumed", settings(tiny_model, steps=4, **fast))
    monkeypatch.setattr(tune_stage, "noisy_batch", real_batch)
    tune_stage.tune(tmp_path / "resumed", settings(tiny_model, steps=4, **fast), resume=True)
    straight = _weights(tmp_path / "straight" / "checkpoints" / "run-1" / "step-4")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "run-1" / "step-4")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_a_signal_during_the_update_waits_for_the_step_to_be_counted(
        project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving while the optimizer updates the weights is held until that step is
    counted, so the checkpoint is of whole steps (never an update without its step)."""
    import os
    import signal

    from torch.optim import AdamW

    real_step = AdamW.step
    updates = []

    def step_then_ctrl_c(self: AdamW, *args: object, **kwargs: object) -> object:
        result = real_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered at once, unless held
        return result

    monkeypatch.setattr(AdamW, "step", step_then_ctrl_c)
    with pytest.raises(Interrupted, match="at step 2; saved checkpoints/run-1/step-2"):
        tune_stage.tune(project, settings(tiny_model, steps=3))
    training = load_tensors(
        project / "checkpoints" / "run-1" / "step-2" / "training.safetensors")[0]
    adam_steps = {float(v) for k, v in training.items() if k.endswith(".step")}
    assert adam_steps == {2.0}


def test_the_fp16_loss_scale_is_kept_across_a_resume(project: Path, tiny_model: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Under fp16 the gradient scaler's state (loss scale, growth tracker) goes into the
    checkpoint and comes back on --resume, instead of restarting. On the CPU: accelerate's
    loop with a CPU GradScaler in it, as `--mixed-precision fp16` gives on a GPU."""
    from vedit.checkpoints import SCALER_KEY, TRAINING_FILE

    real_accelerator = tune_stage.make_accelerator

    def with_scaler(tune_settings: TuneSettings) -> object:
        accelerator = real_accelerator(tune_settings)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        return accelerator

    def scaler_state(step: int) -> dict:
        run = project / "checkpoints" / "run-1"
        tensors, _ = load_tensors(run / f"step-{step}" / TRAINING_FILE)
        return json.loads(bytes(tensors[SCALER_KEY].tolist()).decode())

    monkeypatch.setattr(tune_stage, "make_accelerator", with_scaler)
    tune_stage.tune(project, settings(tiny_model, steps=3))
    assert (scaler_state(3)["scale"], scaler_state(3)["_growth_tracker"]) == (2048.0, 1)
    tune_stage.tune(project, settings(tiny_model, steps=4), resume=True)
    # Restored: one more finite step completes the growth interval (afresh it would be 1024).
    assert (scaler_state(4)["scale"], scaler_state(4)["_growth_tracker"]) == (4096.0, 0)


# --- frames far above the base model's size ------------------------------------------------


def _size_check(clip: Path, tiny_model: Path, side: int, gpu: Gpu | None = None) -> str:
    """What tune's size check says before tuning one frame of `clip`, cropped to `side` px,
    on the tiny model (trained at 64 px)."""
    shown = io.StringIO()
    tune_stage.check_frame_size(side, resolve_model(str(tiny_model)), clip,
                                settings(tiny_model),
                                ExtractSettings(frames=1, size=str(side), crop=True),
                                Reporter(Console(file=shown, width=300)), gpu)
    return shown.getvalue()


def _predicted(peak_gb: float, fits: bool | None) -> Callable[..., MemoryPrediction]:
    """A stand-in for the predictor (traced for real in the warning test and test_memory)."""
    def predict_tune(plan: object, gpu: Gpu, *, advise: bool = True) -> MemoryPrediction:
        return MemoryPrediction(int(peak_gb * 2**30), int(peak_gb * 2**30), "the training step",
                                gpu, fits)
    return predict_tune


def test_frames_far_above_the_models_size_are_warned_of_with_their_memory(
        clip_qcif: Path, tiny_model: Path) -> None:
    said = _size_check(clip_qcif, tiny_model, 136)  # over twice 64 px: the predictor traces it
    assert said.startswith("warning: Frames of 136 px on the short side are 2.1x the 64 px")
    peak = re.search(r"on a GPU its training steps would peak at a predicted (\d+\.\d) GB\.", said)
    assert peak and float(peak[1]) > 0, said
    assert "Give --size 64, the model's own size." in said


def test_frames_of_a_sensible_size_predict_nothing(clip_qcif: Path, tiny_model: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("a frame size up to twice the model's own was traced")

    monkeypatch.setattr(predict_module, "predict_tune", no_trace)
    assert _size_check(clip_qcif, tiny_model, TINY_RESOLUTION) == ""
    assert _size_check(clip_qcif, tiny_model, 2 * TINY_RESOLUTION) == ""


def test_frames_that_cannot_fit_the_gpu_are_refused_before_any_work(
        tmp_path: Path, clip_qcif: Path, tiny_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict_module, "predict_tune", _predicted(30.0, fits=True))
    assert "which fits a 40 GB GPU" in _size_check(clip_qcif, tiny_model, 136,
                                                   gpu_with_memory(40))
    monkeypatch.setattr(predict_module, "predict_tune", _predicted(30.0, fits=False))
    with pytest.raises(OutOfMemoryError, match=re.escape("predicted 30.0 GB of GPU memory at "
                                                         "its peak, more than a 24 GB GPU")):
        _size_check(clip_qcif, tiny_model, 136, gpu_with_memory(24))
    # Through the CLI, on this machine's (here a pretended) GPU: exit 7, no project left behind.
    monkeypatch.setattr(tune_stage, "target_gpu", lambda: gpu_with_memory(24))
    clip = tmp_path / "talk.mp4"
    clip.write_bytes(clip_qcif.read_bytes())
    result = runner.invoke(app, ["tune", str(clip), "--prompt", PROMPT, "--model",
                                 str(tiny_model), "--frames", "2", "--size", "136"])
    assert result.exit_code == 7, result.stderr
    assert "Frames of 136 px" in result.stderr and "Give --size 64" in result.stderr
    assert not (tmp_path / "talk.vedit").exists()
