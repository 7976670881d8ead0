"""Single-file checkpoints: the tiny SD 1.x and SDXL models written as original checkpoints,
converted once (configs fetched, or borrowed from the cache), then loaded offline; pickles,
refiners and other conditioning refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_server import FakeHub, go_offline
from ldm_checkpoint import write_ldm_checkpoint
from pipeline_files import UNET_FILE
from safetensors.torch import load_file, save_file

from vedit import single_file
from vedit.errors import BadInputError, ModelNotFoundError
from vedit.hub import fetch_model, list_models
from vedit.model_files import (
    DEFAULT_MODEL,
    SDXL_BASE_MODEL,
    cached_snapshot,
    model_fingerprint,
)
from vedit.models import load_components, resolve_model
from vedit.sdxl import encode_sdxl_prompts, unconditional_sdxl


def test_single_file_is_converted_once_with_configs_fetched_offline_after(
        tiny_model: Path, fake_hub: FakeHub, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = write_ldm_checkpoint(tiny_model, tmp_path / "my-model.safetensors")
    config_repo = single_file.CONFIG_REPOS["v1"][0]
    fake_hub.add_folder(config_repo, tiny_model)
    with pytest.raises(ModelNotFoundError, match="configs"):
        resolve_model(checkpoint)  # resolving never downloads

    folder = fetch_model(checkpoint)  # downloads the configs only, then converts

    config_downloads = {r.path.rsplit("/", 2)[-2] + "/" + r.path.rsplit("/", 1)[-1]
                        for r in fake_hub.requests if r.method == "GET" and "resolve" in r.path}
    assert not any(f.endswith(".safetensors") for f in config_downloads)
    assert not fake_hub.unexpected()
    go_offline(monkeypatch)
    monkeypatch.setattr(single_file, "_convert", _fail_if_called)
    parts = load_components(checkpoint, device="cpu")
    assert parts.source.kind == "single_file" and parts.source.path == folder
    assert parts.fingerprint.startswith("file:my-model.safetensors#")
    original = load_file(tiny_model / UNET_FILE)
    for key, value in parts.unet.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert [m.kind for m in list_models() if m.name == str(checkpoint)] == ["single_file"]


def test_single_file_uses_cached_configs_and_refuses_pickles(
        tiny_model: Path, fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_folder(DEFAULT_MODEL, tiny_model)
    fetch_model(DEFAULT_MODEL)  # any cached SD 1.x repo lends its configs
    checkpoint = write_ldm_checkpoint(tiny_model, tmp_path / "other.safetensors")
    source = resolve_model(checkpoint)
    assert model_fingerprint(source) == source.fingerprint
    assert source.components["unet"].dtype == "float32"
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(BadInputError, match="pickle"):
        resolve_model(pickle)
    with pytest.raises(BadInputError, match="not an original Stable Diffusion"):
        resolve_model(tiny_model / UNET_FILE)


def test_sdxl_single_file_is_converted_with_the_base_configs_and_conditions_as_the_folder(
        tiny_model_xl: Path, fake_hub: FakeHub, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = write_ldm_checkpoint(tiny_model_xl, tmp_path / "my-xl.safetensors")
    with pytest.raises(ModelNotFoundError, match="SDXL") as missing:
        resolve_model(checkpoint)
    assert SDXL_BASE_MODEL in missing.value.hint
    fake_hub.add_folder(SDXL_BASE_MODEL, tiny_model_xl)

    folder = fetch_model(checkpoint)  # both encoders' configs and tokenizers, then converted

    downloaded = {r.path.split("/resolve/", 1)[-1].split("/", 1)[-1] for r in fake_hub.requests
                  if r.method == "GET" and "/resolve/" in r.path}
    assert "text_encoder_2/config.json" in downloaded
    assert not any(f.endswith(".safetensors") for f in downloaded)
    configs = cached_snapshot(SDXL_BASE_MODEL, None)
    assert configs is not None and (configs / "tokenizer_2" / "merges.txt").is_file()
    go_offline(monkeypatch)
    monkeypatch.setattr(single_file, "_convert", _fail_if_called)
    parts = load_components(checkpoint, device="cpu")
    assert parts.source.path == folder and parts.source.family == "sdxl"
    assert parts.force_zeros_for_empty_prompt
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = next((tiny_model_xl / name).glob("*.safetensors"))
        original = load_file(weights)
        state = getattr(parts, name).state_dict()
        assert state.keys() == original.keys(), name
        assert all(torch.equal(state[k], original[k]) for k in original), name
    folder_parts = load_components(tiny_model_xl, device="cpu")
    for ours, theirs in ((encode_sdxl_prompts(parts, ["a red car"]),
                          encode_sdxl_prompts(folder_parts, ["a red car"])),
                         (unconditional_sdxl(parts), unconditional_sdxl(folder_parts))):
        assert torch.equal(ours.states, theirs.states)
        assert torch.equal(ours.pooled, theirs.pooled)


@pytest.mark.parametrize(("extra", "refusal"), [
    ({"conditioner.embedders.0.model.positional_embedding": [77, 8]}, "SDXL refiner"),
    ({"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
      [77, 8]}, "neither"),
])
def test_single_files_of_other_sgm_models_are_refused(tmp_path: Path, extra: dict[str, list[int]],
                                                      refusal: str) -> None:
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": [8, 4, 3, 3]} | extra
    path = tmp_path / "other.safetensors"
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, path)
    with pytest.raises(BadInputError, match=refusal):
        resolve_model(path)


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("the checkpoint was converted again")
