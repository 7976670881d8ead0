"""The base model on disk: the tiny model's layout, loading, fingerprints and folder checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_files import NEEDED, UNET_FILE, snapshot_files

from vedit.errors import BadInputError, ModelNotFoundError
from vedit.model_files import choose_weight_files, inspect_model_folder
from vedit.models import load_components, resolve_model
from vedit.tiny_model import build_tiny_model

# --- the tiny model ------------------------------------------------------------------------


def test_tiny_model_has_the_diffusers_layout_and_loads_as_a_pipeline(tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert snapshot_files(tiny_model) >= NEEDED
    assert not list(tiny_model.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None,
                                                   use_safetensors=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_tiny_model_is_seeded(tiny_model: Path, tmp_path: Path) -> None:
    same = build_tiny_model(tmp_path / "same")
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (same / UNET_FILE).read_bytes() == (tiny_model / UNET_FILE).read_bytes()
    assert (other / UNET_FILE).read_bytes() != (tiny_model / UNET_FILE).read_bytes()
    with pytest.raises(BadInputError):
        build_tiny_model(same)


# --- loading -------------------------------------------------------------------------------


def test_load_components_on_cpu(tiny_model: Path) -> None:
    from diffusers import DDIMScheduler

    parts = load_components(tiny_model, device="cpu")
    assert parts.dtype == torch.float32 and parts.unet.dtype == torch.float32
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert parts.prediction_type == "epsilon" == parts.scheduler.config.prediction_type
    assert parts.scheduler.config.steps_offset == 1
    assert parts.scheduler.config.set_alpha_to_one is False
    assert parts.scheduler.config.clip_sample is False
    assert (parts.vae_scale_factor, parts.native_resolution) == (8, 64)
    assert parts.source.kind == "folder" and parts.model_id == str(tiny_model)
    assert parts.fingerprint.startswith(f"dir:{tiny_model}#")
    assert not any(p.requires_grad for p in parts.unet.parameters())

    prompt = "A woman wearing a Batman mask is talking, cartoon style!"
    ids = parts.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == parts.tokenizer.bos_token_id
    with torch.no_grad():
        text = parts.text_encoder(ids)[0]
        noise = parts.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=text).sample
    assert noise.shape == (1, 4, 8, 8)


def test_load_components_keeps_v_prediction_and_takes_a_dtype(tiny_model_v: Path) -> None:
    parts = load_components(tiny_model_v, device="cpu", dtype=torch.bfloat16)
    assert parts.prediction_type == "v_prediction"
    assert parts.unet.dtype == parts.text_encoder.dtype == torch.bfloat16
    assert parts.unet.config.use_linear_projection


def test_fingerprint_is_stable_and_follows_the_weights(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    first = resolve_model(copy).fingerprint
    assert resolve_model(copy).fingerprint == first
    (copy / UNET_FILE).write_bytes((tiny_model / UNET_FILE).read_bytes())  # new mtime
    assert resolve_model(copy).fingerprint != first


# --- local folder checks -------------------------------------------------------------------


def test_inspect_reports_components_dtype_and_size(tiny_model: Path) -> None:
    components = inspect_model_folder(tiny_model)
    assert set(components) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    unet = components["unet"]
    assert unet.weight_files == (UNET_FILE,) and unet.dtype == "float32"
    assert unet.size_bytes >= (tiny_model / UNET_FILE).stat().st_size
    assert resolve_model(tiny_model).size_bytes == sum(c.size_bytes for c in components.values())


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_named(tiny_model: Path, tmp_path: Path, component: str) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    shutil.rmtree(copy / component)
    with pytest.raises(BadInputError, match=component):
        load_components(copy, device="cpu")


def test_pickle_only_and_truncated_weights_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (copy / UNET_FILE).rename(copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(BadInputError, match="pickle"):
        inspect_model_folder(copy)
    data = (tiny_model / UNET_FILE).read_bytes()
    (copy / UNET_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="not a complete safetensors"):
        inspect_model_folder(copy)


def test_a_path_that_is_not_a_model_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"model_index\.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing.safetensors")
    with pytest.raises(BadInputError):
        resolve_model("not a model id!")


def test_weight_file_choice() -> None:
    names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.non_ema.safetensors", "diffusion_pytorch_model.bin"]
    assert choose_weight_files(names, "fp16") == (
        "fp16", ["diffusion_pytorch_model.fp16.safetensors"])
    assert choose_weight_files(names, None) == (
        None, ["diffusion_pytorch_model.safetensors"])
    assert choose_weight_files(names, "bf16")[0] is None  # falls back to the plain files
    shards = ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors",
              "model.safetensors.index.fp16.json"]
    assert choose_weight_files(shards, None) == ("fp16", shards[:2])  # the only set
    assert choose_weight_files(["model.bin"], None) == (None, [])
