"""vedit edit on the tiny model: inversion round trip, outputs, caching, names, remux."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clips import stream_durations
from diffusers import DDIMInverseScheduler, DDIMScheduler
from launcher import launch_vedit
from PIL import Image
from projects import TUNED_PROMPT
from typer.testing import CliRunner

from vedit import edit as edit_stage
from vedit import tomlio
from vedit.checkpoints import find_checkpoint, tuned_unet
from vedit.cli import app
from vedit.errors import BadInputError, ProjectError
from vedit.extract import extract
from vedit.inflate import inflate_unet
from vedit.latents import frame_latents
from vedit.models import load_components
from vedit.project import Project
from vedit.prompts import encode_prompts
from vedit.sampler import ddim_invert, ddim_sample
from vedit.settings import EditSettings, ExtractSettings
from vedit.video import probe

runner = CliRunner()


@pytest.fixture()
def project(tmp_path: Path, tuned_project: Path) -> Path:
    shutil.copytree(tuned_project, tmp_path / "p")
    return tmp_path / "p"


# -- the round trip ----------------------------------------------------------------------------


class IdealDenoiser:
    """The exact denoiser of a clip, which a model tuned to convergence on that clip becomes:
    for latents noised from `clean` it returns the true noise (or velocity)."""

    dtype = torch.float32

    def __init__(self, clean: torch.Tensor, alphas_cumprod: torch.Tensor, v: bool) -> None:
        self.clean, self.alphas, self.v = clean, alphas_cumprod, v

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 prompts: torch.Tensor) -> torch.Tensor:
        alpha = self.alphas[int(timestep)]
        noise = (sample - alpha.sqrt() * self.clean) / (1 - alpha).sqrt()
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * self.clean if self.v else noise


def _round_trip_error(model: object, scheduler: object, clean: torch.Tensor, steps: int) -> float:
    prompts = torch.zeros(1, 7, 32)
    noise = ddim_invert(model, scheduler, clean, prompts, steps=steps)
    back = ddim_sample(model, scheduler, noise, prompts, prompts, guidance=1.0, steps=steps)
    return ((back - clean).norm() / clean.norm()).item()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_round_trip_with_a_model_that_fits_the_clip(tiny_model: Path, prediction: str) -> None:
    """With the exact denoiser the only error left is DDIM inversion's: it evaluates each step's
    prediction at the latents of the step before. That error shrinks with the step size: under
    1 % at 50 steps (measured 0.4 % for epsilon, 0.1 % for v), and falls as steps grow."""
    components = load_components(tiny_model, device="cpu")
    config = dict(components.scheduler.config) | {"prediction_type": prediction}
    scheduler = type(components.scheduler).from_config(config)
    clean = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = IdealDenoiser(clean, scheduler.alphas_cumprod, prediction == "v_prediction")
    errors = [_round_trip_error(model, scheduler, clean, steps) for steps in (10, 50, 200)]
    assert errors[1] < 0.01
    assert errors[0] > errors[1] > errors[2]


def _spaced(scheduler: DDIMScheduler, spacing: str) -> DDIMScheduler:
    return DDIMScheduler.from_config(dict(scheduler.config) | {"timestep_spacing": spacing})


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_is_diffusers_ddim_inverse_where_that_applies(tiny_model: Path,
                                                                spacing: str) -> None:
    """For the spacings diffusers' DDIMInverseScheduler takes, vedit's inversion is its loop
    (and so Tune-A-Video's), to the bit: cached inversions stay valid."""
    scheduler = _spaced(load_components(tiny_model, device="cpu").scheduler, spacing)
    clean = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = IdealDenoiser(clean * 0.5, scheduler.alphas_cumprod, v=False)
    prompts = torch.zeros(1, 7, 32)
    ours = ddim_invert(model, scheduler, clean, prompts, steps=10)
    accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters
    inverse = DDIMInverseScheduler.from_config(
        {k: v for k, v in scheduler.config.items() if k in accepted})
    inverse.set_timesteps(10)
    theirs = clean
    for timestep in inverse.timesteps:
        theirs = inverse.step(model(theirs, timestep, prompts), timestep, theirs).prev_sample
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_the_round_trip_holds_for_every_timestep_spacing(tiny_model: Path, spacing: str) -> None:
    """Inversion retraces the sampler's own timesteps, whatever their spacing: with the exact
    denoiser, sampling back lands within 1 % of the clip at 50 steps (linspace was refused by
    diffusers' DDIM inverse)."""
    scheduler = _spaced(load_components(tiny_model, device="cpu").scheduler, spacing)
    clean = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = IdealDenoiser(clean, scheduler.alphas_cumprod, v=False)
    assert _round_trip_error(model, scheduler, clean, 50) < 0.01


class RecordedSteps:
    """A UNet that notes the timesteps it is called at."""

    def __init__(self, unet: object) -> None:
        self.unet, self.dtype, self.timesteps = unet, torch.float32, []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 prompts: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(int(timestep))
        return self.unet(sample, timestep, prompts)


def test_a_base_model_with_linspace_timesteps_inverts_and_samples(tmp_path: Path,
                                                                  tiny_model: Path) -> None:
    """A base model whose scheduler spaces timesteps by linspace: the inversion climbs the
    sampler's timesteps (999, 979, 958, ... reversed), and sampling comes back down them."""
    model = tmp_path / "linspace-sd"
    shutil.copytree(tiny_model, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"timestep_spacing": "linspace"}))
    components = load_components(model, device="cpu")
    assert components.scheduler.config.timestep_spacing == "linspace"
    unet = RecordedSteps(inflate_unet(components.unet))
    clean = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = encode_prompts(components, [TUNED_PROMPT])
    noise = ddim_invert(unet, components.scheduler, clean, prompts, steps=6)
    back = ddim_sample(unet, components.scheduler, noise, prompts, prompts, 1.0, steps=6)
    sampling = [999, 799, 599, 400, 200, 0]  # np.linspace(0, 999, 6).round(), descending
    assert unet.timesteps == sampling[::-1] + sampling
    assert torch.isfinite(back).all() and not torch.equal(noise, clean)


class PromptShifted:
    """A denoiser whose prediction moves with the prompt states (their mean is added)."""

    dtype = torch.float32

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 prompts: torch.Tensor) -> torch.Tensor:
        return 0.1 * sample + prompts.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def test_a_guidance_of_one_or_less_is_the_conditional_prediction_alone() -> None:
    """As diffusers and Tune-A-Video: guidance only above 1; below it the negative prompt is not
    mixed in."""
    scheduler = DDIMScheduler(clip_sample=False)
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.ones(1, 7, 32), -torch.ones(1, 7, 32)

    def sample(guidance: float) -> torch.Tensor:
        return ddim_sample(PromptShifted(), scheduler, noise, cond, uncond, guidance, steps=5)

    plain = sample(1.0)
    assert torch.equal(sample(0.5), plain) and torch.equal(sample(0.0), plain)
    assert not torch.equal(sample(1.5), plain)


@pytest.mark.slow
def test_tuning_brings_the_tiny_model_close_to_an_exact_round_trip(project: Path,
                                                                   tiny_model: Path) -> None:
    """A tuned model approaches the clip's exact denoiser (above), so inverting with the source
    prompt and sampling it back at guidance 1 comes close: within 10 % after 80 quick steps
    (measured 6 %), where the untuned tiny model is off by 78 %."""
    components = load_components(tiny_model, device="cpu")
    project_ = Project.open(project)
    clean = frame_latents(project_, components.vae, components.fingerprint).mean
    prompts = encode_prompts(components, [TUNED_PROMPT])

    def round_trip(unet: object) -> float:
        noise = ddim_invert(unet, components.scheduler, clean, prompts, steps=50)
        back = ddim_sample(unet, components.scheduler, noise, prompts, prompts, 1.0, steps=50)
        return ((back - clean).norm() / clean.norm()).item()

    tuned = round_trip(tuned_unet(find_checkpoint(project_), components.unet,
                                  components.fingerprint))
    untuned = round_trip(inflate_unet(load_components(tiny_model, device="cpu").unet))
    assert tuned < 0.10
    assert tuned < untuned / 3


# -- the command ---------------------------------------------------------------------------------


def test_edit_two_prompts_then_reuse_the_inversion_then_remux(project: Path) -> None:
    result = runner.invoke(app, ["edit", str(project), "--prompt", "a cat is talking",
                                 "--prompt", "a dog is talking", "--steps", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [e["name"] for e in data["edits"]] == ["a-cat-is-talking", "a-dog-is-talking"]
    for entry in data["edits"]:
        assert entry["inversion"]["reused"] is False  # computed once, for both prompts
        assert entry["checkpoint"] == "run-1/step-80" and entry["seed"] == 33
        video = probe(Path(entry["files"]["video"]))
        assert (video.codec, video.frame_count, float(video.fps)) == ("h264", 6, 12.5)
        assert (video.width, video.height) == (112, 64)
        compare = probe(Path(entry["files"]["compare"]))
        assert compare.width == 2 * 112 and compare.frame_count == 6
    again = runner.invoke(app, ["edit", str(project), "-p", "a fox is talking", "--steps", "4",
                                "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["edits"][0]["inversion"]["reused"] is True
    assert "Reusing the cached inversion" in again.stderr

    remuxed = runner.invoke(app, ["remux", str(project), "--json"])
    assert remuxed.exit_code == 0, remuxed.stderr
    outputs = json.loads(remuxed.stdout)["outputs"]
    assert len(outputs) == 3
    for output in outputs:
        durations = stream_durations(Path(output["path"]))
        assert durations["video"] == pytest.approx(6 / 12.5, abs=1e-3)
        assert durations["audio"] == pytest.approx(durations["video"], abs=1024 / 44100)


def test_other_steps_or_prompt_make_a_new_inversion(project: Path) -> None:
    first = edit_stage.edit(project, ["a cat"], EditSettings(steps=3))
    assert first.edits[0].inversion and not first.edits[0].inversion["reused"]
    other_steps = edit_stage.edit(project, ["a cat"], EditSettings(steps=4))
    assert not other_steps.edits[0].inversion["reused"]
    source_prompt = edit_stage.edit(project, ["a cat"], EditSettings(steps=3,
                                                                     inversion_prompt=True))
    assert not source_prompt.edits[0].inversion["reused"]
    assert len(list((project / "inversions").glob("*.safetensors"))) == 3


def test_names_are_slugs_made_unique_or_given(project: Path) -> None:
    settings = EditSettings(steps=2)
    first = edit_stage.edit(project, ["A Cat, talking!"], settings)
    second = edit_stage.edit(project, ["A Cat, talking!"], settings)
    named = edit_stage.edit(project, ["x", "y"], settings, name="take")
    assert [e.name for e in first.edits + second.edits + named.edits] == [
        "a-cat-talking", "a-cat-talking-2", "take-1", "take-2"]


def test_human_output_names_the_comparison_and_the_remux(project: Path) -> None:
    result = runner.invoke(app, ["edit", str(project), "-p", "a cat", "--steps", "1"])
    assert result.exit_code == 0, result.stderr
    edit_folder = project / "edits" / "a-cat"
    assert str(edit_folder / "video.mp4") in result.stdout
    assert f"side by side with the source: {edit_folder / 'compare.mp4'}" in result.stdout
    assert f"vedit remux {project}" in result.stdout


def test_optional_formats(project: Path) -> None:
    result = edit_stage.edit(project, ["a cat"], EditSettings(steps=2, formats="mp4,gif,frames"))
    files = result.edits[0].files
    assert Image.open(files["gif"]).n_frames == 6
    pngs = sorted(Path(files["frames"]).glob("*.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).size == (112, 64)


def test_prompts_from_a_file_and_from_stdin(project: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# batch\na cat\n\na dog\n")
    result = runner.invoke(app, ["edit", str(project), "--prompts-file", str(prompts),
                                 "--steps", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    assert [e["prompt"] for e in json.loads(result.stdout)["edits"]] == ["a cat", "a dog"]
    piped = runner.invoke(app, ["edit", str(project), "--prompts-file", "-", "--steps", "2",
                                "--json"], input="a bird\n")
    assert piped.exit_code == 0, piped.stderr
    assert [e["prompt"] for e in json.loads(piped.stdout)["edits"]] == ["a bird"]


def _frames(result: edit_stage.EditResult) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for e in result.edits
            for p in sorted(Path(e.files["frames"]).glob("*.png"))]


def test_batched_prompts_equal_one_at_a_time(project: Path) -> None:
    settings = dict(steps=3, formats="frames")
    one = edit_stage.edit(project, ["a cat", "a dog"], EditSettings(batch=1, **settings))
    two = edit_stage.edit(project, ["a cat", "a dog"], EditSettings(batch=2, **settings))
    for a, b in zip(_frames(one), _frames(two), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_models_loaded_once_edit_as_a_fresh_load_does(project: Path) -> None:
    """A Python caller loads a checkpoint's models once for several edits: the second edit on
    them renders what an edit that loads the models itself renders (the first left them as
    they were), and models loaded for another checkpoint are refused."""
    settings = EditSettings(steps=2, formats="frames")
    checkpoint = find_checkpoint(Project.open(project))
    models = edit_stage.load_edit_models(checkpoint, "cpu")
    edit_stage.edit(project, ["a cat"], settings, models=models)
    given = edit_stage.edit(project, ["a dog"], settings, models=models)
    loaded = edit_stage.edit(project, ["a dog"], settings)
    assert all(np.array_equal(a, b)
               for a, b in zip(_frames(given), _frames(loaded), strict=True))
    other = dataclasses.replace(models, checkpoint_id="another-checkpoint")
    with pytest.raises(BadInputError, match="another checkpoint"):
        edit_stage.edit(project, ["a cat"], settings, models=other)


def test_without_inversion_the_seed_decides(project: Path) -> None:
    def render(seed: int) -> list[np.ndarray]:
        return _frames(edit_stage.edit(project, ["a cat"], EditSettings(
            steps=2, inversion=False, seed=seed, formats="frames")))

    first, again, other = render(1), render(1), render(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_an_interrupted_edit_leaves_no_edit_folder(project: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(edit_stage, "write_gif", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit_stage.edit(project, ["a cat"], EditSettings(steps=2, formats="gif"))
    assert not (project / "edits").exists() or not any((project / "edits").iterdir())


def test_edit_before_tune_says_what_to_run(tmp_path: Path, clip_qcif: Path) -> None:
    extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=4, size="64"))
    with pytest.raises(ProjectError, match="no checkpoint yet"):
        edit_stage.edit(tmp_path / "p", ["a cat"])
    result = runner.invoke(app, ["edit", str(tmp_path / "p"), "-p", "a cat"])
    assert result.exit_code == 4 and "vedit tune" in result.stderr


@pytest.mark.slow
def test_prompts_split_across_two_processes_under_accelerate_launch(project: Path) -> None:
    """Two CPU processes (gloo): each renders its share; one result lists both edits."""
    done = launch_vedit("edit", project, "-p", "a cat", "-p", "a dog", "--steps", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # exactly one JSON document
    assert sorted(e["name"] for e in result["edits"]) == ["a-cat", "a-dog"]
    for entry in result["edits"]:
        assert probe(Path(entry["files"]["video"])).frame_count == 6


def test_a_negative_prompt_steers_the_result(project: Path) -> None:
    plain = _frames(edit_stage.edit(project, ["a cat"], EditSettings(steps=2, formats="frames")))
    negative = EditSettings(steps=2, formats="frames", negative_prompt="a dog")
    result = edit_stage.edit(project, ["a cat"], negative)
    steered = _frames(result)
    assert not all(np.array_equal(a, b) for a, b in zip(plain, steered, strict=True))
    # The difference is the negative prompt's, not noise: the same settings give the same frames.
    again = _frames(edit_stage.edit(project, ["a cat"], negative))
    assert all(np.array_equal(a, b) for a, b in zip(steered, again, strict=True))
    [output] = result.edits
    record = tomlio.loads((output.folder / "edit.toml").read_text())
    assert record["settings"]["negative_prompt"] == "a dog"
