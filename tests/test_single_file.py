"""Single-file checkpoints: the tiny model written as an original LDM checkpoint, converted
once (configs fetched, or borrowed from the cache), then loaded offline; pickles refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub, go_offline
from pipeline_files import UNET_FILE
from safetensors.torch import load_file, save_file

from vedit import single_file
from vedit.errors import BadInputError, ModelNotFoundError
from vedit.hub import fetch_model, list_models
from vedit.model_files import DEFAULT_MODEL, model_fingerprint
from vedit.models import load_components, resolve_model

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def _unet_prefixes(config: dict) -> list[tuple[str, str]]:
    """diffusers -> original LDM prefixes of the UNet, for any depth and layers per block."""
    per_level = config["layers_per_block"] + 1
    rules = [("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.0.", "middle_block.0."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i, up_type in enumerate(config["up_block_types"]):
        for j in range(per_level - 1):
            block = per_level * i + j + 1
            rules += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.")]
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.",
                      f"input_blocks.{per_level * (i + 1)}.0.op."))
        for j in range(per_level):
            rules += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per_level * i + j}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per_level * i + j}.1.")]
        slot = 2 if "CrossAttn" in up_type else 1
        rules.append((f"up_blocks.{i}.upsamplers.0.",
                      f"output_blocks.{per_level * i + per_level - 1}.{slot}."))
    return rules


def _vae_prefixes(config: dict) -> list[tuple[str, str]]:
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    rules = []
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")]
    for i in range(levels):
        rules += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
                  for j in range(layers)]
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        up = levels - 1 - i
        rules += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.")
                  for j in range(layers + 1)]
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    return rules


def _rename(key: str, rules: list[tuple[str, str]], inner: dict[str, str]) -> str:
    """Swap the first matching block prefix, then the layer name right after it."""
    for old, new in rules:
        if key.startswith(old):
            return new + _rename_layer(key[len(old):], inner)
    raise KeyError(key)


def _rename_layer(rest: str, names: dict[str, str]) -> str:
    for name, ldm_name in names.items():
        if rest.startswith(f"{name}."):
            return ldm_name + rest[len(name):]
    return rest


def write_ldm_checkpoint(model: Path, target: Path) -> Path:
    """The inverse of diffusers' single-file conversion, for SD 1.x: the tiny model as an
    original CompVis/LDM single-file checkpoint."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as fixed

    unet_config = json.loads((model / "unet/config.json").read_text())
    vae_config = json.loads((model / "vae/config.json").read_text())
    unet_rules, vae_rules = _unet_prefixes(unet_config), _vae_prefixes(vae_config)
    checkpoint = {}
    for key, value in load_file(model / UNET_FILE).items():
        ldm = fixed["unet"]["layers"].get(key) or _rename(key, unet_rules, _RESNET)
        checkpoint[f"model.diffusion_model.{ldm}"] = value
    for key, value in load_file(model / "vae/diffusion_pytorch_model.safetensors").items():
        ldm = fixed["vae"].get(key) or _rename(key, vae_rules, _VAE_RESNET)
        if ".attn_1." in ldm:
            head, _, tail = ldm.partition(".attn_1.")
            ldm = f"{head}.attn_1.{_rename_layer(tail, _VAE_ATTENTION)}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # 1x1 convs in LDM
        checkpoint[f"first_stage_model.{ldm}"] = value
    for key, value in load_file(model / "text_encoder/model.safetensors").items():
        name = key.removeprefix("text_model.")
        checkpoint[f"cond_stage_model.transformer.text_model.{name}"] = value
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, target)
    return target


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


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("the checkpoint was converted again")
