"""Writing a diffusers model as an original single-file checkpoint, the inverse of diffusers'
`from_single_file` conversion: what a model site's SD 1.x or SDXL `.safetensors` file holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pipeline_files import UNET_FILE
from safetensors.torch import load_file, save_file

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
    """The inverse of diffusers' single-file conversion, for SD 1.x and SDXL: the tiny model as
    an original CompVis/LDM (or Stability's SGM, for SDXL) single-file checkpoint."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as fixed

    unet_config = json.loads((model / "unet/config.json").read_text())
    vae_config = json.loads((model / "vae/config.json").read_text())
    unet_rules, vae_rules = _unet_prefixes(unet_config), _vae_prefixes(vae_config)
    unet_fixed = fixed["unet"]["layers"] | fixed["unet"]["addition_embed_type"]
    checkpoint = {}
    for key, value in load_file(model / UNET_FILE).items():
        ldm = unet_fixed.get(key) or _rename(key, unet_rules, _RESNET)
        checkpoint[f"model.diffusion_model.{ldm}"] = value
    for key, value in load_file(model / "vae/diffusion_pytorch_model.safetensors").items():
        ldm = fixed["vae"].get(key) or _rename(key, vae_rules, _VAE_RESNET)
        if ".attn_1." in ldm:
            head, _, tail = ldm.partition(".attn_1.")
            ldm = f"{head}.attn_1.{_rename_layer(tail, _VAE_ATTENTION)}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # 1x1 convs in LDM
        checkpoint[f"first_stage_model.{ldm}"] = value
    sdxl = (model / "text_encoder_2").is_dir()
    clip_prefix = "conditioner.embedders.0" if sdxl else "cond_stage_model"
    for key, value in load_file(model / "text_encoder/model.safetensors").items():
        name = key.removeprefix("text_model.")
        checkpoint[f"{clip_prefix}.transformer.text_model.{name}"] = value
    if sdxl:
        open_clip = _open_clip_state(load_file(model / "text_encoder_2/model.safetensors"))
        checkpoint |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip.items()}
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, target)
    return target


_OPEN_CLIP_LAYER = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.",
                    "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_OPEN_CLIP_FIXED = {"embeddings.position_embedding.weight": "positional_embedding",
                    "embeddings.token_embedding.weight": "token_embedding.weight",
                    "final_layer_norm.weight": "ln_final.weight",
                    "final_layer_norm.bias": "ln_final.bias"}


def _open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second encoder (transformers' CLIPTextModelWithProjection) in OpenCLIP's names:
    fused q/k/v projections, `resblocks`, and the text projection as a matrix applied on the
    right."""
    converted = {"text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name in _OPEN_CLIP_FIXED:
            converted[_OPEN_CLIP_FIXED[name]] = value
            continue
        index, rest = name.removeprefix("encoder.layers.").split(".", 1)
        block = f"transformer.resblocks.{index}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            layers.setdefault(block, {})[rest.removeprefix("self_attn.")] = value
            continue
        for old, new in _OPEN_CLIP_LAYER.items():
            rest = new + rest[len(old):] if rest.startswith(old) else rest
        converted[block + rest] = value
    for block, parts in layers.items():
        for kind in ("weight", "bias"):
            converted[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [parts[f"{p}_proj.{kind}"] for p in "qkv"])
    return converted
