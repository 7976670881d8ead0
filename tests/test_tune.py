"""vedit tune on the tiny model: checkpoints, resume, the loss falls, interrupts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launcher import launch_vedit
from typer.testing import CliRunner

from vedit import tune as tune_stage
from vedit.checkpoints import LORA_FILE, TEMPORAL_FILE, list_checkpoints
from vedit.cli import app
from vedit.errors import BadInputError, Interrupted, OutOfMemoryError, ProjectLockedError
from vedit.extract import extract
from vedit.project import Project
from vedit.settings import ExtractSettings, TuneSettings
from vedit.tensorfiles import load_tensors

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
    log = (tmp_path / "talk.vedit" / "logs" / "tune.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 31))

    again = runner.invoke(app, ["tune", str(tmp_path / "talk.vedit"), "--steps", "40",
                                "--resume", "--json"])
    assert again.exit_code == 0, again.stderr
    resumed = json.loads(again.stdout)
    assert resumed["start_step"] == 30 and resumed["steps"] == 40
    assert resumed["latents_reused"] is True
    assert [Path(p).name for p in resumed["checkpoints"]] == ["step-40"]
    log = (tmp_path / "talk.vedit" / "logs" / "tune.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 41))


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
    straight = _weights(tmp_path / "straight" / "checkpoints" / "step-8")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "step-8")
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
    with pytest.raises(Interrupted, match="interrupted at step 4; saved checkpoints/step-4"):
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
    log = (project / "logs" / "tune.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    lora = load_tensors(project / "checkpoints" / "step-2" / LORA_FILE)[0]
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_resuming_to_a_step_already_reached_does_nothing(project: Path, tiny_model: Path) -> None:
    tune_stage.tune(project, settings(tiny_model, steps=4, checkpoint_every=2))
    record = (project / "vedit.toml").read_text()
    result = runner.invoke(app, ["tune", str(project), "--resume", "--steps", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["start_step"], data["steps"], data["checkpoints"]) == (4, 4, [])
    assert "Already tuned to step 4" in result.stderr
    assert (project / "vedit.toml").read_text() == record
    assert [c.step for c in list_checkpoints(Project.open(project))] == [2, 4]


def test_a_half_written_loss_log_line_does_not_stop_a_resume(project: Path,
                                                              tiny_model: Path) -> None:
    tune_stage.tune(project, settings(tiny_model, steps=2))
    log = project / "logs" / "tune.jsonl"
    with log.open("a") as handle:
        handle.write('{"step": 3, "lo')  # a process killed in the middle of a line
    tune_stage.tune(project, settings(tiny_model, steps=3), resume=True)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


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
    with pytest.raises(Interrupted, match="at step 2; saved checkpoints/step-2"):
        tune_stage.tune(tmp_path / "resumed", settings(tiny_model, steps=4, **fast))
    monkeypatch.setattr(tune_stage, "noisy_batch", real_batch)
    tune_stage.tune(tmp_path / "resumed", settings(tiny_model, steps=4, **fast), resume=True)
    straight = _weights(tmp_path / "straight" / "checkpoints" / "step-4")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "step-4")
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
    with pytest.raises(Interrupted, match="at step 2; saved checkpoints/step-2"):
        tune_stage.tune(project, settings(tiny_model, steps=3))
    training = load_tensors(project / "checkpoints" / "step-2" / "training.safetensors")[0]
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
        tensors, _ = load_tensors(project / "checkpoints" / f"step-{step}" / TRAINING_FILE)
        return json.loads(bytes(tensors[SCALER_KEY].tolist()).decode())

    monkeypatch.setattr(tune_stage, "make_accelerator", with_scaler)
    tune_stage.tune(project, settings(tiny_model, steps=3))
    assert (scaler_state(3)["scale"], scaler_state(3)["_growth_tracker"]) == (2048.0, 1)
    tune_stage.tune(project, settings(tiny_model, steps=4), resume=True)
    # Restored: one more finite step completes the growth interval (afresh it would be 1024).
    assert (scaler_state(4)["scale"], scaler_state(4)["_growth_tracker"]) == (4096.0, 0)
