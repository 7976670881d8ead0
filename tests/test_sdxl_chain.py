"""SDXL bases end to end: extract, tune, edit (two prompts, --full), remux through the CLI on the
tiny SDXL, and through the Python API on an SDXL-layout model of another shape; the size ids
the UNet gets; non-finite VAE output refused; the LoRA in diffusers' SDXL pipeline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clips import stream_durations
from PIL import Image
from typer.testing import CliRunner

from vedit import edit as edit_stage
from vedit.cli import app
from vedit.errors import BadInputError
from vedit.extract import extract
from vedit.memory.predict import tune_plan
from vedit.project import Project
from vedit.settings import (
    DEFAULT_FRAMES,
    SDXL_DEFAULT_FRAMES,
    EditSettings,
    ExtractSettings,
    TuneSettings,
)
from vedit.synthetic import make_clip
from vedit.tiny_model import sdxl_unet_config, text_encoder_config, vae_config, write_model
from vedit.tune import tune

runner = CliRunner()
PROMPT = "a man is talking"
#: The clip is 128x72; its 112x64 frames are its picture scaled to 114x64, cropped 1 px in.
TIME_IDS = [72.0, 128.0, 0.0, 1.0, 64.0, 112.0]


@pytest.fixture(scope="module")
def xl_project(tmp_path_factory: pytest.TempPathFactory, tiny_model_xl: Path) -> Path:
    """`vedit tune CLIP --model TINY_SDXL`: 2 frames, 3 apart, at the model's native size."""
    folder = tmp_path_factory.mktemp("xl")
    clip = make_clip(folder / "talk.mp4", width=128, height=72, fps=25, seconds=0.16)
    tuned = runner.invoke(app, ["tune", str(clip), "--prompt", PROMPT, "--model",
                                str(tiny_model_xl), "-n", "2", "--stride", "3", "--steps", "2",
                                "--no-eval", "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    frames = json.loads(tuned.stdout)["extract"]
    assert (frames["width"], frames["height"]) == (112, 64)  # native 64 px, the aspect kept
    return folder / "talk.vedit"


def _watch_added(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The added conditioning of every UNet call an edit makes."""
    seen: list[dict[str, torch.Tensor]] = []
    original = edit_stage.tuned_unet

    def watched(*args: Any, **kwargs: Any) -> Any:
        unet = original(*args, **kwargs)
        unet.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]),
            with_kwargs=True)
        return unet

    monkeypatch.setattr(edit_stage, "tuned_unet", watched)
    return seen


def _frames(folder: Path) -> Iterator[np.ndarray]:
    return (np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png")))


@pytest.mark.slow
def test_sdxl_edit_of_two_prompts_in_windows_on_the_clip_size_then_remux(
        xl_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _watch_added(monkeypatch)
    edited = runner.invoke(app, ["edit", str(xl_project), "-p", "a cat is talking", "-p",
                                 "a dog is talking", "--full", "--window", "3", "--full-stride",
                                 "1", "--steps", "1", "--formats", "mp4,frames", "--json"])
    assert edited.exit_code == 0, edited.stderr
    edits = json.loads(edited.stdout)["edits"]
    assert [e["frames"] for e in edits] == [4, 4]  # every frame of the span of the tuned two
    windows = edits[0]["full"]["windows"]
    assert windows == 2 and edits[0]["full"]["window"] == 3 and edits[0]["inversion"] is not None
    for entry in edits:
        frames = list(_frames(Path(entry["files"]["frames"])))
        assert [f.shape for f in frames] == [(64, 112, 3)] * 4
        assert all(f.std() > 1 for f in frames)  # pictures, not black frames
    first, second = (np.stack(list(_frames(Path(e["files"]["frames"])))) for e in edits)
    assert not np.array_equal(first, second)  # the prompts matter
    # Inversion (one clip), then sampling with guidance (both halves, for each prompt), a call
    # per window: every call has the pooled text and the clip's own size ids, per frame.
    assert [len(added["time_ids"]) for added in seen] == [3] * windows + [6] * 2 * windows
    for added in seen:
        assert added["time_ids"].tolist() == [TIME_IDS] * len(added["time_ids"])
        assert added["text_embeds"].shape == (len(added["time_ids"]), 48)
    # SDXL base forces the unconditional half to zeros.
    sampling = seen[-1]["text_embeds"]
    assert not sampling[:3].any() and sampling[3:].abs().sum() > 0

    remuxed = runner.invoke(app, ["remux", str(xl_project), "--json"])
    assert remuxed.exit_code == 0, remuxed.stderr
    outputs = json.loads(remuxed.stdout)["outputs"]
    assert len(outputs) == 2
    durations = stream_durations(Path(outputs[0]["path"]))
    assert durations["video"] == pytest.approx(4 / 25, abs=1e-3)
    assert durations["audio"] == pytest.approx(durations["video"], abs=1 / 25)


def _other_sdxl(path: Path) -> Path:
    """An SDXL-layout model of another shape than the tiny one: three levels, transformers 1
    and 3 deep, other head counts, a v-prediction DDIM schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = sdxl_unet_config() | {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (16, 16, 24), "transformer_layers_per_block": (1, 1, 3),
        "attention_head_dim": (2, 2, 3)}
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**config)
    vae = AutoencoderKL(**vae_config())
    text = CLIPTextModel(CLIPTextConfig(**text_encoder_config(True)))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_config(True,
                                                                              projection=True)))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", timestep_spacing="trailing",
                              clip_sample=False, set_alpha_to_one=False)
    return write_model(path, unet, vae, text, scheduler, text_encoder_2=text_2)


@pytest.mark.slow
def test_sdxl_of_another_shape_tunes_and_edits_with_v_prediction(tmp_path: Path) -> None:
    model = _other_sdxl(tmp_path / "other-sdxl")
    clip = make_clip(tmp_path / "clip.mp4", width=72, height=128, fps=25, seconds=0.12)
    extract(clip, tmp_path / "p", ExtractSettings(frames=2, size="64"))
    tuned = tune(tmp_path / "p", TuneSettings(prompt=PROMPT, model=str(model), steps=1,
                                              checkpoint_every=0, eval=False))
    assert Project.open(tmp_path / "p").record["tune"]["prediction_type"] == "v_prediction"
    assert tuned.smoothed_loss is not None and np.isfinite(tuned.smoothed_loss)
    result = edit_stage.edit(tmp_path / "p", ["a cat is talking"],
                             EditSettings(steps=1, formats="frames"))
    [entry] = result.edits
    frames = list(_frames(Path(entry.files["frames"])))
    assert [f.shape for f in frames] == [(112, 64, 3)] * 2 and all(f.std() > 1 for f in frames)


def test_non_finite_decoded_frames_are_refused_with_a_hint(
        xl_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DecoderOutput

    def overflowing(self: AutoencoderKL, z: torch.Tensor, *args: Any,
                    **kwargs: Any) -> DecoderOutput:
        return DecoderOutput(sample=torch.full((len(z), 3, 64, 112), float("inf")))

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    edits = sorted((xl_project / "edits").glob("*"))
    result = runner.invoke(app, ["edit", str(xl_project), "-p", "a cat", "--steps", "1",
                                 "--no-inversion", "--json"])
    assert result.exit_code == BadInputError.exit_code == 3
    error = json.loads(result.stdout)["error"]
    assert "not finite" in error["message"] and "bf16" in error["hint"]
    assert sorted((xl_project / "edits").glob("*")) == edits  # no black edit written


def test_non_finite_latents_are_refused_before_they_are_cached(
        tiny_model_xl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    from vedit.latents import encode_frames

    vae = AutoencoderKL.from_pretrained(tiny_model_xl, subfolder="vae")
    real_encode = AutoencoderKL.encode

    def overflowing(self: AutoencoderKL, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return real_encode(self, x * float("nan"), *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", overflowing)
    with pytest.raises(BadInputError, match="encoded the frames to values that are not finite"):
        encode_frames(vae, torch.zeros(2, 3, 64, 64))


def test_an_fp16_vae_that_overflows_is_run_in_fp32(tiny_model_xl: Path) -> None:
    from diffusers import AutoencoderKL

    from vedit.latents import encode_frames

    vae = AutoencoderKL.from_pretrained(tiny_model_xl, subfolder="vae",
                                        torch_dtype=torch.float16)
    assert vae.config.force_upcast  # diffusers' flag: this VAE overflows in fp16
    mean, _ = encode_frames(vae, torch.zeros(1, 3, 64, 64))
    assert vae.dtype == torch.float32 and torch.isfinite(mean).all()


@pytest.mark.slow
def test_the_lora_loads_into_diffusers_sdxl_pipeline(xl_project: Path, tiny_model_xl: Path,
                                                     tmp_path: Path) -> None:
    """The exported LoRA changes diffusers' SDXL UNet as it changes vedit's (on one frame, where
    the untuned inflated UNet is the 2D one: test_sdxl.py)."""
    from diffusers import StableDiffusionXLPipeline

    from vedit.checkpoints import LORA_FILE, find_checkpoint
    from vedit.inflate import inflate_unet
    from vedit.lora import add_lora, load_lora_state_dict
    from vedit.tensorfiles import load_tensors, save_tensors

    checkpoint = find_checkpoint(Project.open(xl_project))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_xl, use_safetensors=True)
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 7, 32 + 48, generator=generator)
    added = {"text_embeds": torch.randn(2, 48, generator=generator),
             "time_ids": torch.tensor([TIME_IDS] * 2)}
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        base = pipe.unet(sample, timestep, states, added_cond_kwargs=added).sample
        ours = inflate_unet(pipe.unet.__class__.from_pretrained(tiny_model_xl, subfolder="unet"))
        add_lora(ours, rank=int(checkpoint.record["settings"]["rank"]),
                 targets=checkpoint.record["lora_targets"])
        # Two tuning steps barely move B: scaled up, the LoRA's effect stands out of fp32 noise.
        lora, metadata = load_tensors(checkpoint.path / LORA_FILE)
        lora = {k: v * 100 if ".lora_B." in k else v for k, v in lora.items()}
        save_tensors(tmp_path / LORA_FILE, lora, metadata)
        load_lora_state_dict(ours, {k.removeprefix("unet."): v for k, v in lora.items()})
        tuned = ours(sample[:, :, None], timestep, states, added)[:, :, 0]
        pipe.load_lora_weights(str(tmp_path), weight_name=LORA_FILE)
        loaded = pipe.unet(sample, timestep, states, added_cond_kwargs=added).sample
    change = (tuned - base).abs().max()
    assert change > 1e-3  # the LoRA was trained: it changes the prediction
    torch.testing.assert_close(loaded, tuned, atol=change * 1e-2, rtol=0)


def test_the_one_shot_tune_takes_fewer_frames_on_sdxl_unless_told(
        tmp_path: Path, tiny_model_xl: Path, tiny_model: Path) -> None:
    clip = make_clip(tmp_path / "walk.mp4", width=128, height=72, fps=25, seconds=2.0)
    on_xl = TuneSettings(prompt=PROMPT, model=str(tiny_model_xl))
    assert SDXL_DEFAULT_FRAMES < DEFAULT_FRAMES
    assert tune_plan(clip, on_xl).frames == SDXL_DEFAULT_FRAMES
    assert tune_plan(clip, on_xl, ExtractSettings(frames=DEFAULT_FRAMES)).frames == DEFAULT_FRAMES
    assert tune_plan(clip, TuneSettings(prompt=PROMPT, model=str(tiny_model))).frames == 24

    tuned = runner.invoke(app, ["tune", str(clip), "--prompt", PROMPT, "--model",
                                str(tiny_model_xl), "--steps", "1", "--no-eval", "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    assert json.loads(tuned.stdout)["extract"]["frame_count"] == SDXL_DEFAULT_FRAMES
    extracted = runner.invoke(app, ["extract", str(clip), "-o", str(tmp_path / "plain"),
                                    "--json"])  # no base model: extract's own default
    assert json.loads(extracted.stdout)["frame_count"] == DEFAULT_FRAMES


def test_demo_sdxl_and_a_model_together_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--sdxl", "--model", "some/model", "-o",
                                 str(tmp_path / "demo")])
    assert result.exit_code == 2 and "--sdxl" in result.stderr
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow  # traces the tiny SDXL's tuning and editing: seconds of fake-tensor ops
def test_sdxl_dry_runs_trace_its_conditioning(xl_project: Path, tiny_model_xl: Path) -> None:
    clip = next(xl_project.parent.glob("*.mp4"))
    tuned = runner.invoke(app, ["tune", str(clip), "--model", str(tiny_model_xl), "-n", "2",
                                "--project", str(xl_project.parent / "new"), "--dry-run",
                                "--gpu-memory", "24", "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    memory = json.loads(tuned.stdout)["memory"]
    assert memory["fits"] is True and memory["peak_during"] == "the training step"
    edited = runner.invoke(app, ["edit", str(xl_project), "--dry-run", "--gpu-memory", "24"])
    assert edited.exit_code == 0, edited.stderr
    assert "fits a 24 GB GPU" in edited.stdout
    assert not (xl_project.parent / "new").exists()
