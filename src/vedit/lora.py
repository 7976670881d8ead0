"""LoRA on the inflated UNet: which projections are adapted, the peft config, the tuned weights.

Tune-A-Video fine-tunes the query projections of self- and cross-attention (`attn1.to_q`,
`attn2.to_q`) and the whole temporal attention (`attn_temp`). vedit trains `attn_temp` fully as
the original does and replaces the full `to_q` updates by peft LoRA adapters, so a checkpoint
holds a few MB of LoRA plus the temporal layers instead of a whole UNet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

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

#: The projections a LoRA target may name, per attention of a transformer block.
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTIONS = ("attn1", "attn2")
DEFAULT_TARGETS = ("attn1.to_q", "attn2.to_q")
_SHORT = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0", "to_out": "to_out.0"}


def parse_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Normalise `--lora-targets`: `attn1.to_q`, `to_q` (both attentions) or `q`/`k`/`v`/`out`."""
    targets: list[str] = []
    for raw in names:
        for name in (part.strip() for part in raw.split(",") if part.strip()):
            if name.startswith("attn"):
                attention, _, projection = name.partition(".")
            else:
                attention, projection = "", name
            projection = _SHORT.get(projection, projection)
            chosen = [attention] if attention else list(ATTENTIONS)
            if projection not in PROJECTIONS or any(a not in ATTENTIONS for a in chosen):
                raise BadInputError(
                    f"--lora-targets: {name!r} is not an attention projection.",
                    "Use q, k, v, out (both attentions) or e.g. attn1.to_q, attn2.to_v.")
            targets += [f"{a}.{projection}" for a in chosen if f"{a}.{projection}" not in targets]
    if not targets:
        raise BadInputError("--lora-targets names no projection.", "The default is q.")
    return tuple(sorted(targets))


def target_pattern(targets: Sequence[str]) -> str:
    """A regex peft matches against module names: the targets inside transformer blocks only,
    so the temporal attention (trained whole) never gets an adapter."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf".*transformer_blocks\.\d+\.({alternatives})"


def add_lora(unet: InflatedUNet, *, rank: int, targets: Sequence[str] = DEFAULT_TARGETS) -> None:
    """Inject LoRA adapters (peft; each layer keeps its original as `base_layer`) into the UNet.

    B starts at zero, so the adapted model starts exactly as the base model; alpha equals the
    rank (a scale of 1), as checkpoints record.
    """
    if rank < 1:
        raise BadInputError(f"--rank {rank} must be 1 or more.", "Try --rank 16.")
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
