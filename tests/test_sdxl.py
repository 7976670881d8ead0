"""SDXL bases: the tiny SDXL model's layout and loading, its conditioning, the inflated UNet."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from vedit.errors import BadInputError
from vedit.inflate import SparseCausalAttnProcessor, inflate_unet
from vedit.models import Components, load_components, resolve_model
from vedit.sdxl import clip_time_ids, encode_sdxl_prompts, unconditional_sdxl
from vedit.tiny_model import sdxl_unet_config

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

# --- the tiny SDXL model and loading -------------------------------------------------------


def test_tiny_sdxl_has_the_diffusers_layout_and_loads_as_an_sdxl_pipeline(
        tiny_model_xl: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    index = json.loads((tiny_model_xl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert "safety_checker" not in index
    assert not list(tiny_model_xl.rglob("*.bin"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_xl, use_safetensors=True)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.transformer_layers_per_block == [1, 2]
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_sdxl_loads_with_its_second_encoder(tiny_model_xl: Path) -> None:
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModelWithProjection

    parts = load_components(tiny_model_xl, device="cpu")
    assert parts.source.family == "sdxl"
    assert isinstance(parts.text_encoder_2, CLIPTextModelWithProjection)
    assert parts.tokenizer_2 is not None and parts.tokenizer_2.pad_token == "!"
    assert parts.force_zeros_for_empty_prompt
    assert not any(p.requires_grad for p in parts.text_encoder_2.parameters())
    # DDIM on SDXL's own schedule (its Euler config: scaled linear, leading, offset 1).
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert parts.scheduler.config.steps_offset == 1
    assert parts.scheduler.config.timestep_spacing == "leading"
    assert parts.scheduler.config.beta_schedule == "scaled_linear"
    assert (parts.vae_scale_factor, parts.native_resolution) == (8, 64)


def test_sdxl_components_are_checked_and_fingerprinted(tiny_model_xl: Path,
                                                       tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_xl, tmp_path / "model"))
    first = resolve_model(copy)
    assert set(first.components) >= {"text_encoder_2", "tokenizer_2"}
    fingerprint = first.fingerprint  # computed from the files as they are now
    config = copy / "text_encoder_2" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert resolve_model(copy).fingerprint != fingerprint
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(BadInputError, match="tokenizer_2") as missing:
        resolve_model(copy)
    assert "SDXL" in missing.value.hint


# --- conditioning --------------------------------------------------------------------------

PROMPTS = ["a man is talking", "a cat is talking, in the style of a watercolour painting"]


def sdxl_pipeline(parts: Components, force_zeros: bool) -> StableDiffusionXLPipeline:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
        scheduler=parts.scheduler, force_zeros_for_empty_prompt=force_zeros)


@pytest.fixture(scope="module")
def sdxl_parts(tiny_model_xl: Path) -> Components:
    return load_components(tiny_model_xl, device="cpu")


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_conditioning_equals_diffusers_encode_prompt(sdxl_parts: Components,
                                                          force_zeros: bool) -> None:
    parts = dataclasses.replace(sdxl_parts, force_zeros_for_empty_prompt=force_zeros)
    expected = sdxl_pipeline(parts, force_zeros).encode_prompt(
        PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1,
        do_classifier_free_guidance=True)
    text = encode_sdxl_prompts(parts, PROMPTS)
    empty = unconditional_sdxl(parts, len(PROMPTS))
    for actual, wanted in zip((text.states, empty.states, text.pooled, empty.pooled), expected,
                              strict=True):
        assert actual.shape == wanted.shape and actual.dtype == wanted.dtype
        assert torch.equal(actual, wanted)
    assert text.states.shape == (2, 77, 32 + 48) and text.pooled.shape == (2, 48)
    assert bool(empty.states.any()) is not force_zeros


def test_time_ids_come_from_the_clip_size_and_crop(sdxl_parts: Components) -> None:
    pipe = sdxl_pipeline(sdxl_parts, True)
    # 1280 x 720 to 112 x 64 frames: scaled to 114 x 64, the centre crop starts at x = 1.
    ids = clip_time_ids(1280, 720, 112, 64)
    assert ids.tolist() == [[720, 1280, 0, 1, 64, 112]]
    expected = pipe._get_add_time_ids((720, 1280), (0, 1), (64, 112), dtype=torch.float32,
                                      text_encoder_projection_dim=48)
    assert torch.equal(ids, expected)
    # A portrait clip cropped square: scaled to 64 x 114, the crop starts at y = 25.
    assert clip_time_ids(720, 1280, 64, 64).tolist() == [[1280, 720, 25, 0, 64, 64]]


# --- the inflated SDXL UNet ----------------------------------------------------------------


def sdxl_inputs(num_frames: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor, dict[str, torch.Tensor]]:
    """(sample, timestep, prompt states, added conditioning) for the tiny SDXL UNet."""
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(batch, 4, num_frames, 8, 8, generator=generator)
    prompts = torch.randn(batch, 7, 80, generator=generator)
    added = {"text_embeds": torch.randn(batch, 48, generator=generator),
             "time_ids": torch.cat([clip_time_ids(1280, 720, 112, 64),
                                    clip_time_ids(720, 1280, 64, 64)])[:batch]}
    return sample, torch.tensor([10, 500][:batch]), prompts, added


def tiny_sdxl_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**sdxl_unet_config()).eval()


def test_untuned_inflated_sdxl_unet_on_one_frame_equals_the_2d_unet() -> None:
    unet = tiny_sdxl_unet()
    sample, timestep, prompts, added = sdxl_inputs(num_frames=1)
    with torch.no_grad():
        expected = unet(sample[:, :, 0], timestep, prompts, added_cond_kwargs=added).sample
        inflated = inflate_unet(unet)
        actual = inflated(sample, timestep, prompts, added)[:, :, 0]
        # The added conditioning is used: other size ids give another prediction.
        other = dict(added, time_ids=added["time_ids"].flip(0))
        moved = inflated(sample, timestep, prompts, other)[:, :, 0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (moved - actual).abs().max() > 1e-4


def test_inflated_sdxl_unet_has_temporal_attention_in_every_deep_block() -> None:
    model = inflate_unet(tiny_sdxl_unet())
    blocks = [m for m in model.unet.modules() if isinstance(m, BasicTransformerBlock)]
    # Down 1 x depth 2, mid depth 2, up 2 x depth 2 (layers_per_block + 1).
    assert len(blocks) == 8 and all(hasattr(block, "attn_temp") for block in blocks)
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn_temp.to_q.weight" in (
        model.temporal_parameters())
    assert all(isinstance(block.attn1.processor, SparseCausalAttnProcessor) for block in blocks)


def test_inflated_sdxl_unet_trains_with_checkpointing() -> None:
    model = inflate_unet(tiny_sdxl_unet()).train()
    model.enable_gradient_checkpointing()
    sample, timestep, prompts, added = sdxl_inputs(num_frames=2, batch=1)
    prediction = model(sample, timestep, prompts, added)
    assert prediction.shape == sample.shape
    prediction.square().mean().backward()
    grads = [p.grad for p in model.temporal_parameters().values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
