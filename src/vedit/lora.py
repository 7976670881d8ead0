"""LoRA on the inflated UNet: which projections are adapted, the peft config, the tuned weights.

Tune-A-Video fine-tunes the query projections of self- and cross-attention (`attn1.to_q`,
`attn2.to_q`) and the whole temporal attention (`attn_temp`). vedit trains `attn_temp` fully as
the original does and replaces the full `to_q` updates by peft LoRA adapters, so a checkpoint
holds a few MB of LoRA plus the temporal layers instead of a whole UNet.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from torch import nn

from vedit.errors import BadInputError
from vedit.inflate import InflatedUNet


def target_pattern(targets: Sequence[str]) -> str:
    """A regex peft matches against module names: the targets inside transformer blocks only,
    so the temporal attention (trained whole) never gets an adapter."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf".*transformer_blocks\.\d+\.({alternatives})"


def add_lora(unet: InflatedUNet, *, rank: int, targets: Sequence[str]) -> None:
    """Inject LoRA adapters (peft; each layer keeps its original as `base_layer`) on `targets`
    (`TuneSettings.targets`) into the UNet.

    B starts at zero, so the adapted model starts exactly as the base model; alpha equals the
    rank (a scale of 1), as checkpoints record.
    """
    config = LoraConfig(r=rank, lora_alpha=rank,
                        target_modules=target_pattern(targets), init_lora_weights="gaussian")
    inject_adapter_in_model(config, unet.unet)


def lora_state_dict(unet: InflatedUNet) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's key format (`...attn1.to_q.lora_A.weight`), which diffusers'
    `load_lora_weights` reads once prefixed with `unet.`."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(unet.unet).items()}


def load_lora_state_dict(unet: InflatedUNet, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(unet.unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise BadInputError(f"The checkpoint's LoRA has {len(unexpected)} unknown weights "
                            f"(e.g. {unexpected[0]}).", "It was tuned with other LoRA targets.")


def temporal_state_dict(unet: InflatedUNet) -> dict[str, torch.Tensor]:
    """The trained temporal attention, keyed like the original UNet3D's `attn_temp` weights."""
    return {k: v.detach() for k, v in unet.temporal_parameters().items()
            if ".attn_temp." in k}


def trainable_parameters(unet: InflatedUNet) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the LoRA adapters and the temporal attention.

    `norm_temp` stays at its initial values, as in the original (its trainable modules are
    `attn1.to_q`, `attn2.to_q` and `attn_temp`).
    """
    unet.requires_grad_(False)
    trainable = []
    for name, param in unet.unet.named_parameters():
        if ".lora_" in name or ".attn_temp." in name:
            param.requires_grad_(True)
            trainable.append(param)
    return trainable
