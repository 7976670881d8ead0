"""SDXL bases: the tiny SDXL model's layout and loading, its conditioning, the inflated UNet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vedit.errors import BadInputError
from vedit.models import load_components, resolve_model

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


def test_sdxl_is_refused_by_default_and_loads_when_allowed(tiny_model_xl: Path) -> None:
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModelWithProjection

    with pytest.raises(BadInputError, match="SDXL") as refused:
        load_components(tiny_model_xl, device="cpu")
    assert "1.x" in refused.value.hint
    parts = load_components(tiny_model_xl, device="cpu", allow_sdxl=True)
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
    first = resolve_model(copy, allow_sdxl=True)
    assert set(first.components) >= {"text_encoder_2", "tokenizer_2"}
    fingerprint = first.fingerprint  # computed from the files as they are now
    config = copy / "text_encoder_2" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert resolve_model(copy, allow_sdxl=True).fingerprint != fingerprint
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(BadInputError, match="tokenizer_2"):
        resolve_model(copy, allow_sdxl=True)
