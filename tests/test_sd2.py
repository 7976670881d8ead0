"""SD 2.x end to end: v-prediction in tuning, inversion and sampling; native frame size."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clips import stream_durations
from typer.testing import CliRunner

from vedit.checkpoints import find_checkpoint, tuned_unet
from vedit.cli import app
from vedit.extract import extract
from vedit.latents import FrameLatents, frame_latents
from vedit.models import load_components
from vedit.project import Project
from vedit.prompts import encode_prompts
from vedit.sampler import ddim_invert, ddim_sample
from vedit.settings import ExtractSettings, TuneSettings
from vedit.tune import noisy_batch, tune

runner = CliRunner()
PROMPT = "a man is talking"


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_v"])
def test_the_tuning_target_follows_the_prediction_type(fixture: str,
                                                       request: pytest.FixtureRequest) -> None:
    components = load_components(request.getfixturevalue(fixture), device="cpu")
    clean = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    latents = FrameLatents(clean, torch.zeros_like(clean), "unused", Path("unused"), reused=True)
    run = SimpleNamespace(scheduler=components.scheduler,
                          prediction_type=components.prediction_type, latents=latents)
    noisy, timesteps, target = noisy_batch(run, torch.Generator().manual_seed(7), batch=2)

    replay = torch.Generator().manual_seed(7)  # the same draws, in the same order
    samples = [clean + 0 * torch.randn(clean.shape, generator=replay) for _ in range(2)]
    sample = torch.cat(samples)
    noise = torch.randn(sample.shape, generator=replay)
    steps = torch.randint(0, 1000, (2,), generator=replay)
    scheduler = components.scheduler
    assert torch.equal(timesteps, steps)
    torch.testing.assert_close(noisy, scheduler.add_noise(sample, noise, steps))
    if components.prediction_type == "v_prediction":
        torch.testing.assert_close(target, scheduler.get_velocity(sample, noise, steps))
        assert not torch.allclose(target, noise)
    else:
        torch.testing.assert_close(target, noise)


class FixedOutput:
    """A stand-in UNet that always predicts the same tensor."""

    dtype = torch.float32

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 prompts: torch.Tensor) -> torch.Tensor:
        return self.output.expand_as(sample)


def _textbook_ddim(sample: torch.Tensor, output: torch.Tensor, alpha_from: torch.Tensor,
                   alpha_to: torch.Tensor, prediction: str) -> torch.Tensor:
    """DDIM (eta 0) from noise level `alpha_from` to `alpha_to`, written out from the paper,
    with v = sqrt(a) eps - sqrt(1 - a) x0 for v-prediction."""
    if prediction == "v_prediction":
        clean = alpha_from.sqrt() * sample - (1 - alpha_from).sqrt() * output
        noise = alpha_from.sqrt() * output + (1 - alpha_from).sqrt() * sample
    else:
        noise = output
        clean = (sample - (1 - alpha_from).sqrt() * noise) / alpha_from.sqrt()
    return alpha_to.sqrt() * clean + (1 - alpha_to).sqrt() * noise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_one_inversion_step_and_one_sampling_step_match_ddim(tiny_model: Path,
                                                              prediction: str) -> None:
    """vedit steps with diffusers' DDIM schedulers; here one step of each is checked against the
    formula, with SD's schedule: 20 steps of 50 from timestep 1 (the clean end, at level
    alphas_cumprod[0]) up to 981, and back."""
    config = dict(load_components(tiny_model, device="cpu").scheduler.config)
    scheduler = type(load_components(tiny_model, device="cpu").scheduler).from_config(
        config | {"prediction_type": prediction})
    alphas = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(3)
    sample, output = (torch.randn(1, 4, 2, 8, 8, generator=generator) for _ in range(2))
    prompts = torch.zeros(1, 7, 32)
    model = FixedOutput(output)

    inverted = ddim_invert(model, scheduler, sample, prompts, steps=1)
    # One step of 1: from the clean end (level alphas[0]) to timestep 1.
    torch.testing.assert_close(inverted, _textbook_ddim(sample, output, alphas[0], alphas[1],
                                                        prediction))
    sampled = ddim_sample(model, scheduler, sample, prompts, prompts, 1.0, steps=50)
    expected = sample
    for timestep in range(981, 0, -20):  # 981, 961, ... 1, each to the level 20 below
        target = alphas[timestep - 20] if timestep > 20 else alphas[0]
        expected = _textbook_ddim(expected, output, alphas[timestep], target, prediction)
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_v_prediction_round_trip_is_as_close_as_epsilons(tmp_path: Path, clip_720p: Path,
                                                         tiny_model_v: Path) -> None:
    """The same bound as for the epsilon model (tests/test_edit.py): within 10 % after 80 quick
    tuning steps (measured 5 %)."""
    extract(clip_720p, tmp_path / "p", ExtractSettings(frames=6, size="64"))
    tune(tmp_path / "p", TuneSettings(prompt=PROMPT, model=str(tiny_model_v), steps=80,
                                      lr=1e-2, lora_lr=1e-2, checkpoint_every=0))
    project = Project.open(tmp_path / "p")
    components = load_components(tiny_model_v, device="cpu")
    assert components.prediction_type == "v_prediction"
    unet = tuned_unet(find_checkpoint(project), components.unet, components.fingerprint)
    clean = frame_latents(project, components.vae, components.fingerprint).mean
    prompts = encode_prompts(components, [PROMPT])
    noise = ddim_invert(unet, components.scheduler, clean, prompts, steps=50)
    back = ddim_sample(unet, components.scheduler, noise, prompts, prompts, 1.0, steps=50)
    assert ((back - clean).norm() / clean.norm()).item() < 0.10


def test_sd2_chain_through_the_cli_at_the_native_size(tmp_path: Path, clip_720p: Path,
                                                      tiny_model_v: Path) -> None:
    clip = tmp_path / "talk.mp4"
    clip.write_bytes(clip_720p.read_bytes())
    tuned = runner.invoke(app, ["tune", str(clip), "--prompt", PROMPT, "--model",
                                str(tiny_model_v), "-n", "4", "--steps", "2", "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    frames = json.loads(tuned.stdout)["extract"]
    assert (frames["width"], frames["height"]) == (112, 64)  # the tiny model's native 64 px
    project = tmp_path / "talk.vedit"
    edited = runner.invoke(app, ["edit", str(project), "-p", "a cat is talking", "--steps", "3",
                                 "--json"])
    assert edited.exit_code == 0, edited.stderr
    remuxed = runner.invoke(app, ["remux", str(project), "--json"])
    assert remuxed.exit_code == 0, remuxed.stderr
    [output] = json.loads(remuxed.stdout)["outputs"]
    assert set(stream_durations(Path(output["path"]))) == {"video", "audio"}


def test_plain_extract_keeps_the_sd1_default(tmp_path: Path, clip_qcif: Path) -> None:
    result = extract(clip_qcif, tmp_path / "p", ExtractSettings(frames=2, stride=10))
    assert (result.width, result.height) == (624, 512)
