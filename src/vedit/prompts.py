"""Prompts to text-encoder states, with a warning (not silence) when a prompt is cut short."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vedit.progress import Reporter


def encode_prompts(components: Any, prompts: Sequence[str],
                   reporter: Reporter | None = None) -> torch.Tensor:
    """CLIP hidden states `(n, tokens, d)` of `prompts`, as diffusers' SD pipelines compute
    them (the last layer of the text encoder, which SD 2.x configs already stop one early)."""
    reporter = reporter or Reporter()
    tokenizer, encoder = components.tokenizer, components.text_encoder
    limit = tokenizer.model_max_length
    for prompt in prompts:
        warn_if_truncated(tokenizer, prompt, limit, reporter)
    ids = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                    return_tensors="pt").input_ids
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return encoder(ids.to(device))[0]


def warn_if_truncated(tokenizer: Any, prompt: str, limit: int, reporter: Reporter) -> None:
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= limit:
        return
    kept = tokenizer.decode(ids[1:limit - 1])
    reporter.warn(f"The prompt is {len(ids)} tokens; the text encoder reads {limit}, so it was "
                  f"cut after: {kept!r}.")
