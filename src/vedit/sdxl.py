"""What an SDXL base is conditioned on beyond SD 1.x/2.x: both text encoders' states, the
pooled prompt embedding, and the added time ids (the clip's original size, the crop corner and
the target size), each computed as diffusers' `StableDiffusionXLPipeline` does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vedit.conditioning import Conditioning, warn_if_truncated
from vedit.progress import Reporter
from vedit.video import cover_and_crop

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from vedit.models import Components


@dataclass(frozen=True)
class SDXLText:
    """SDXL's text conditioning of `n` prompts: the UNet's cross-attention states `(n, tokens,
    d1 + d2)` and the pooled embedding `(n, projection)` its added conditioning takes."""

    states: torch.Tensor
    pooled: torch.Tensor


def encode_sdxl_prompts(components: Components, prompts: Sequence[str],
                        reporter: Reporter | None = None) -> SDXLText:
    """Both encoders' penultimate hidden states, concatenated, and the second encoder's
    projected pooled output (each prompt goes to both encoders, as `prompt_2` defaults to it)."""
    reporter = reporter or Reporter()
    text_encoder_2, tokenizer_2 = _second_encoder(components)
    states = []
    pooled = torch.empty(0)
    for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                               (tokenizer_2, text_encoder_2)):
        limit = tokenizer.model_max_length
        for prompt in prompts:
            warn_if_truncated(tokenizer, prompt, limit, reporter)
        ids = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            output = encoder(ids.to(next(encoder.parameters()).device),
                             output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]  # the second encoder's projected text embeds
    return SDXLText(torch.cat(states, dim=-1), pooled)


def unconditional_sdxl(components: Components, count: int = 1) -> SDXLText:
    """The unconditional branch of classifier-free guidance: all zeros where the model sets
    `force_zeros_for_empty_prompt` (SDXL base does), else the empty prompt's conditioning."""
    if not components.force_zeros_for_empty_prompt:
        return encode_sdxl_prompts(components, [""] * count)
    text_encoder_2, tokenizer_2 = _second_encoder(components)
    tokens = max(components.tokenizer.model_max_length, tokenizer_2.model_max_length)
    width = components.text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    like = next(text_encoder_2.parameters())
    return SDXLText(like.new_zeros(count, tokens, width),
                    like.new_zeros(count, text_encoder_2.config.projection_dim))


def add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                 target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning `(1, 6)`: original (h, w), crop corner (top, left) and target
    (h, w), in pixels."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


def clip_time_ids(source_width: int, source_height: int, width: int,
                  height: int) -> torch.Tensor:
    """The time ids of a clip's frames as vedit makes them from its upright `source_width` x
    `source_height` pictures: the real size, the corner of the centre crop in the scaled
    picture, and the frame size."""
    _, (left, top) = cover_and_crop(source_width, source_height, width, height)
    return add_time_ids((source_height, source_width), (top, left), (height, width))


def project_time_ids(record: Mapping[str, Any]) -> torch.Tensor:
    """The time ids of a project's frames (those tuned, and those of its `--full` span, which
    extract sizes alike), from its record's `source` and `frames` sections."""
    video, frames = record["source"]["video"], record["frames"]
    return clip_time_ids(int(video["width"]), int(video["height"]), int(frames["width"]),
                         int(frames["height"]))


def sdxl_conditioning(text: SDXLText, time_ids: torch.Tensor | None) -> Conditioning:
    """The UNet's conditioning for the prompts of `text`, all on a clip of `time_ids` `(1, 6)`;
    the ids in the states' dtype, as diffusers' pipeline passes them."""
    if time_ids is None:
        raise ValueError("an SDXL base needs the clip's time ids")
    ids = time_ids.to(text.states.device, text.states.dtype).expand(len(text.states), -1)
    return Conditioning(text.states, {"text_embeds": text.pooled, "time_ids": ids})


def _second_encoder(components: Components) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    if components.text_encoder_2 is None or components.tokenizer_2 is None:
        raise ValueError(f"{components.model_id} is not an SDXL model (one text encoder)")
    return components.text_encoder_2, components.tokenizer_2
